"""A lean decode engine over a loaded Chameleon: preallocated (static) KV cache, no per-step mask
over the whole sequence, the layers' own modules and transformers' own attention function.

The eager ``ChameleonModel.forward`` spends most of a small model's decode step outside the matmuls
(cache concatenation, mask preparation, generic bookkeeping) and grows its cache by concatenation.
Here one step is the layer arithmetic only, written into a cache allocated once, so the same greedy
tokens come out faster (tests compare them with the ``DecodeSession`` path).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import ChameleonForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.chameleon.modeling_chameleon import apply_rotary_pos_emb, eager_attention_forward

from . import tokens as T
from .attention_mask import action_attention_mask_rows, additive_mask, causal_mask_rows
from .generate import (
    _BIN_IDS,
    ChunkResult,
    DecodeCancelled,
    ImageSampling,
    NonFiniteLogits,
    SessionPair,
    chunk_tokens,
    image_block_loop,
    sample_token,
    token_probs,
)

CACHE_BUCKET = 64  # captured chunk caches: lengths in steps of this, so a new instruction seldom means a new shape
POOL = 4  # captured chunk caches kept (one per shape: rows × length)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # ChameleonRMSNorm's arithmetic, without the module call
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _head_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # ChameleonLayerNorm: statistics per head, each head's own gamma and beta
    return F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * weight + bias


def _head_rows(engine: DecodeEngine, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight and bias limited to token ids ``rows`` (all of it for None): gathered once,
    not at every step."""
    head = engine.lm.lm_head
    if rows is None:
        return head.weight, head.bias
    rows = rows.to(engine.device)
    return head.weight[rows], None if head.bias is None else head.bias[rows]


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


class ChunkCache:
    """The caches of one batch of chunks: each robot's prompt once (``prefix``: N rows, slots past a prompt
    masked) and each action row's own decoded tokens (``suffix``: N×K rows, one slot per token of an action).
    The K rows of a robot read its prompt's keys and values once, not K copies of them."""

    def __init__(self, lm: ChameleonForConditionalGeneration, robots: int, actions: int, prompt_slots: int) -> None:
        self.prefix = StaticKVCache(lm, robots, prompt_slots)
        self.suffix = StaticKVCache(lm, robots * actions, T.TOKENS_PER_ACTION)
        self.graphs: dict[tuple, _GraphedStep] = {}  # decode steps recorded on this cache, by input shapes

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.prefix.keys, self.prefix.values, self.suffix.keys, self.suffix.values

    def zero_(self) -> None:
        for t in self.tensors():
            t.zero_()


