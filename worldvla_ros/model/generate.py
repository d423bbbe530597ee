"""Decoding loops: action chunks (sequential and batched) and world-model image blocks.

The backbone is transformers' Chameleon. Its ``forward`` sets image-token logits to -inf; the
world model must produce image tokens, so these loops call the decoder and ``lm_head``
themselves and never go through ``ChameleonForConditionalGeneration.forward``.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import ChameleonForConditionalGeneration, DynamicCache

from . import tokens as T
from .attention_mask import action_attention_mask_rows, additive_mask, causal_mask_rows

_BIN_IDS = torch.arange(T.ACTION_BIN_FIRST, T.ACTION_BIN_LAST + 1)


class NonFiniteLogits(RuntimeError):
    """The model produced NaN/inf logits: argmax would still pick a token, so stop here instead."""

    non_finite = True  # what the controller reads (it imports no torch)


class DecodeCancelled(RuntimeError):
    """The caller asked a long decoding to stop (e.g. its node is shutting down)."""


class DecodeSession:
    """One sequence (B=1) being extended token by token over a KV cache, with the action mask.

    ``vocab`` (token ids) limits the logits to the tokens the caller can pick from: ``last_logits[i]``
    is then the logit of ``vocab[i]``. The output projection is most of the work of a small model
    (65536 rows), and argmax over the allowed tokens is the same either way.
    """

    def __init__(self, lm: ChameleonForConditionalGeneration, prompt: Sequence[int], causal: bool = False,
                 vocab: torch.Tensor | None = None, prompt_logits: bool = True) -> None:
        self.lm = lm
        self.mask_rows = causal_mask_rows if causal else action_attention_mask_rows
        self.device = lm.lm_head.weight.device
        self.dtype = lm.lm_head.weight.dtype
        self.vocab = None if vocab is None else vocab.to(self.device)
        self.cache = DynamicCache(config=lm.config)
        self.ids = torch.empty((1, 0), dtype=torch.long, device=self.device)
        self.last_logits = self.feed(prompt, logits=prompt_logits)

    def feed(self, new_ids: Sequence[int], logits: bool = True) -> torch.Tensor | None:
        """Append tokens; return the float32 logits after the last one (over ``vocab``), or None."""
        start = self.ids.shape[1]
        new = torch.as_tensor(list(new_ids), dtype=torch.long, device=self.device)[None]
        self.ids = torch.cat([self.ids, new], dim=1)
        mask = additive_mask(self.mask_rows(self.ids, start), self.dtype)
        positions = torch.arange(start, self.ids.shape[1], device=self.device)[None]
        rows = self.vocab if logits else torch.empty(0, dtype=torch.long, device=self.device)
        out = forward_logits(self.lm, new, positions, mask, self.cache, rows)[0]
        self.last_logits = out if logits else None
        return self.last_logits


@functools.cache
def _cache_kwarg(model_cls: type) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40)
    return 'cache' if 'cache' in inspect.signature(model_cls.forward).parameters else 'past_key_values'


@torch.inference_mode()
def forward_logits(
    lm: ChameleonForConditionalGeneration,
    ids: torch.Tensor,  # (B, Q)
    positions: torch.Tensor,  # (B, Q) RoPE positions
    mask: torch.Tensor,  # (B, 1, Q, KV) additive
    cache: DynamicCache,
    rows: torch.Tensor | None = None,  # (R,) token ids whose logits are wanted; None: all
) -> torch.Tensor:
    """Logits of the last query position only, (B, V) or (B, R) float32; image tokens are not blocked.

    With ``rows`` empty only the cache is extended (a forced next token needs no logits); the last
    hidden state is still checked, so a model producing NaN is caught either way.
    """
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{_cache_kwarg(type(lm.model)): cache})
    hidden = out.last_hidden_state[:, -1]
    if rows is None:
        logits = lm.lm_head(hidden).float()
    elif rows.numel():
        bias = lm.lm_head.bias
        logits = torch.nn.functional.linear(hidden, lm.lm_head.weight[rows], None if bias is None else bias[rows])
        logits = logits.float()
    else:
        logits = hidden.float()[:, :0]
        if not bool(torch.isfinite(hidden).all()):
            raise NonFiniteLogits('the model produced a NaN/inf hidden state (broken weights or overflow)')
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits('the model produced NaN/inf logits (broken weights or numerical overflow)')
    return logits


def _pick(logits: torch.Tensor, allowed: torch.Tensor | None) -> int:
    if allowed is None:
        return int(torch.argmax(logits))
    return int(allowed[torch.argmax(logits[allowed])])


@dataclass
class ChunkResult:
    tokens: list[int]  # generated ids: K action blocks, then 8710 when the model stopped
    forward_passes: int


def _allowed_after(
    generated: Sequence[int], n_actions_done: int, min_actions: int, max_actions: int, device: torch.device
) -> torch.Tensor:
    """The action grammar: 10004, 7 value bins, 15004, then 10004 again or 8710."""
    in_block = len(generated) % T.TOKENS_PER_ACTION
    if in_block == 0:
        if n_actions_done < min_actions:
            return torch.tensor([T.ACTION_START], device=device)
        if n_actions_done >= max_actions:
            return torch.tensor([T.END_OF_TURN], device=device)
        return torch.tensor([T.ACTION_START, T.END_OF_TURN], device=device)
    if in_block <= T.ACTION_DIMS:
        return _BIN_IDS.to(device)
    return torch.tensor([T.ACTION_END], device=device)


@torch.inference_mode()
def generate_chunk_sequential(
    lm: ChameleonForConditionalGeneration,
    prompt: Sequence[int],
    max_actions: int,
    max_tokens_per_action: int = 12,
    constrain: bool = True,
    min_actions: int = 1,
    causal: bool = False,
) -> ChunkResult:
    """The release's decoding: greedy, one token at a time, action mask, stop at 8710.

    ``constrain`` keeps every token inside the action grammar (an untrained or off-distribution
    model then still yields decodable actions) and lets the model stop only after
    ``min_actions``; with it off this is the release loop verbatim. ``causal`` drops the action
    mask (every action sees the earlier ones): the paper's ablation.
    """
    session = DecodeSession(lm, prompt, causal)
    logits = session.last_logits
    generated: list[int] = []
    passes = 1
    for _ in range(max_actions * max_tokens_per_action):
        n_done = len(generated) // T.TOKENS_PER_ACTION
        allowed = (
            _allowed_after(generated, n_done, min_actions, max_actions, session.device) if constrain else None
        )
        token = _pick(logits, allowed)
        generated.append(token)
        if token == T.END_OF_TURN:
            break
        logits = session.feed([token])
        passes += 1
    return ChunkResult(generated, passes)


@torch.inference_mode()
def generate_chunk_batched(
    lm: ChameleonForConditionalGeneration, prompt: Sequence[int], max_actions: int, min_actions: int = 1
) -> ChunkResult:
    """All K actions at once: the prompt's KV cache is shared, one row per action.

    Under the action mask, action k depends only on the prompt and on its own tokens at
    positions ``P + 9k …``, so row k keeps its own RoPE positions while its cache holds the
    prompt and its own tokens only: 9 forward passes instead of 9K, same greedy tokens as
    ``generate_chunk_sequential(constrain=True)``. Whether the chunk goes on after action k is
    read from row k's prediction after its 15004 (10004 vs 8710).
    """
    device, p, k = lm.lm_head.weight.device, len(prompt), max_actions
    session = DecodeSession(lm, prompt, prompt_logits=False)  # the first token is placed: 10004
    cache = session.cache
    cache.batch_repeat_interleave(k)
    bins = _BIN_IDS.to(device)
    stop_or_go = torch.tensor([T.ACTION_START, T.END_OF_TURN], device=device)
    placed = torch.empty(0, dtype=torch.long, device=device)
    rows = torch.arange(k, device=device)
    values = torch.empty((k, T.ACTION_DIMS), dtype=torch.long, device=device)
    inputs = torch.full((k, 1), T.ACTION_START, dtype=torch.long, device=device)
    passes = 1
    for j in range(T.TOKENS_PER_ACTION):
        positions = (p + T.TOKENS_PER_ACTION * rows + j)[:, None]
        # each row's cache is exactly prompt + its own tokens: nothing to mask
        mask = torch.zeros((k, 1, 1, p + j + 1), dtype=session.dtype, device=device)
        # only the logits this step can act on: the 256 value bins, none (15004 is placed), or 10004 vs 8710
        wanted = bins if j < T.ACTION_DIMS else (placed if j == T.ACTION_DIMS else stop_or_go)
        logits = forward_logits(lm, inputs, positions, mask, cache, wanted)
        passes += 1
        if j < T.ACTION_DIMS:
            values[:, j] = bins[torch.argmax(logits, dim=1)]
            inputs = values[:, j : j + 1]
        elif j == T.ACTION_DIMS:
            inputs = torch.full((k, 1), T.ACTION_END, dtype=torch.long, device=device)
        else:
            go_on = logits[:, 0] >= logits[:, 1]  # ties: argmax takes 10004
    return ChunkResult(chunk_tokens(values, go_on, min_actions), passes)


def chunk_tokens(values: torch.Tensor, go_on: torch.Tensor, min_actions: int) -> list[int]:
    """The chunk's tokens from K rows of decoded action values (K, 7) and each row's "another action
    follows" (K,): the chunk ends after the first action (from ``min_actions`` on) that says stop."""
    k = values.shape[0]
    go = go_on.tolist()
    n = k
    for i in range(max(min_actions, 1) - 1, k - 1):  # the last action always ends the chunk
        if not go[i]:
            n = i + 1
            break
    tokens: list[int] = []
    for row in values[:n].tolist():
        tokens.extend([T.ACTION_START, *row, T.ACTION_END])
    tokens.append(T.END_OF_TURN)
    return tokens


