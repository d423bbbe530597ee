"""The world model's own likelihood of a real transition: bits per token of the next frame's VQ codes.

One teacher-forced forward pass over ``prompt + next image block`` (no generation) gives, at every
code of the real next frame, the model's predictive distribution over the 8192 image tokens (the
tokens its image decoding may emit): the bits the real code costs, and the bits the model itself
expects there (the distribution's entropy) with their variance. Excess bits are then measured
against what the model expected in that very state, so one threshold can hold across states
where the prediction is easy (an empty table) and where it is hard (a moving arm).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import ChameleonForConditionalGeneration

from . import tokens as T
from .attention_mask import action_attention_mask_rows, additive_mask
from .generate import NonFiniteLogits

_LOG2 = math.log(2.0)


@dataclass
class CodeLikelihood:
    """Per code of the next frame (rows: hypotheses, e.g. commanded action and no motion), in bits."""

    bits: np.ndarray  # (B, grid, grid) −log2 p(real code)
    expected_bits: np.ndarray  # (B, grid, grid) entropy of the prediction: the bits the model expects
    variance: np.ndarray  # (B, grid, grid) variance of the bits under the model's own prediction


def code_positions(grid: int) -> np.ndarray:
    """Indices of the grid×grid codes inside an image block (after start and the two grid tokens)."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
    return (3 + rows * (grid + 1) + cols).reshape(-1)


@torch.inference_mode()
def next_block_likelihood(
    lm: ChameleonForConditionalGeneration,
    prompts: Sequence[Sequence[int]],
    next_block: Sequence[int],
    grid: int,
    image_token_ids: torch.Tensor,
) -> CodeLikelihood:
    """Each prompt (equal lengths; one row each) followed by ``next_block``, in one forward pass.

    The softmax runs over ``image_token_ids``, as the world model's image decoding picks codes.
    """
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f'hypotheses must have prompts of one length, got {sorted(lengths)}')
    device, dtype = lm.lm_head.weight.device, lm.lm_head.weight.dtype
    p = lengths.pop()
    ids = torch.tensor([[*prompt, *next_block] for prompt in prompts], dtype=torch.long, device=device)
    codes_at = torch.as_tensor(code_positions(grid), device=device)
    allowed = image_token_ids.to(device)
    targets = ids[:, p + codes_at]  # (B, n)
    column = torch.searchsorted(allowed, targets).clamp(max=allowed.numel() - 1)
    if bool((allowed[column] != targets).any()):
        raise ValueError('the next block holds tokens that are not image codes')
    mask = additive_mask(action_attention_mask_rows(ids, 0), dtype)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    hidden = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    h = hidden[:, p + codes_at - 1]  # the state that predicts each code
    bias = lm.lm_head.bias
    logits = torch.nn.functional.linear(h, lm.lm_head.weight[allowed], None if bias is None else bias[allowed]).float()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits('the model produced NaN/inf logits (broken weights or numerical overflow)')
    logp = torch.log_softmax(logits, dim=-1) / _LOG2  # log2 p
    prob = logp.exp2()
    bits = -logp.gather(-1, column[..., None])[..., 0]
    entropy = -(prob * logp).sum(-1)
    second = (prob * logp.square()).sum(-1)
    variance = (second - entropy.square()).clamp(min=0.0)
    shape = (len(prompts), grid, grid)
    return CodeLikelihood(*(t.reshape(shape).cpu().numpy().astype(np.float64) for t in (bits, entropy, variance)))


def still_action(action: np.ndarray) -> np.ndarray:
    """The "no motion" hypothesis for a commanded action: translation and rotation zero, gripper as commanded."""
    out = np.zeros(T.ACTION_DIMS)
    out[-1] = np.asarray(action, dtype=np.float64).reshape(-1)[-1]
    return out
