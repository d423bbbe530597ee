"""A lean decode engine over a loaded Chameleon: preallocated (static) KV cache, no per-step mask
over the whole sequence, the layers' own modules and transformers' own attention function.

The eager ``ChameleonModel.forward`` spends most of a small model's decode step outside the matmuls
(cache concatenation, mask preparation, generic bookkeeping) and grows its cache by concatenation.
Here one step is the layer arithmetic only, written into a cache allocated once, so the same greedy
tokens come out faster (tests compare them with the ``DecodeSession`` path).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import ChameleonForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.chameleon.modeling_chameleon import apply_rotary_pos_emb, eager_attention_forward

from . import tokens as T
from .attention_mask import action_attention_mask_rows, additive_mask
from .generate import (
    _BIN_IDS,
    ChunkResult,
    DecodeCancelled,
    ImageSampling,
    NonFiniteLogits,
    chunk_tokens,
    image_block_loop,
)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # ChameleonRMSNorm's arithmetic, without the module call
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _head_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # ChameleonLayerNorm: statistics per head, each head's own gamma and beta
    return F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * weight + bias


def _finite_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 logits over the rows of the output projection in ``weight``; NaN/inf is an error, not a token."""
    logits = F.linear(hidden, weight, bias).float()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits('the model produced NaN/inf logits (broken weights or numerical overflow)')
    return logits


class _LayerWeights:
    """One decoder layer's parameters as the engine uses them: q, k and v projections in one matrix."""

    def __init__(self, layer: torch.nn.Module) -> None:
        attn = layer.self_attn
        if attn.q_proj.bias is not None or layer.mlp.gate_proj.bias is not None:
            raise ValueError('the decode engine supports bias-free projections (as every released checkpoint)')
        self.attn = attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv = torch.cat([m.weight.detach() for m in projections])
        at = 0
        for m in projections:  # the modules keep views into the one matrix: no second copy of the weights
            n = m.weight.shape[0]
            m.weight.data = self.qkv[at : at + n]
            at += n
        self.o_proj = attn.o_proj.weight
        self.q_norm, self.q_bias = attn.q_norm.weight, attn.q_norm.bias
        self.k_norm, self.k_bias = attn.k_norm.weight, attn.k_norm.bias
        self.input_norm, self.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.variance_epsilon
        self.mlp = layer.mlp


class StaticKVCache:
    """Keys and values of every layer, (B, H_kv, max_len, D) each, allocated once; ``length`` are valid.

    All rows share slot indices; a row's RoPE positions are the caller's (batched chunk decoding gives
    each row its own positions over a shared prompt).
    """

    def __init__(self, lm: ChameleonForConditionalGeneration, batch: int, max_len: int) -> None:
        cfg = lm.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        w = lm.lm_head.weight
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.values = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def spread_row(self, row: int = 0, count: int | None = None, length: int | None = None) -> None:
        """Copy row ``row``'s first ``length`` slots (all valid ones) to rows ``row … row + count - 1``
        (every row): a prompt prefilled once, decoded in several rows."""
        n = self.length if length is None else length
        to = slice(row, self.batch if count is None else row + count)
        self.keys[:, to, :, :n] = self.keys[:, row : row + 1, :, :n]
        self.values[:, to, :, :n] = self.values[:, row : row + 1, :, :n]