class RecordingGuard:
    """Keeps a CUDA graph's recording apart from device work other threads do outside the policy's lock (a
    fleet's robots encode and prefill in their own threads): a kernel launched on the default stream or
    memory allocated by another thread while a graph records breaks the recording (CUDA's global capture
    mode). ``shared`` holders run side by side; ``exclusive`` (a recording) waits until they are done, and
    new ones wait while it waits or runs, so a recording is never starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _GraphedStep:
    """A decode step recorded as a CUDA graph for one cache and one set of input shapes: ``fixed`` (the cache)
    is used in place, a call copies the ``inputs`` into the graph's own and replays it (one launch instead of
    one per kernel)."""

    def __init__(self, step: Callable[..., torch.Tensor], fixed: Sequence[torch.Tensor],
                 inputs: Sequence[torch.Tensor]) -> None:
        self.inputs = [t.clone() for t in inputs]
        device = self.inputs[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # lazy initialization (handles, workspaces) outside the recording
            step(*fixed, *self.inputs)  # writes this step's own keys and values, as the replay will
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(*fixed, *self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.out


def shared_prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor,
                            suffix_v: torch.Tensor, prefix_mask: torch.Tensor, suffix_mask: torch.Tensor,
                            scaling: float) -> torch.Tensor:
    """Attention of one new token in each of N×K rows whose keys are their robot's prompt (shared by its K rows)
    and their own suffix: one softmax over both, as eager attention over the concatenation, but each prompt's
    keys and values are read once for its K rows. q (N·K, H, 1, D); prefix (N, H_kv, P, D) with ``prefix_mask``
    (N, 1, 1, P); suffix (N·K, H_kv, S, D) with ``suffix_mask`` (N·K, 1, 1, S). Returns (N·K, 1, H, D)."""
    nk, heads, _, dim = q.shape
    n = prefix_k.shape[0]
    groups = heads // prefix_k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves ``groups`` query heads
        prefix_k, prefix_v, suffix_k, suffix_v = (t.repeat_interleave(groups, dim=1)
                                                  for t in (prefix_k, prefix_v, suffix_k, suffix_v))
    grouped = q.reshape(n, nk // n, heads, dim).transpose(1, 2)  # (N, H, K, D)
    scores_prefix = torch.matmul(grouped, prefix_k.transpose(2, 3)) * scaling + prefix_mask  # (N, H, K, P)
    scores_suffix = torch.matmul(q, suffix_k.transpose(2, 3)) * scaling + suffix_mask  # (N·K, H, 1, S)
    scores_suffix = scores_suffix.reshape(n, nk // n, heads, -1).transpose(1, 2)  # (N, H, K, S)
    weights = torch.softmax(torch.cat([scores_prefix, scores_suffix], dim=-1), dim=-1, dtype=torch.float32)
    weights_prefix, weights_suffix = weights.to(q.dtype).split([prefix_k.shape[2], suffix_k.shape[2]], dim=-1)
    out = torch.matmul(weights_prefix, prefix_v).transpose(1, 2).reshape(nk, heads, dim)
    own = torch.matmul(weights_suffix.transpose(1, 2).reshape(nk, heads, 1, -1), suffix_v).reshape(nk, heads, dim)
    return (out + own)[:, None]


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
        self.causal_without_mask = impl == 'sdpa'  # sdpa applies is_causal itself when given no mask
        self.device = lm.lm_head.weight.device
        self.dtype = lm.lm_head.weight.dtype
        self.captured: str | None = None  # 'cuda_graph', 'compile' or None (``capture``)
        self.capture_error: str | None = None  # why a captured step fell back to the uncaptured one
        self._compiled_step: Callable | None = None
        self._pool: dict[tuple[int, int, int], ChunkCache] = {}
        self.recording = RecordingGuard()  # device work outside the policy's lock: ``recording.shared()``

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.lm, batch, max_len)

    def prompt_mask(self, ids: torch.Tensor, mask_rows: Callable = action_attention_mask_rows) -> torch.Tensor | None:
        """The additive mask of prompt ``ids`` (B, P) prefilled from slot 0, or None where it is plainly causal
        (at most one action block: no action can be hidden from another) and the attention function applies
        causality itself with its causal kernel (sdpa: 9.6 → 6.5 ms for the tiny model's 617-token prompt on
        one CPU thread, the same hidden states)."""
        if self.causal_without_mask and (mask_rows is causal_mask_rows
                                         or int((ids == T.ACTION_START).sum(dim=1).max()) <= 1):
            return None
        return additive_mask(mask_rows(ids, 0), self.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    @torch.inference_mode()
    def hidden(self, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None, row: int = 0) -> torch.Tensor:
        """Append ``ids`` (B, Q) at RoPE ``positions`` (B, Q) to rows ``row … row + B - 1`` of ``cache``;
        the final-norm hidden states (B, Q, H). ``mask``: (B, 1, Q, length + Q) additive, or None for a
        plainly causal prompt from slot 0 (``prompt_mask``)."""
        b, q = ids.shape
        rows = slice(row, row + b)
        start, end = cache.length, cache.length + q
        if end > cache.max_len:
            raise ValueError(f'the static cache holds {cache.max_len} tokens; {end} needed')
        if mask is None and (start > 0 or not self.causal_without_mask):
            raise ValueError('no mask: only for a prompt from slot 0 on an attention that applies causality')

        def attend(i: int, w: _LayerWeights, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
            cache.keys[i, rows, :, start:end] = ks
            cache.values[i, rows, :, start:end] = vs
            return self.attention(w.attn, qs, cache.keys[i, rows, :, :end], cache.values[i, rows, :, :end], mask,
                                  dropout=0.0, scaling=w.attn.scaling)[0]

        out = self._layers(ids, positions, attend)
        cache.length = end
        return out

    @torch.inference_mode()
    def chunk_step(self, cache: ChunkCache, step: int, ids: torch.Tensor, positions: torch.Tensor,
                   prefix_mask: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
        """Token ``step`` of the current action in every row of ``cache`` (``ids``, ``positions``: (N·K, 1)),
        attending to the row's robot's prompt (``prefix_mask`` (N, 1, 1, P)) and to its own tokens
        (``suffix_mask`` (N·K, 1, 1, S): slots past ``step`` masked). The shapes stay the same from step to
        step, which is what lets ``capture`` record it once. The final-norm hidden states (N·K, H)."""
        slot = torch.full((1,), step, dtype=torch.long, device=self.device)
        inputs = (ids, positions, slot, prefix_mask, suffix_mask)
        args = (*cache.tensors(), *inputs)
        if self.captured == 'cuda_graph':
            shapes = tuple(tuple(t.shape) for t in inputs)
            graph = cache.graphs.get(shapes)
            if graph is None:
                try:
                    with self.recording.exclusive():
                        graph = cache.graphs[shapes] = _GraphedStep(self._chunk_step_eager, cache.tensors(), inputs)
                except Exception as exc:  # a step CUDA cannot record: run it uncaptured from now on
                    self.release_capture(exc)
            out = graph(*inputs) if graph is not None else self._chunk_step_eager(*args)
        elif self.captured == 'compile':
            try:
                out = self._compiled_step(*args)
            except Exception as exc:  # no compiler here for this device or model: the first call fails
                self.release_capture(exc)
                out = self._chunk_step_eager(*args)
        else:
            out = self._chunk_step_eager(*args)
        return out[:, -1]

    def _chunk_step_eager(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor,
                          suffix_v: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                          prefix_mask: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
        def attend(i: int, w: _LayerWeights, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
            suffix_k[i][:, :, slot] = ks
            suffix_v[i][:, :, slot] = vs
            return shared_prefix_attention(qs, prefix_k[i], prefix_v[i], suffix_k[i], suffix_v[i], prefix_mask,
                                           suffix_mask, w.attn.scaling)

        return self._layers(ids, positions, attend)

    def capture(self, how: str, mode: str | None = None, backend: str | Callable = 'inductor') -> None:
        """Record the chunk decode step once per shape instead of launching its kernels one by one from Python:
        'cuda_graph' (a CUDA graph per shape and cache, replayed from any thread; CUDA devices only) or
        'compile' (``torch.compile`` with ``mode`` and ``backend``: fused kernels, any device). Chunk caches
        then come from a pool, prompts' slots in steps of ``CACHE_BUCKET``, so that a node sees few shapes and a
        cache keeps its address. A step that cannot be recorded or compiled runs uncaptured from then on
        (``capture_error`` says why)."""
        if how not in ('cuda_graph', 'compile'):
            raise ValueError(f"capture: 'cuda_graph' or 'compile', got {how!r}")
        if how == 'cuda_graph' and self.device.type != 'cuda':
            raise ValueError(f'CUDA graphs need a CUDA device; the model is on {self.device}')
        if how == 'compile':
            # dynamo keeps compiled code per Python function, up to a recompile limit, across engines: start afresh
            torch._dynamo.reset()
            self._compiled_step = torch.compile(self._chunk_step_eager, mode=mode, backend=backend, dynamic=False,
                                                fullgraph=True)
        self.captured, self.capture_error = how, None

    def auto_capture(self) -> str:
        """What ``decode_capture: auto`` means here: CUDA graphs on a CUDA device; 'off' on a CPU, where compiling
        takes seconds at start-up and again for every new shape."""
        return 'cuda_graph' if self.device.type == 'cuda' else 'off'

    def release_capture(self, reason: BaseException | str | None = None) -> None:
        """Back to the uncaptured step (and fresh caches): after a failed capture (``reason``: why), or when asked."""
        if isinstance(reason, BaseException):
            reason = f'{type(reason).__name__}: {str(reason)[:300]}'
        self.captured, self.capture_error = None, reason
        self._compiled_step = None
        self._pool.clear()

    def chunk_cache(self, robots: int, actions: int, prompt_slots: int) -> ChunkCache:
        """Caches for a batch of chunks: new ones, or with a captured step the pool's of that shape (prompt slots
        rounded up to ``CACHE_BUCKET``); the pool keeps the last ``POOL`` shapes, with their graphs."""
        if self.captured is None:
            return ChunkCache(self.lm, robots, actions, prompt_slots)
        key = (robots, actions, -(-prompt_slots // CACHE_BUCKET) * CACHE_BUCKET)
        cache = self._pool.pop(key, None)
        if cache is None:
            cache = ChunkCache(self.lm, *key)
        self._pool[key] = cache  # the newest last: the oldest shape leaves first
        while len(self._pool) > POOL:
            self._pool.pop(next(iter(self._pool)))
        return cache

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor,
                attend: Callable[[int, _LayerWeights, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        """The decoder over ``ids`` (B, Q); ``attend(layer, weights, q, k, v)`` stores the new keys and values
        and returns the attention output (B, Q, H, D)."""
        b, q = ids.shape
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
            out = attend(i, w, qs, ks, vs)
            h = F.linear(out.reshape(b, q, -1), w.o_proj)
            if self.swin:
                x = residual + _rms_norm(h, w.input_norm, w.eps)
                x = x + _rms_norm(w.mlp(x), w.post_norm, w.eps)
            else:
                x = residual + h
                x = x + w.mlp(_rms_norm(x, w.post_norm, w.eps))
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
        self.head_weight, self.head_bias = _head_rows(engine, vocab)
        self.last_logits = self.feed(prompt)

    def feed(self, new_ids: list[int]) -> torch.Tensor:
        start = self.ids.shape[1]
        new = torch.as_tensor(new_ids, dtype=torch.long, device=self.engine.device)[None]
        self.ids = torch.cat([self.ids, new], dim=1)
        if start == 0:
            mask = self.engine.prompt_mask(self.ids, self.mask_rows)
        else:
            mask = additive_mask(self.mask_rows(self.ids, start), self.engine.dtype)
        positions = torch.arange(start, self.ids.shape[1], device=self.engine.device)[None]
        hidden = self.engine.hidden(self.cache, new, positions, mask)[:, -1]
        self.last_logits = _finite_logits(hidden, self.head_weight, self.head_bias)[0]
        return self.last_logits


class EngineRowsSession:
    """Several sequences decoded as the rows of one static cache, fed the same tokens: one pass a step.

    Classifier-free guidance's two streams (the prompt followed by the image block, and the image block alone
    from its start token, as the release's guidance builds its unconditional input) are its use. Row r's
    prompt fills slots 0 … P_r - 1 of its row, the slots past it up to the longest
    prompt are masked out in that row and each row keeps its own RoPE positions (as the batched chunk
    decoding), so each row's logits are those of its sequence decoded alone.
    """

    def __init__(self, engine: DecodeEngine, prompts: Sequence[Sequence[int]], max_new: int,
                 vocab: torch.Tensor | None = None) -> None:
        self.engine = engine
        device = engine.device
        self.prompt_lengths = [len(p) for p in prompts]
        self.longest = max(self.prompt_lengths)
        self.cache = engine.new_cache(len(prompts), self.longest + max_new)
        self.ids = [torch.as_tensor(list(p), dtype=torch.long, device=device)[None] for p in prompts]
        self.head_weight, self.head_bias = _head_rows(engine, vocab)
        last = [_prefill(engine, self.cache, p, row=r) for r, p in enumerate(prompts)]
        self.cache.length = self.longest
        self.last_logits = _finite_logits(torch.cat(last), self.head_weight, self.head_bias)  # (rows, vocab)

    def logits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row 0's logits and row 1's (None with one row): the conditional and unconditional streams."""
        return self.last_logits[0], self.last_logits[1] if len(self.ids) > 1 else None

    def feed(self, new_ids: list[int]) -> torch.Tensor:
        device, q = self.engine.device, len(new_ids)
        new = torch.as_tensor(new_ids, dtype=torch.long, device=device)[None]
        masks, positions = [], []
        for r, p in enumerate(self.prompt_lengths):
            start = self.ids[r].shape[1]
            self.ids[r] = torch.cat([self.ids[r], new], dim=1)
            allowed = action_attention_mask_rows(self.ids[r], start)  # (1, q, start + q) over the row's own positions
            gap = torch.zeros((1, q, self.longest - p), dtype=torch.bool, device=device)
            masks.append(torch.cat([allowed[..., :p], gap, allowed[..., p:]], dim=-1))
            positions.append(torch.arange(start, start + q, device=device))
        mask = additive_mask(torch.cat(masks), self.engine.dtype)
        ids = new.expand(len(self.ids), q)
        hidden = self.engine.hidden(self.cache, ids, torch.stack(positions), mask)[:, -1]
        self.last_logits = _finite_logits(hidden, self.head_weight, self.head_bias)
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
    if sampling.cfg_scale == 1.0:
        streams = SessionPair(EngineSession(engine, [*prompt, *header], max_new, action_attention_mask_rows, allowed))
    else:  # guidance: both streams in one batch of two rows, one pass a token
        streams = EngineRowsSession(engine, [[*prompt, *header], header], max_new, allowed)
    return image_block_loop(streams, header, grid, allowed, sampling, should_stop)


