"""The object the nodes, the bag evaluation and the benchmarks share: frames in, actions out."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tokens as T
from .action_tokenizer import ActionTokenizer
from .checkpoint import (
    CheckpointError,
    find_checkpoint_files,
    load_backbone,
    load_vqgan,
    model_id_of,
    read_config,
    resolve_device,
    resolve_dtype,
    weights_fingerprint,
    worldvla_settings,
)
from .config import WorldVLAConfig
from .engine import (
    DecodeEngine,
    StaticKVCache,
    engine_chunk_batched,
    engine_chunks_batched,
    engine_image_block,
    engine_image_block_drafted,
    prefill_prompt,
)
from .generate import ImageSampling, generate_chunk_batched, generate_chunk_sequential, generate_image_block
from .image_tokenizer import ImageTokenizer, to_model_frame
from .likelihood import CodeLikelihood, next_block_likelihood, still_action
from .prompts import action_prompt, check_instruction, world_model_prompt
from .text_tokenizer import TextTokenizer


@dataclass
class Timing:
    """Wall time of the last call, seconds."""

    tokenize_s: float = 0.0
    generate_s: float = 0.0
    decode_s: float = 0.0
    forward_passes: int = 0
    prompt_tokens: int = 0

    @property
    def total_s(self) -> float:
        return self.tokenize_s + self.generate_s + self.decode_s


@dataclass
class PreparedChunk:
    """A request ready for batched decoding (``WorldVLAPolicy.prepare_chunk``): its prompt, prefilled."""

    prompt: list[int]
    cache: StaticKVCache  # the prompt's keys and values, one row
    tokenize_s: float
    prefill_s: float


@dataclass
class ActionPrediction:
    actions: np.ndarray  # (K, 7) un-normalized
    tokens: list[int]
    timing: Timing = field(default_factory=Timing)


class WorldVLAPolicy:
    """One loaded checkpoint: ``predict_actions`` (action model) and ``imagine`` (world model).

    Calls are serialized by a lock, so one policy may serve several threads; ``prepare_chunk`` runs beside them.
    """

    def __init__(
        self,
        lm: Any,
        image_tokenizer: ImageTokenizer,
        text_tokenizer: TextTokenizer,
        config: WorldVLAConfig,
        model_id: str,
    ) -> None:
        self.lm = lm
        self.images = image_tokenizer
        self.text = text_tokenizer
        self.actions = ActionTokenizer(config.action_min, config.action_max)
        self.config = config
        self.model_id = model_id
        self.weights_digest = ''  # load_policy: checkpoint.weights_fingerprint
        self.device = lm.lm_head.weight.device
        self.dtype = lm.lm_head.weight.dtype
        self.last_timing = Timing()
        self._lock = threading.Lock()
        self._image_ids = torch.as_tensor(image_tokenizer.image_token_ids, device=self.device)
        self._blocks: OrderedDict[bytes, list[int]] = OrderedDict()  # frame content → its image block
        self._blocks_lock = threading.Lock()
        self.engine = DecodeEngine(lm)
        # world-model decoding: 'drafted' (verified against the current frame's tokens; guidance falls back
        # to 'engine'), 'engine' (static cache, one token a step) or 'reference' (transformers' forward, one
        # token a step); all three give the same greedy tokens, and sampled ones of the same distribution
        self.image_decoding = 'drafted'
        self.draft_window = 32
        self.chunk_decoding = 'engine'  # batched action chunks on the engine, or 'reference' (transformers)
        self.block_cache_frames = config.history_frames + 2  # frames whose tokens are kept (more when shared)

    def use_cpu_threads(self, threads: int) -> None:
        """On a CPU device, torch's intra-op threads for the calling thread's model work (0: torch's default).
        Measured here (2 cores, bundled model): a predict off the main thread took 57 ms with 2 OpenMP
        threads and 23 ms with 1 (the OpenMP teams of two threads compete); a node's worker calls this."""
        if threads > 0 and self.device.type == 'cpu':
            torch.set_num_threads(threads)

    def encode_frames(self, frames: Sequence[np.ndarray]) -> list[list[int]]:
        """Image blocks of ``frames``, each encoded on its own (as the release tokenizes images) and only once:
        a history frame's tokens are reused from the call that encoded it, found by the frame's content (an
        array changed in place is encoded again)."""
        out = []
        for frame in frames:
            a = np.ascontiguousarray(frame)
            h = hashlib.blake2b(repr((a.shape, a.dtype.str)).encode(), digest_size=16)
            h.update(a.data)
            key = h.digest()
            with self._blocks_lock:
                block = self._blocks.get(key)
                if block is not None:
                    self._blocks.move_to_end(key)
            if block is None:  # encoded outside the lock: robots of a fleet encode their frames side by side
                block = self.images.encode([a])[0]
                with self._blocks_lock:
                    self._blocks[key] = block
                    while len(self._blocks) > self.block_cache_frames:
                        self._blocks.popitem(last=False)
            out.append(block)
        return out

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def check_instruction(self, instruction: str) -> str:
        """Whitespace collapsed; empty, over-long and control-character text refused (ValueError)."""
        return check_instruction(instruction, self.config.max_instruction_chars)

    def check_request(self, frames: Sequence[np.ndarray], instruction: str) -> tuple[list[np.ndarray], str]:
        """The frames the model reads (the newest ``history_frames``) and the checked instruction;
        ValueError for no frame or an instruction ``check_instruction`` refuses."""
        instruction = self.check_instruction(instruction)
        if len(frames) == 0:
            raise ValueError('at least one frame is needed')
        return list(frames)[-self.config.history_frames :], instruction

    def model_frame(self, frame: np.ndarray) -> np.ndarray:
        """The square, model-resolution crop of a camera frame, not yet rotated: all the model will
        ever read of it, so a node may keep this instead of the full frame (same tokens)."""
        return to_model_frame(frame, self.resolution, rotate_180=False)

    def predict(
        self,
        frames: Sequence[np.ndarray],
        instruction: str,
        *,
        batched: bool = True,
        constrain: bool = True,
        action_mask: bool = True,
    ) -> ActionPrediction:
        """Frames (H×W×3 uint8 RGB, oldest first; the last ``history_frames`` are used).

        ``action_mask=False`` decodes with plain causal attention (sequentially), the ablation.
        """
        c = self.config
        frames, instruction = self.check_request(frames, instruction)
        with self._lock:
            t0 = time.perf_counter()
            blocks = self.encode_frames(frames)
            prompt = action_prompt(self.text, blocks, instruction, self.config.action_prompt)
            t1 = time.perf_counter()
            if batched and action_mask and self.chunk_decoding == 'engine':
                result = engine_chunk_batched(self.engine, prompt, c.chunk_size, c.min_actions)
            elif batched and action_mask:
                result = generate_chunk_batched(self.lm, prompt, c.chunk_size, c.min_actions)
            else:
                result = generate_chunk_sequential(
                    self.lm, prompt, c.chunk_size, c.max_tokens_per_action, constrain, c.min_actions,
                    causal=not action_mask,
                )
            self._sync()
            t2 = time.perf_counter()
            actions = self.actions.decode(result.tokens)
            t3 = time.perf_counter()
        timing = Timing(t1 - t0, t2 - t1, t3 - t2, result.forward_passes, len(prompt))
        self.last_timing = timing
        return ActionPrediction(actions, result.tokens, timing)

    def predict_many(self, requests: Sequence[tuple[Sequence[np.ndarray], str]]) -> list[ActionPrediction]:
        """Chunks for several (frames, instruction) requests, e.g. one per robot, decoded in one batch of N×K
        rows (batched decoding, action mask): each is what ``predict`` gives for that request alone."""
        checked = [self.check_request(frames, instruction) for frames, instruction in requests]
        return self.predict_prepared([self.prepare_chunk(frames, instruction) for frames, instruction in checked])

    def prepare_chunk(self, frames: Sequence[np.ndarray], instruction: str) -> PreparedChunk:
        """A request's own work before its chunk is decoded among others (``predict_prepared``): its frames
        encoded and its prompt prefilled. Runs outside the policy's lock and shares nothing with other calls,
        so the robots of a fleet do this in their own threads, side by side and while a batch decodes."""
        frames, instruction = self.check_request(frames, instruction)
        with self.engine.recording.shared():  # never while a CUDA graph records
            t0 = time.perf_counter()
            prompt = action_prompt(self.text, self.encode_frames(frames), instruction, self.config.action_prompt)
            t1 = time.perf_counter()
            cache = prefill_prompt(self.engine, prompt)
            self._sync()
        return PreparedChunk(prompt, cache, t1 - t0, time.perf_counter() - t1)

    def predict_prepared(self, prepared: Sequence[PreparedChunk]) -> list[ActionPrediction]:
        """The chunks of prepared requests decoded in one batch of N×K rows: each is what ``predict`` gives for
        that request alone."""
        c = self.config
        prompts = [p.prompt for p in prepared]
        with self._lock:
            t0 = time.perf_counter()
            results = engine_chunks_batched(self.engine, prompts, c.chunk_size, c.min_actions,
                                            prefilled=[p.cache for p in prepared])
            self._sync()
            t1 = time.perf_counter()
            actions = [self.actions.decode(r.tokens) for r in results]
            t2 = time.perf_counter()
        out = []
        for p, result, a in zip(prepared, results, actions, strict=True):
            timing = Timing(p.tokenize_s, p.prefill_s + t1 - t0, t2 - t1, result.forward_passes, len(p.prompt))
            out.append(ActionPrediction(a, result.tokens, timing))
        self.last_timing = out[-1].timing if out else self.last_timing
        return out

    def predict_actions(self, frames: Sequence[np.ndarray], instruction: str, **kwargs: Any) -> np.ndarray:
        """(K, 7) un-normalized actions for the newest frame(s) and the instruction."""
        return self.predict(frames, instruction, **kwargs).actions

    def imagine_block(
        self, frame: np.ndarray, action: np.ndarray, sampling: ImageSampling | None = None,
        cancel: threading.Event | None = None,
    ) -> list[int]:
        """The world model's next image block for ``frame`` after ``action`` ((7,) or (1, 7)).

        Setting ``cancel`` stops the decoding within one token (``DecodeCancelled``).
        """
        action = np.asarray(action, dtype=np.float64).reshape(-1, T.ACTION_DIMS)
        if action.shape[0] != 1:
            raise ValueError('imagine takes one action; use imagine_rollout for several')
        with self._lock:
            t0 = time.perf_counter()
            block = self.encode_frames([frame])[0]
            prompt = world_model_prompt(self.text, block, self.actions.encode(action), self.config.world_model_prompt)
            t1 = time.perf_counter()
            stop = cancel.is_set if cancel is not None else None
            grid, grid_token = self.images.grid, T.grid_token(self.resolution)
            guided = sampling is not None and sampling.cfg_scale != 1.0
            if self.image_decoding == 'drafted' and not guided:
                out, _ = engine_image_block_drafted(self.engine, prompt, block, self._image_ids,
                                                    self.draft_window, stop, sampling)
            elif self.image_decoding == 'reference':
                out = generate_image_block(self.lm, prompt, grid, grid_token, self._image_ids, sampling, stop)
            else:
                out = engine_image_block(self.engine, prompt, grid, grid_token, self._image_ids, sampling, stop)
            self._sync()
            t2 = time.perf_counter()
        self.last_timing = Timing(t1 - t0, t2 - t1, 0.0, self.images.grid**2, len(prompt))
        return out

    def imagine(self, frame: np.ndarray, action: np.ndarray, sampling: ImageSampling | None = None,
                cancel: threading.Event | None = None) -> np.ndarray:
        """The imagined next frame, R×R×3 uint8 RGB (R = the model's resolution)."""
        block = self.imagine_block(frame, action, sampling, cancel)
        t0 = time.perf_counter()
        with self._lock:
            image = self.images.decode(block)
        timing = self.last_timing
        timing.decode_s = time.perf_counter() - t0
        return image

    def transition_likelihood(
        self, frame: np.ndarray, action: np.ndarray, next_frame: np.ndarray, still: bool = True,
        rows: Sequence[np.ndarray] | None = None,
    ) -> CodeLikelihood:
        """The world model's bits for each code of the real ``next_frame`` after ``action`` from ``frame``, in one
        teacher-forced pass (no generation). ``still``: a second row under the no-motion hypothesis
        (``still_action``), for telling a stuck arm from a moving one. ``rows``: instead, every action to score
        (counterfactuals, ``motion_check.counterfactual_actions``), one batch row each, ``action`` unused. Each
        frame is encoded once across calls, so a stream of transitions encodes every camera frame once."""
        if rows is not None:
            hypotheses = [np.asarray(a, dtype=np.float64).reshape(1, T.ACTION_DIMS) for a in rows]
            if not hypotheses:
                raise ValueError('rows: at least one action')
        else:
            action = np.asarray(action, dtype=np.float64).reshape(-1, T.ACTION_DIMS)
            if action.shape[0] != 1:
                raise ValueError('transition_likelihood takes one action')
            hypotheses = [action, still_action(action)[None]] if still else [action]
        with self._lock:
            t0 = time.perf_counter()
            block, following = self.encode_frames([frame, next_frame])
            template = self.config.world_model_prompt
            prompts = [world_model_prompt(self.text, block, self.actions.encode(a), template) for a in hypotheses]
            t1 = time.perf_counter()
            out = next_block_likelihood(self.lm, prompts, following, self.images.grid, self._image_ids)
            t2 = time.perf_counter()
        self.last_timing = Timing(t1 - t0, t2 - t1, 0.0, 1, len(prompts[0]) + len(following))
        return out

    def imagine_rollout(
        self, frame: np.ndarray, actions: np.ndarray, sampling: ImageSampling | None = None
    ) -> list[np.ndarray]:
        """Frames after each of ``actions`` (H, 7), each imagined from the previous imagined one."""
        out, current = [], frame
        for action in np.asarray(actions).reshape(-1, T.ACTION_DIMS):
            current = self.imagine(current, action, sampling)
            out.append(current)
        return out

    def capture_decoding(self, mode: str = 'auto') -> str | None:
        """How the chunk decode step runs (``DecodeEngine.capture``): 'cuda_graph', 'compile', 'off', or 'auto'
        (``DecodeEngine.auto_capture``: CUDA graphs on a CUDA device, uncaptured on a CPU). The
        recording happens at the first call of each shape: ``warmup`` makes those calls and checks the captured
        step against the uncaptured one. Returns what is in use (None: uncaptured)."""
        if mode not in ('auto', 'cuda_graph', 'compile', 'off'):
            raise ValueError(f"decode capture: 'auto', 'cuda_graph', 'compile' or 'off', got {mode!r}")
        if mode == 'auto':
            mode = self.engine.auto_capture()
        if mode == 'off':
            self.engine.release_capture()
        elif self.engine.captured != mode:
            self.engine.capture(mode)
        return self.engine.captured

    def warmup(self, robots: int = 1) -> None:
        """One small call so that the first real request does not pay for lazy initialization. With a captured
        decode step: a batch of each size up to ``robots`` (a fleet's), so that no shape is recorded while
        serving, each checked against the uncaptured step; a difference releases the capture
        (``engine.capture_error`` says so)."""
        frame = np.zeros((self.resolution, self.resolution, 3), dtype=np.uint8)
        self.predict([frame], 'warm up')
        for n in range(1, robots + 1) if self.engine.captured else ():
            captured = [p.tokens for p in self.predict_many([([frame], 'warm up')] * n)]
            how = self.engine.captured
            self.engine.captured = None  # the same call uncaptured, on fresh caches
            uncaptured = [p.tokens for p in self.predict_many([([frame], 'warm up')] * n)]
            self.engine.captured = how
            if captured != uncaptured:
                self.engine.release_capture(f'the captured decode step gave other tokens than the uncaptured one '
                                            f'({n} robot(s)); running uncaptured')
                break

    def _sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


def load_policy(
    checkpoint_dir: str | Path,
    device: str | torch.device = 'auto',
    dtype: str | torch.dtype = 'auto',
    tokenizer_dir: str | Path | None = None,
    **settings: Any,
) -> WorldVLAPolicy:
    """Load a checkpoint directory (released or tiny) into a ready policy.

    ``settings`` override the checkpoint's WorldVLA settings (``chunk_size``, ``resolution``,
    ``history_frames``, ``rotate_180``, prompts …). Every problem raises ``CheckpointError``.
    """
    files = find_checkpoint_files(checkpoint_dir, tokenizer_dir)
    cfg = read_config(files)
    wv = worldvla_settings(cfg, files.root, settings)
    dev = resolve_device(device)
    try:
        dt = resolve_dtype(dtype, dev)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        text = TextTokenizer(files.text_tokenizer)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    vocab = text.vocab()
    vqgan = load_vqgan(files, dev)
    if wv.resolution % vqgan.cfg.downsample:
        raise CheckpointError(f'resolution {wv.resolution} is not a multiple of the VQGAN stride')
    try:
        images = ImageTokenizer(vqgan, vocab, wv.resolution, wv.rotate_180)
    except ValueError as exc:
        raise CheckpointError(f'{files.text_tokenizer}: {exc}') from exc
    lm = load_backbone(files, cfg, vocab, dev, dt)
    needed = 1 + 64 + wv.history_frames * images.block_length + wv.chunk_size * wv.max_tokens_per_action
    if needed > lm.config.max_position_embeddings * 2:
        raise CheckpointError(
            f'resolution {wv.resolution} needs ~{needed} positions, the model was trained with '
            f'{lm.config.max_position_embeddings}'
        )
    policy = WorldVLAPolicy(lm, images, text, wv, model_id_of(files))
    policy.weights_digest = weights_fingerprint(files)  # what a monitor calibration is bound to
    return policy