class DecodeEngine:
    """``forward`` = ``lm.model`` + a slice of ``lm.lm_head`` over a ``StaticKVCache``, for inference."""

    def __init__(self, lm: ChameleonForConditionalGeneration) -> None:
        model = lm.model
        self.lm = lm
        self.embed = model.embed_tokens
        self.weights = [_LayerWeights(layer) for layer in model.layers]
        first = model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = first.num_heads, first.num_key_value_heads, first.head_dim
        self.norm = model.norm
        self.swin = bool(lm.config.swin_norm)
        self.inv_freq = model.rotary_emb.inv_freq.float()
        self.rope_scaling = float(model.rotary_emb.attention_scaling)
        impl = lm.config._attn_implementation
        self.attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        self.device = lm.lm_head.weight.device
        self.dtype = lm.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.lm, batch, max_len)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    @torch.inference_mode()
    def hidden(self, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None, row: int = 0) -> torch.Tensor:
        """Append ``ids`` (B, Q) at RoPE ``positions`` (B, Q) to rows ``row … row + B - 1`` of ``cache``;
        the final-norm hidden states (B, Q, H). ``mask``: (B, 1, Q, length + Q) additive, or None where
        every query sees every key."""
        b, q = ids.shape
        rows = slice(row, row + b)
        start, end = cache.length, cache.length + q
        if end > cache.max_len:
            raise ValueError(f'the static cache holds {cache.max_len} tokens; {end} needed')
        cos, sin = self._rope(positions)
        x = self.embed(ids)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for i, w in enumerate(self.weights):
            residual = x
            h = x if self.swin else _rms_norm(x, w.input_norm, w.eps)
            qkv = F.linear(h, w.qkv)
            qs, ks, vs = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            qs = _head_norm(qs.reshape(-1, heads, dim), w.q_norm, w.q_bias)
            ks = _head_norm(ks.reshape(-1, kv_heads, dim), w.k_norm, w.k_bias)
            qs = qs.reshape(b, q, heads, dim).transpose(1, 2)
            ks = ks.reshape(b, q, kv_heads, dim).transpose(1, 2)
            vs = vs.reshape(b, q, kv_heads, dim).transpose(1, 2)
            qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
            cache.keys[i, rows, :, start:end] = ks
            cache.values[i, rows, :, start:end] = vs
            out, _ = self.attention(w.attn, qs, cache.keys[i, rows, :, :end], cache.values[i, rows, :, :end], mask,
                                    dropout=0.0, scaling=w.attn.scaling)
            h = F.linear(out.reshape(b, q, -1), w.o_proj)
            if self.swin:
                x = residual + _rms_norm(h, w.input_norm, w.eps)
                x = x + _rms_norm(w.mlp(x), w.post_norm, w.eps)
            else:
                x = residual + h
                x = x + w.mlp(_rms_norm(x, w.post_norm, w.eps))
        cache.length = end
        return self.norm(x)

class EngineSession:
    """One sequence (B=1) extended over a static cache, as ``generate.DecodeSession`` but faster.

    ``vocab`` limits the logits to those token ids (``last_logits[i]`` is the logit of ``vocab[i]``);
    its rows of the output projection are gathered once, not at every step.
    """

    def __init__(self, engine: DecodeEngine, prompt: list[int], max_new: int, mask_rows: Callable,
                 vocab: torch.Tensor | None = None) -> None:
        self.engine = engine
        self.mask_rows = mask_rows
        self.cache = engine.new_cache(1, len(prompt) + max_new)
        self.ids = torch.empty((1, 0), dtype=torch.long, device=engine.device)
        head = engine.lm.lm_head
        self.vocab = None if vocab is None else vocab.to(engine.device)
        self.head_weight = head.weight if self.vocab is None else head.weight[self.vocab]
        self.head_bias = head.bias if head.bias is None or self.vocab is None else head.bias[self.vocab]
        self.last_logits = self.feed(prompt)

    def feed(self, new_ids: list[int]) -> torch.Tensor:
        start = self.ids.shape[1]
        new = torch.as_tensor(new_ids, dtype=torch.long, device=self.engine.device)[None]
        self.ids = torch.cat([self.ids, new], dim=1)
        allowed = self.mask_rows(self.ids, start)
        mask = additive_mask(allowed, self.engine.dtype)
        positions = torch.arange(start, self.ids.shape[1], device=self.engine.device)[None]
        hidden = self.engine.hidden(self.cache, new, positions, mask)[:, -1]
        self.last_logits = _finite_logits(hidden, self.head_weight, self.head_bias)[0]
        return self.last_logits