def speculative_pick(p: torch.Tensor, draft: int | None, generator: torch.Generator | None) -> int | None:
    """Speculative sampling's test of a draft that is one token for sure, at one place whose distribution is ``p``
    (1-D; ``draft`` its index, None for a token ``p`` cannot give): None keeps the draft (probability p(draft)),
    else the index drawn instead from p without the draft, renormalized. Either way the token there has
    distribution exactly ``p``."""
    if draft is not None and bool(torch.rand((), generator=generator, device=p.device) < p[draft]):
        return None
    if draft is not None:
        p = p.clone()
        p[draft] = 0.0
    return int(torch.multinomial(p, 1, generator=generator))


@torch.inference_mode()
def engine_image_block_drafted(
    engine: DecodeEngine,
    prompt: Sequence[int],
    draft: Sequence[int],
    image_token_ids: torch.Tensor,
    window: int = 16,
    should_stop: Callable[[], bool] | None = None,
    sampling: ImageSampling | None = None,
) -> tuple[list[int], int]:
    """An image block verified against a draft: greedy, the same tokens as ``engine_image_block``; sampled
    (``sampling.temperature`` > 0, no guidance), the same distribution.

    ``draft`` is an image block of the same grid (the current frame's: most of the next frame repeats
    it). Each forward pass feeds the last decided token and the next draft tokens (up to ``window``; fewer
    while the draft fails) and keeps the draft up to its first token decoding would not have produced there,
    plus decoding's own token at that place (prompt-lookup / speculative decoding with the frame as the draft
    model). Greedy keeps a draft token where it is the argmax. Sampling keeps draft token d with probability
    p(d) and, where it does not, draws the token from p without d (renormalized): speculative sampling with a
    draft that is one token for sure, so every token has exactly the distribution p it would have decoded
    one at a time. Row ends and the block's structure tokens are placed, as in ``generate_image_block``.
    Returns (block, passes).
    """
    draft = list(draft)
    if len(draft) < 4 or draft[0] != T.IMAGE_START or draft[-1] != T.IMAGE_END:
        raise ValueError('the draft must be a whole image block')
    sampled = sampling is not None and sampling.temperature > 0.0
    if sampling is not None and sampling.cfg_scale != 1.0:
        raise ValueError('drafted decoding does not take guidance (cfg_scale ≠ 1): use engine_image_block')
    generator = None
    if sampled and sampling.seed is not None:
        generator = torch.Generator(device=engine.device).manual_seed(sampling.seed)
    allowed = image_token_ids.to(engine.device)
    index_of = {int(t): i for i, t in enumerate(allowed.tolist())} if sampled else {}  # token → logits index
    header, body = draft[:3], draft[3:-1]  # body: rows of codes, each ending in 8803
    placed = [t == T.IMAGE_NEWLINE for t in body]
    session = EngineSession(engine, [*prompt, *header], len(body), action_attention_mask_rows, allowed)
    cache, device = session.cache, engine.device
    base = len(prompt) + len(header)  # RoPE position of body[0]
    out: list[int] = []
    next_logits = session.last_logits  # predicts body[len(out)]
    decided: int | None = None  # a token already drawn for body[len(out)] (after a refused draft token)
    passes, width = 1, window
    jacobi: dict[int, int] = {}
    while len(out) < len(body):
        if should_stop is not None and should_stop():
            raise DecodeCancelled('image decoding cancelled')
        i = len(out)
        if placed[i]:
            token = T.IMAGE_NEWLINE
        elif decided is not None:
            token = decided
        elif sampled:
            token = int(allowed[sample_token(next_logits, sampling, generator)])
        else:
            token = int(allowed[torch.argmax(next_logits)])
        out.append(token)
        decided = None
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
        probs = token_probs(logits, sampling) if sampled else None
        passes += 1
        kept = 0
        for j, g in enumerate(guess):
            if placed[i + 1 + j]:
                ok = True
            elif probs is None:
                ok = picks[j] == g
            else:
                instead = speculative_pick(probs[j], index_of.get(g), generator)
                ok = instead is None
                if not ok:
                    decided = int(allowed[instead])
            if not ok:
                break
            out.append(g)
            kept += 1
        # Jacobi: past the first refused draft token, this pass's picks are the next guesses (they saw a wrong
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
                          min_actions: int = 1, prefilled: Sequence[StaticKVCache] | None = None
                          ) -> list[ChunkResult]:
    """The chunks of several prompts (robots) in one batch of N×K rows: each is the chunk
    ``engine_chunk_batched`` gives for that prompt alone.

    Prompt r is prefilled once into row r of the prompt cache (slots past it masked in its rows); the 9
    decode passes then run all N×K rows at once (``chunk_step``: the same shapes every pass), each row at its
    own RoPE positions and reading its robot's prompt once for its K rows, so a decode step costs one pass
    whatever N is. ``prefilled``: the prompts' caches from ``prefill_prompt`` (copied in, not computed again).
    """
    if prefilled is not None:
        if len(prefilled) != len(prompts):
            raise ValueError(f'{len(prefilled)} prefilled caches for {len(prompts)} prompts')
        for r, (own, prompt) in enumerate(zip(prefilled, prompts, strict=True)):
            if own.length != len(prompt) or own.batch != 1:
                raise ValueError(f'prefilled cache {r} holds {own.batch} row(s) of {own.length} tokens; '
                                 f'its prompt has {len(prompt)}')
    cache = engine.chunk_cache(len(prompts), max_actions, max(len(p) for p in prompts))
    try:
        return _chunks_on(engine, cache, prompts, max_actions, min_actions, prefilled)
    except Exception:
        cache.zero_()  # a pooled cache is used again: NaN left here would poison the masked slots of the next
        raise


