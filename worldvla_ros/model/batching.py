"""One policy shared by several robots: their ``predict`` calls, made from their own threads, are
decoded together (``WorldVLAPolicy.predict_prepared``), N×K rows a pass instead of N calls one after another.
Each robot's own work (encoding its frames, prefilling its prompt) stays in its thread, so robots do it side
by side, on every core, and while a batch decodes."""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .policy import ActionPrediction, PreparedChunk, WorldVLAPolicy


@dataclass
class _Request:
    prepared: PreparedChunk
    done: threading.Event = field(default_factory=threading.Event)
    result: ActionPrediction | None = None
    error: BaseException | None = None


class BatchingPolicy:
    """``predict`` as ``WorldVLAPolicy.predict`` (same chunk), batched across callers.

    A batch starts ``max_wait_s`` after its first request, or at once when ``callers`` requests are
    waiting: a slow or silent caller delays the others by at most ``max_wait_s``. Other attributes are
    the wrapped policy's. Requests a batch cannot serve (sequential or unmasked decoding) run alone.
    """

    def __init__(self, policy: WorldVLAPolicy, callers: int, max_wait_s: float = 0.005,
                 cpu_threads: int = 0) -> None:
        """``cpu_threads``: torch's intra-op threads on a CPU (0: torch's default) in the decoding thread and in
        the callers' threads while they prepare their requests. Off the main thread, small models ran 3× slower
        with 2 OpenMP threads than with 1 here."""
        self.policy = policy
        self.cpu_threads = cpu_threads
        self.callers = max(1, callers)
        self.max_wait_s = max_wait_s
        policy.block_cache_frames = max(policy.block_cache_frames, self.callers * (policy.config.history_frames + 2))
        self.batch_sizes: list[int] = []  # of the last batches (bounded), for diagnostics and benchmarks
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._warm = False
        self._thread = threading.Thread(target=self._run, name='worldvla-batcher', daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def warmup(self) -> None:
        """The policy's warm-up for batches of up to ``callers`` robots (each shape a captured step records)."""
        with self._cond:
            if self._warm:
                return
            self._warm = True
        self.policy.warmup(robots=self.callers)

    def predict(self, frames: Sequence[np.ndarray], instruction: str, *, batched: bool = True,
                constrain: bool = True, action_mask: bool = True) -> ActionPrediction:
        if not (batched and action_mask and constrain):
            return self.policy.predict(frames, instruction, batched=batched, constrain=constrain,
                                       action_mask=action_mask)
        # in the caller's thread: a caller's bad input or frame is its own error, and callers work side by side
        self.policy.use_cpu_threads(self.cpu_threads)
        request = _Request(self.policy.prepare_chunk(frames, instruction))
        with self._cond:
            if self._closed:
                raise RuntimeError('the shared policy is closed')
            self._pending.append(request)
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def predict_actions(self, frames: Sequence[np.ndarray], instruction: str, **kwargs: Any) -> np.ndarray:
        return self.predict(frames, instruction, **kwargs).actions

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed and not self._pending:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._pending) < self.callers and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._pending = self._pending, []
            return batch

    def _run(self) -> None:
        self.policy.use_cpu_threads(self.cpu_threads)
        while (batch := self._next_batch()) is not None:
            try:
                results = self.policy.predict_prepared([r.prepared for r in batch])
                for request, result in zip(batch, results, strict=True):
                    request.result = result
            except BaseException as exc:  # the model failed for all of them: every caller hears it
                for request in batch:
                    request.error = exc
            finally:
                self.batch_sizes = [*self.batch_sizes[-99:], len(batch)]
                for request in batch:
                    request.done.set()