@torch.inference_mode()
def engine_image_block(
    engine: DecodeEngine,
    prompt: Sequence[int],
    grid: int,
    grid_token: int,
    image_token_ids: torch.Tensor,
    sampling: ImageSampling | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[int]:
    """``generate.generate_image_block`` on the engine: the same block, token for token (greedy)."""
    sampling = sampling or ImageSampling()
    header = [T.IMAGE_START, grid_token, grid_token]
    allowed = image_token_ids.to(engine.device)
    max_new = grid * (grid + 1)
    cond = EngineSession(engine, [*prompt, *header], max_new, action_attention_mask_rows, allowed)
    uncond = None
    if sampling.cfg_scale != 1.0:
        uncond = EngineSession(engine, [T.BOS, *header], max_new, action_attention_mask_rows, allowed)
    return image_block_loop(cond, uncond, header, grid, allowed, sampling, should_stop)


@torch.inference_mode()
def engine_image_block_drafted(
    engine: DecodeEngine,
    prompt: Sequence[int],
    draft: Sequence[int],
    image_token_ids: torch.Tensor,
    window: int = 16,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[int], int]:
    """Greedy image block, verified against a draft: the same tokens as ``engine_image_block`` (greedy).

    ``draft`` is an image block of the same grid (the current frame's: most of the next frame repeats
    it). Each forward pass feeds the last decided token and the next draft tokens (up to ``window``; fewer
    while the draft fails) and keeps
    the draft up to its first token greedy decoding would not have picked, plus greedy's own token
    there (prompt-lookup / speculative decoding with the frame as the draft model). Row ends and the
    block's structure tokens are placed, as in ``generate_image_block``. Returns (block, passes).
    """
    draft = list(draft)
    if len(draft) < 4 or draft[0] != T.IMAGE_START or draft[-1] != T.IMAGE_END:
        raise ValueError('the draft must be a whole image block')
    allowed = image_token_ids.to(engine.device)
    header, body = draft[:3], draft[3:-1]  # body: rows of codes, each ending in 8803
    placed = [t == T.IMAGE_NEWLINE for t in body]
    session = EngineSession(engine, [*prompt, *header], len(body), action_attention_mask_rows, allowed)
    cache, device = session.cache, engine.device
    base = len(prompt) + len(header)  # RoPE position of body[0]
    out: list[int] = []
    next_logits = session.last_logits  # predicts body[len(out)]
    passes, width = 1, window
    jacobi: dict[int, int] = {}
    while len(out) < len(body):
        if should_stop is not None and should_stop():
            raise DecodeCancelled('image decoding cancelled')
        i = len(out)
        token = T.IMAGE_NEWLINE if placed[i] else int(allowed[torch.argmax(next_logits)])
        out.append(token)
        if len(out) == len(body):
            break
        guess = [jacobi.get(at, body[at]) for at in range(i + 1, min(i + 1 + width, len(body)))]
        feed = torch.tensor([[token, *guess]], dtype=torch.long, device=device)
        q, start = feed.shape[1], cache.length
        positions = torch.arange(base + i, base + i + q, device=device)[None]
        keys = torch.arange(start + q, device=device)
        mask = additive_mask((keys[None, :] <= keys[start:, None])[None], engine.dtype)
        logits = _finite_logits(engine.hidden(cache, feed, positions, mask)[0], session.head_weight, session.head_bias)
        picks = allowed[torch.argmax(logits, dim=1)].tolist()  # picks[j]: greedy token after feed[j]
        passes += 1
        kept = 0
        for j, g in enumerate(guess):
            if placed[i + 1 + j] or picks[j] == g:
                out.append(g)
                kept += 1
            else:
                break
        # Jacobi: past the first wrong draft token, this pass's picks are the next guesses (they saw a wrong
        # prefix, and are verified like any draft); the frame's tokens where there are none
        jacobi = {i + 1 + j: picks[j] for j in range(kept + 1, len(picks))
                  if i + 1 + j < len(body) and not placed[i + 1 + j]}
        cache.length = start + 1 + kept  # the token and the kept draft stay; the rest is overwritten later
        # a draft that keeps failing costs less checked a token at a time; one that holds, in longer runs
        width = max(1, width // 2) if kept == 0 else min(window, width * 2) if kept == len(guess) else width
        next_logits = logits[kept]
    return [*header, *out, T.IMAGE_END], passes


def engine_chunk_batched(engine: DecodeEngine, prompt: Sequence[int], max_actions: int,
                         min_actions: int = 1) -> ChunkResult:
    """``generate.generate_chunk_batched`` on the engine: the prompt prefilled once (under the action
    mask) and copied to K rows of a static cache, then 9 passes of K rows; the same tokens."""
    return engine_chunks_batched(engine, [prompt], max_actions, min_actions)[0]


@torch.inference_mode()
def engine_chunks_batched(engine: DecodeEngine, prompts: Sequence[Sequence[int]], max_actions: int,
                          min_actions: int = 1) -> list[ChunkResult]:
    """The chunks of several prompts (robots) in one batch of N×K rows: each is the chunk
    ``engine_chunk_batched`` gives for that prompt alone.

    Prompt r fills slots 0 … P_r - 1 of its K rows (one prefill each); the slots up to the longest
    prompt are masked out in its rows; the 9 decode passes then run all N×K rows at once, each row at
    its own RoPE positions, so a decode step costs one pass whatever N is.
    """
    device, k, n = engine.device, max_actions, len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    cache = engine.new_cache(n * k, longest + T.TOKENS_PER_ACTION)
    for r, prompt in enumerate(prompts):
        ids = torch.as_tensor(list(prompt), dtype=torch.long, device=device)[None]
        cache.length = 0
        mask = additive_mask(action_attention_mask_rows(ids, 0), engine.dtype)
        last = engine.hidden(cache, ids, torch.arange(len(prompt), device=device)[None], mask, row=r * k)[:, -1]
        if not bool(torch.isfinite(last).all()):
            raise NonFiniteLogits('the model produced a NaN/inf hidden state (broken weights or overflow)')
        cache.spread_row(r * k, k, len(prompt))
    cache.length = longest
    p_row = torch.tensor(lengths, device=device).repeat_interleave(k)  # each row's prompt length
    slots = torch.arange(longest + T.TOKENS_PER_ACTION, device=device)
    gap = (slots[None, :] >= p_row[:, None]) & (slots[None, :] < longest)  # padding after a shorter prompt
    full_mask = torch.where(gap, torch.finfo(engine.dtype).min, 0.0).to(engine.dtype)[:, None, None, :]
    head = engine.lm.lm_head
    bins = _BIN_IDS.to(device)
    stop_or_go = torch.tensor([T.ACTION_START, T.END_OF_TURN], device=device)
    bin_head, stop_head = head.weight[bins], head.weight[stop_or_go]
    bin_bias, stop_bias = (None, None) if head.bias is None else (head.bias[bins], head.bias[stop_or_go])
    action_index = torch.arange(k, device=device).repeat(n)
    values = torch.empty((n * k, T.ACTION_DIMS), dtype=torch.long, device=device)
    inputs = torch.full((n * k, 1), T.ACTION_START, dtype=torch.long, device=device)
    for j in range(T.TOKENS_PER_ACTION):
        positions = (p_row + T.TOKENS_PER_ACTION * action_index + j)[:, None]
        hidden = engine.hidden(cache, inputs, positions, full_mask[..., : longest + j + 1])[:, -1]
        logits = _finite_logits(hidden, *((bin_head, bin_bias) if j < T.ACTION_DIMS else (stop_head, stop_bias)))
        if j < T.ACTION_DIMS:
            values[:, j] = bins[torch.argmax(logits, dim=1)]
            inputs = values[:, j : j + 1]
        elif j == T.ACTION_DIMS:
            inputs = torch.full((n * k, 1), T.ACTION_END, dtype=torch.long, device=device)
        else:
            go_on = logits[:, 0] >= logits[:, 1]  # ties: argmax takes 10004
    return [ChunkResult(chunk_tokens(values[r * k : (r + 1) * k], go_on[r * k : (r + 1) * k], min_actions),
                        1 + T.TOKENS_PER_ACTION) for r in range(n)]
