"""The action node's loop where time is simulated: lockstep bag evaluation and the closed-loop sims.

One control period per ``step``, in the order the node meets them with a camera whose frame of period k
arrives before its tick k and an inference that answers within the period: the frame is kept, a chunk is
asked for if the controller wants one, and the tick's command goes out. Greedy decoding on the same frames
therefore gives the node's commands, holds included.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .controller import Controller
from .types import Chunk, Command, Request

Infer = Callable[[Request], tuple[np.ndarray, float]]  # (actions (K, 7), latency s)


class SynchronousLoop:
    def __init__(self, controller: Controller, infer: Infer, tick_delay_s: float = 0.0,
                 on_chunk: Callable[[Chunk], None] | None = None) -> None:
        """``infer`` runs the model on a request (a ValueError-type failure ends the running goal as the node's
        would); ``tick_delay_s``: the tick of a period comes this long after its frame's stamp."""
        self.ctrl = controller
        self.infer = infer
        self.tick_delay_ns = round(tick_delay_s * 1e9)
        self.on_chunk = on_chunk
        self.chunks: list[Chunk] = []

    def step(self, frame: Any, stamp_ns: int) -> Command | None:
        """One period: the frame stamped ``stamp_ns``, then the tick; the command that went out (None while
        nothing has been commanded)."""
        self.ctrl.on_frame(frame, stamp_ns, stamp_ns * 1e-9)
        self._answer(stamp_ns)
        tick_ns = stamp_ns + self.tick_delay_ns
        return self.ctrl.tick(tick_ns * 1e-9, tick_ns)

    def drain(self, stamp_ns: int, period_ns: int, max_ticks: int) -> list[Command]:
        """Ticks after the last frame until the queue is empty (the commands still queued go out)."""
        out = []
        for k in range(1, max_ticks + 1):
            if not self.ctrl.queue:
                break
            t = stamp_ns + self.tick_delay_ns + k * period_ns
            command = self.ctrl.tick(t * 1e-9, t)
            if command is not None:
                out.append(command)
        return out

    def _answer(self, stamp_ns: int) -> None:
        now = stamp_ns * 1e-9
        request = self.ctrl.next_request(stamp_ns, now)
        if request is None:
            return
        try:
            actions, latency = self.infer(request)
        except Exception as exc:  # as the node's worker: counted, the running goal ends, the loop goes on
            self.ctrl.inference_failed(request, str(exc), now, non_finite=getattr(exc, 'non_finite', False))
            return
        chunk = self.ctrl.on_chunk(request, actions, now, latency)
        if chunk is not None:
            self.chunks.append(chunk)
            if self.on_chunk is not None:
                self.on_chunk(chunk)
