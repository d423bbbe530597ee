"""Train the Chameleon backbone on mixed action-model and world-model sequences.

The loss is the release's next-token cross-entropy on the answer tokens, with the softmax taken
over the tokens the decoders can emit (image codes, action tokens, structure tokens) instead of
all 65536: the same argmax among those, at a fraction of the cost on a CPU. Output rows of the
other tokens are zero, so their logits stay at 0.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ChameleonForConditionalGeneration

from worldvla_ros.model import tokens as T

from .sequences import Sample, collate


def emit_ids(image_token_ids: np.ndarray, grid_token: int) -> torch.Tensor:
    action = list(range(T.ACTION_BIN_FIRST, T.ACTION_BIN_LAST + 1))
    structure = [T.ACTION_START, T.ACTION_END, T.END_OF_TURN, T.IMAGE_START, T.IMAGE_END, T.IMAGE_NEWLINE, grid_token]
    return torch.as_tensor(sorted(set(image_token_ids.tolist()) | set(action) | set(structure)), dtype=torch.long)


def init_image_embeddings(lm: ChameleonForConditionalGeneration, codebook: torch.Tensor, img2bpe: np.ndarray,
                          seed: int = 0) -> None:
    """Start every image token's input and output embedding at a fixed random projection of its VQ code vector.

    Only the initialization changes (the architecture and checkpoint layout are the release's):
    with a few thousand frames most codes are seen a handful of times, and codes that look alike
    (the same block on a neighbouring patch) start out alike instead of as unrelated random vectors.
    """
    g = torch.Generator().manual_seed(seed)
    code = codebook.detach().float()
    code = (code - code.mean(0)) / (code.std(0) + 1e-6)
    proj = torch.randn(code.shape[1], lm.config.hidden_size, generator=g) / code.shape[1] ** 0.5
    rows = torch.as_tensor(img2bpe, dtype=torch.long)
    with torch.no_grad():
        for weight in (lm.get_input_embeddings().weight, lm.lm_head.weight):
            scale = weight.std()
            weight[rows] = (code @ proj * scale).to(weight.dtype)


def soft_targets(token_ids: torch.Tensor, labels: torch.Tensor, to_emit: torch.Tensor, n_emit: int,
                 sigma: float) -> torch.Tensor:
    """(N,) target ids → (N, n_emit) distributions: one-hot, but a Gaussian over the bins for action bins."""
    soft = F.one_hot(labels, n_emit).float()
    is_bin = (token_ids >= T.ACTION_BIN_FIRST) & (token_ids <= T.ACTION_BIN_LAST)
    if is_bin.any():
        bins = to_emit[T.ACTION_BIN_FIRST : T.ACTION_BIN_LAST + 1]
        centre = (token_ids[is_bin] - T.ACTION_BIN_FIRST).float()[:, None]
        gauss = torch.exp(-0.5 * ((torch.arange(len(bins), device=soft.device)[None] - centre) / sigma) ** 2)
        rows = torch.nonzero(is_bin)[:, 0]
        soft[rows] = 0.0
        soft[rows[:, None], bins[None]] = gauss / gauss.sum(1, keepdim=True)
    return soft


def hidden_device(lm: torch.nn.Module) -> str:
    return next(lm.parameters()).device.type


def sample_drawer(samples: Sequence[Sample], batch_size: int, world_fraction: float | None,
                  rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """Indices of one batch: uniform over ``samples``, or ``world_fraction`` of it world-model samples."""
    if world_fraction is None:
        return lambda: rng.integers(0, len(samples), batch_size)
    if not 0.0 <= world_fraction <= 1.0:
        raise ValueError(f'world_fraction must lie in [0, 1], got {world_fraction}')
    world = np.array([i for i, s in enumerate(samples) if s.kind == 'world'], dtype=np.int64)
    action = np.array([i for i, s in enumerate(samples) if s.kind == 'action'], dtype=np.int64)
    n_world = round(world_fraction * batch_size)
    if (n_world and not len(world)) or (n_world < batch_size and not len(action)):
        raise ValueError(f'world_fraction {world_fraction} needs both kinds of samples; '
                         f'have {len(world)} world-model and {len(action)} action samples')
    return lambda: np.concatenate([rng.choice(world, n_world), rng.choice(action, batch_size - n_world)])


def train_lm(
    lm: ChameleonForConditionalGeneration,
    samples: Sequence[Sample],
    emit: torch.Tensor,
    steps: int,
    batch_size: int = 24,
    lr: float = 2e-3,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    bf16: bool = True,
    bin_sigma: float = 0.0,
    world_fraction: float | None = None,
) -> list[dict[str, float]]:
    """``bf16``: autocast the forward pass (fp32 weights and optimizer), ~1.5× faster on a CPU with AVX512-BF16.

    ``bin_sigma`` > 0 (not the release's loss): an action-bin target becomes a Gaussian over the
    neighbouring bins (σ in bins). With one-hot targets the 256 bins are unrelated classes, each
    rarely the answer, and `benchmarks/position_readout.py --continuous` learns nothing in 900 steps;
    with σ = 6 it does.

    ``world_fraction``: share of world-model samples in every batch (``None``: draw uniformly from
    ``samples``, so the mixture is whatever the data holds — one world-model sample per transition,
    one action sample per chunk start; with many short snippets that is mostly world-model data).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lm.train()
    device = lm.lm_head.weight.device
    emit = emit.to(device)
    with torch.no_grad():
        keep = torch.zeros(lm.lm_head.weight.shape[0], dtype=torch.bool, device=device)
        keep[emit] = True
        lm.lm_head.weight[~keep] = 0.0
    to_emit = torch.full((T.VOCAB_SIZE,), -1, dtype=torch.long, device=device)
    to_emit[emit] = torch.arange(len(emit), device=device)
    params = [p for p in lm.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.01}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    draw = sample_drawer(samples, batch_size, world_fraction, rng)
    log = []
    for step in range(steps):
        batch = [samples[i] for i in draw()]
        ids, mask, positions, target = (t.to(device, non_blocking=True) for t in collate(batch))
        b, q = torch.nonzero(target[:, 1:], as_tuple=True)  # hidden at i predicts token i + 1
        labels = to_emit[ids[b, q + 1]]
        with torch.autocast(hidden_device(lm), dtype=torch.bfloat16, enabled=bf16):
            hidden = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state
            logits = F.linear(hidden[b, q], lm.lm_head.weight[emit]).float()
        if bin_sigma > 0:
            loss_each = -(soft_targets(ids[b, q + 1], labels, to_emit, len(emit), bin_sigma)
                          * F.log_softmax(logits, -1)).sum(-1)
        else:
            loss_each = F.cross_entropy(logits, labels, reduction='none')
        loss = loss_each.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            lm.lm_head.weight[~keep] = 0.0
            kind = np.array([batch[i].kind for i in b.tolist()])
            entry = {'step': step, 'loss': float(loss), 'lr': sched.get_last_lr()[0]}
            for k in ('action', 'world'):
                sel = torch.from_numpy(kind == k).to(device)
                if sel.any():
                    entry[f'loss_{k}'] = float(loss_each[sel].mean())
        log.append(entry)
        if on_step:
            on_step(step, entry)
    return log