def _prefill(engine: DecodeEngine, cache: StaticKVCache, prompt: Sequence[int], row: int = 0) -> torch.Tensor:
    """``prompt`` into row ``row`` of ``cache`` from slot 0; its last position's hidden state (1, H)."""
    ids = torch.as_tensor(list(prompt), dtype=torch.long, device=engine.device)[None]
    cache.length = 0
    last = engine.hidden(cache, ids, torch.arange(len(prompt), device=engine.device)[None],
                         engine.prompt_mask(ids), row=row)[:, -1]
    if not bool(torch.isfinite(last).all()):
        raise NonFiniteLogits('the model produced a NaN/inf hidden state (broken weights or overflow)')
    return last


@torch.inference_mode()
def prefill_prompt(engine: DecodeEngine, prompt: Sequence[int]) -> StaticKVCache:
    """An action prompt's keys and values in a cache of its own (one row, the prompt's length), for its chunk
    decoded later among others (``engine_chunks_batched(prefilled=…)``). It touches nothing shared, so each
    robot's thread may prefill its own prompt while other prompts are prefilled or decoded."""
    cache = engine.new_cache(1, len(prompt))
    _prefill(engine, cache, prompt)
    return cache


def _chunks_on(engine: DecodeEngine, cache: ChunkCache, prompts: Sequence[Sequence[int]], max_actions: int,
               min_actions: int, prefilled: Sequence[StaticKVCache] | None) -> list[ChunkResult]:
    device, k, n = engine.device, max_actions, len(prompts)
    lengths = [len(p) for p in prompts]
    for r, prompt in enumerate(prompts):
        if prefilled is None:
            _prefill(engine, cache.prefix, prompt, row=r)
        else:
            own = prefilled[r]
            cache.prefix.keys[:, r, :, : own.length] = own.keys[:, 0, :, : own.length]
            cache.prefix.values[:, r, :, : own.length] = own.values[:, 0, :, : own.length]
    blocked = torch.finfo(engine.dtype).min
    slots = torch.arange(cache.prefix.max_len, device=device)
    prompt_lengths = torch.tensor(lengths, device=device)
    prompt_mask = torch.where(slots[None, :] >= prompt_lengths[:, None], blocked, 0.0)
    prompt_mask = prompt_mask.to(engine.dtype)[:, None, None, :]  # (N, 1, 1, P): slots past each prompt
    own = torch.arange(T.TOKENS_PER_ACTION, device=device)
    p_row = prompt_lengths.repeat_interleave(k)  # each row's prompt length
    bins = _BIN_IDS.to(device)
    bin_head, bin_bias = _head_rows(engine, bins)
    stop_head, stop_bias = _head_rows(engine, torch.tensor([T.ACTION_START, T.END_OF_TURN], device=device))
    action_index = torch.arange(k, device=device).repeat(n)
    values = torch.empty((n * k, T.ACTION_DIMS), dtype=torch.long, device=device)
    inputs = torch.full((n * k, 1), T.ACTION_START, dtype=torch.long, device=device)
    for j in range(T.TOKENS_PER_ACTION):
        positions = (p_row + T.TOKENS_PER_ACTION * action_index + j)[:, None]
        suffix_mask = torch.where(own > j, blocked, 0.0).to(engine.dtype).expand(n * k, 1, 1, -1)
        hidden = engine.chunk_step(cache, j, inputs, positions, prompt_mask, suffix_mask)
        logits = _finite_logits(hidden, *((bin_head, bin_bias) if j < T.ACTION_DIMS else (stop_head, stop_bias)))
        if j < T.ACTION_DIMS:
            values[:, j] = bins[torch.argmax(logits, dim=1)]
            inputs = values[:, j : j + 1].contiguous()  # the same strides every step: one captured shape
        elif j == T.ACTION_DIMS:
            inputs = torch.full((n * k, 1), T.ACTION_END, dtype=torch.long, device=device)
        else:
            go_on = logits[:, 0] >= logits[:, 1]  # ties: argmax takes 10004
    return [ChunkResult(chunk_tokens(values[r * k : (r + 1) * k], go_on[r * k : (r + 1) * k], min_actions),
                        1 + T.TOKENS_PER_ACTION) for r in range(n)]