@dataclass
class ImageSampling:
    temperature: float = 0.0  # 0: greedy, as the release
    top_k: int = 0  # 0: no top-k
    cfg_scale: float = 1.0  # 1: no classifier-free guidance
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or self.cfg_scale < 0:
            raise ValueError('temperature, top_k and cfg_scale must be non-negative')


@torch.inference_mode()
def generate_image_block(
    lm: ChameleonForConditionalGeneration,
    prompt: Sequence[int],
    grid: int,
    grid_token: int,
    image_token_ids: torch.Tensor,
    sampling: ImageSampling | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[int]:
    """One image block after ``prompt``: ``8197, g, g, rows of codes + 8803, 8196``.

    Structure tokens are placed, not sampled (as Lumina-mGPT's image decoding does); codes are
    chosen among the 8192 image tokens only. With ``cfg_scale`` ≠ 1 the unconditional stream is the
    image block alone, from its start token on, with no BOS: the input the release's image-start-triggered
    guidance (Lumina-mGPT's) gives its unconditional pass, ``input_ids[:, image_start:]``.
    ``should_stop`` is asked before every token: True raises ``DecodeCancelled``.
    """
    sampling = sampling or ImageSampling()
    header = [T.IMAGE_START, grid_token, grid_token]
    allowed = image_token_ids.to(lm.lm_head.weight.device)
    cond = DecodeSession(lm, [*prompt, *header], vocab=allowed)  # logits of the 8192 image tokens only
    uncond = DecodeSession(lm, header, vocab=allowed) if sampling.cfg_scale != 1.0 else None
    return image_block_loop(SessionPair(cond, uncond), header, grid, allowed, sampling, should_stop)


class SessionPair:
    """Guidance's two streams as separate sessions (``last_logits``, ``feed``), fed the same tokens:
    ``cond`` after the prompt and header, ``uncond`` after the header alone, or None without guidance."""

    def __init__(self, cond: Any, uncond: Any = None) -> None:
        self.cond, self.uncond = cond, uncond

    def logits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.cond.last_logits, None if self.uncond is None else self.uncond.last_logits

    def feed(self, new_ids: list[int]) -> None:
        self.cond.feed(new_ids)
        if self.uncond is not None:
            self.uncond.feed(new_ids)


def image_block_loop(streams: Any, header: list[int], grid: int, allowed: torch.Tensor,
                     sampling: ImageSampling, should_stop: Callable[[], bool] | None) -> list[int]:
    """The image block's token loop over ``streams``: ``logits()`` gives the conditional logits and the
    unconditional ones (None without guidance) after the tokens so far, ``feed(ids)`` appends to both."""
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=allowed.device).manual_seed(sampling.seed)
    block = list(header)
    for r in range(grid):
        for c in range(grid):
            if should_stop is not None and should_stop():
                raise DecodeCancelled('image decoding cancelled')
            logits, unconditional = streams.logits()
            if unconditional is not None:
                logits = unconditional + sampling.cfg_scale * (logits - unconditional)
            token = int(allowed[sample_token(logits, sampling, generator)])
            block.append(token)
            if r == grid - 1 and c == grid - 1:
                break
            feed = [token, T.IMAGE_NEWLINE] if c == grid - 1 else [token]
            streams.feed(feed)
        block.append(T.IMAGE_NEWLINE)
    block.append(T.IMAGE_END)
    return block


def sample_token(logits: torch.Tensor, s: ImageSampling, generator: torch.Generator | None) -> int:
    if s.temperature == 0.0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(token_probs(logits, s), 1, generator=generator))


def token_probs(logits: torch.Tensor, s: ImageSampling) -> torch.Tensor:
    """The distribution a sampled token is drawn from (``temperature`` > 0, then ``top_k``), over the last axis."""
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, torch.full_like(logits, float('-inf')), logits)
    return torch.softmax(logits, dim=-1)
