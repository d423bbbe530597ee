"""The control loop, without ROS or torch: every decision between a model's chunk and a command going out.

Driven by events and the caller's clock: frames, instructions, e-stops, resets, goals, lifecycle changes,
finished inferences and control ticks. The action node, the fleet, lockstep evaluation and the closed-loop
sims all drive one ``Controller`` (``loop.SynchronousLoop`` for the ones without ROS).

Times: ``now`` is a monotonic clock in seconds (watchdog, goal limits, goal rate), ``stamp_ns`` the clock the
frames are stamped with (ROS time in the node, the bag's or the sim's elsewhere). Thread safety: every method
takes one re-entrant lock; ``send`` callbacks run under it, so a cancel, an e-stop or a new goal is either
before a command (then it is a hold) or after it went out, never in between.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from worldvla_ros.chunk_merge import merge_chunk
from worldvla_ros.safety import SafetyFilter, SafetyLimits, UnsafeChunk, at_rest, changed_values

from .goals import Goals
from .supervision import Send, Supervision
from .types import Chunk, Command, ControlSettings, Request, Tally


class Controller(Supervision):
    def __init__(self, settings: ControlSettings, limits: SafetyLimits, stats: Any = None,
                 log: Callable[[str, str], None] = lambda reason, detail: None) -> None:
        """``stats``: ``count(key, n)`` and ``duration(name, s)`` (a node's Stats; default a ``Tally``);
        ``log(reason, detail)``: a refusal to report (counted as ``rejected_<reason>`` either way)."""
        self.settings = settings
        self.safety = SafetyFilter(limits)
        self.stats = stats if stats is not None else Tally()
        self.log = log
        self.lock = threading.RLock()
        self.goals = Goals(self.stats.count)
        self.history: deque[tuple[Any, int]] = deque(maxlen=settings.history_frames)
        self.fresh = False  # a frame arrived that no request has taken yet
        self.seen_last_command = True  # the newest frame came after the last command went out
        self.newest = (0.0, 0.0)  # the newest frame's (intake s, monotonic time stored)
        self.instruction: str | None = None
        self.version = 0
        self.epoch = 0
        self.estop = False
        self.reset_stamp_ns = 0  # frames stamped before the last e-stop reset are never used
        self.queue: deque[Command] = deque()
        self.blended: deque[int] = deque()  # per queued command: the predictions it averages
        self.queue_time = -np.inf
        self.last_sent = at_rest()  # the step limit applies from here, holds included
        self.last_send_time: float | None = None
        self.active = False  # anything commanded since activation: from then on a command every period
        self.commanding = False  # lifecycle active
        self.finalized = False
        self.closing = False
        self.inferring = False
        self.sequence = 0

    # -- settings -------------------------------------------------------------------------------------
    def update(self, **changes: Any) -> None:
        """New settings (validated: ValueError), in force from the next decision."""
        with self.lock:
            self.settings = replace(self.settings, **changes)
            if self.history.maxlen != self.settings.history_frames:
                self.history = deque(self.history, maxlen=self.settings.history_frames)

    def set_limits(self, limits: SafetyLimits) -> None:
        with self.lock:
            self.safety = SafetyFilter(limits)

    # -- inputs ---------------------------------------------------------------------------------------
    def on_frame(self, frame: Any, stamp_ns: int, now: float, intake_s: float = 0.0) -> bool:
        """Keep a frame (the newest wins); False when it is not taken (inactive, stamped before a reset)."""
        with self.lock:
            if not self.commanding:
                self.stats.count('frames_ignored_inactive')  # read again after activation, never before
                return False
            if stamp_ns < self.reset_stamp_ns:
                self.stats.count('rejected_before_reset')
                return False
            if self.fresh:
                self.stats.count('frames_dropped')  # no request took the previous one
            self.history.append((frame, stamp_ns))
            self.fresh = True
            self.seen_last_command = True
            self.newest = (intake_s, now)
            return True

    def set_instruction(self, text: str | None) -> str:
        """'changed', 'same', 'ignored' (a goal runs, or finalized); a change drops the queued commands."""
        with self.lock:
            if self.finalized:
                self.stats.count('instructions_ignored_finalized')
                return 'ignored'
            if self.goals.running is not None:
                self.stats.count('instructions_ignored_during_goal')
                return 'ignored'
            if text == self.instruction:
                return 'same'
            self.instruction = text
            self.version += 1
            self._clear_queue()  # commands of the old task must not run
            if text is not None:
                self.stats.count('instruction_changes')
            return 'changed'

    # -- inference ------------------------------------------------------------------------------------
    def next_request(self, stamp_now_ns: int, now: float) -> Request | None:
        """An inference to run now, or None: nothing fresh, no task, latched, inactive, enough queued, or the
        newest frame too old or from the future (counted).

        Replanning (``replan_threshold`` ≥ 0) asks once at most that many commands are queued, from a frame
        received after the last command went out, so a chunk always sees the last command's effect (the
        release's protocol: the next chunk from the observation after the last action). With -1 the newest
        frame is taken whenever the caller is free, whatever went out since it arrived."""
        s = self.settings
        with self.lock:
            if not self.fresh or self.instruction is None or self.estop or not self.commanding:
                return None
            if s.replan_threshold >= 0 and (len(self.queue) > s.replan_threshold or not self.seen_last_command):
                return None  # the current chunk runs on; the next frame asks again
            self.fresh = False
            intake, stored_at = self.newest
            self.stats.duration('frame_wait', now - stored_at)  # its age at pick-up
            request = Request([f for f, _ in self.history], [t for _, t in self.history], self.instruction,
                              self.version, self.epoch, intake, stored_at)
        age = (stamp_now_ns - request.stamps_ns[-1]) * 1e-9
        if age > s.max_obs_age:
            self._refuse('stale', f'newest frame is {age:.3f} s old (max_obs_age {s.max_obs_age:g})')
            return None
        if -age > s.max_future_stamp:  # the clock went back (sim time restarted)
            self._refuse('future_stamp', f'newest frame is stamped {-age:.3f} s ahead of the clock')
            return None
        with self.lock:
            self.inferring = True
        self.stats.count('frames_used')
        return request

    def on_chunk(self, request: Request, actions: np.ndarray, now: float, latency_s: float = 0.0) -> Chunk | None:
        """The model's answer: checked, limited against the last command sent, merged with what is queued; None
        when refused (non-finite: the goal ends) or when the task, the epoch or the e-stop changed meanwhile."""
        with self.lock:
            try:
                try:
                    safe, changed = self.safety.apply(actions, self.last_sent)
                except UnsafeChunk as exc:
                    self._refuse('unsafe_chunk', str(exc))
                    self._end_goal_of(request, 'model_error', f'unsafe chunk: {exc}', now)
                    return None
                if changed:
                    self.stats.count('values_limited', changed)
                if request.version != self.version or request.epoch != self.epoch or self.estop or self.closing:
                    self.stats.count('chunks_discarded')  # the task changed, or an e-stop came, while it ran
                    return None
                s = self.settings
                queued = np.array([c.action for c in self.queue], dtype=np.float64).reshape(-1, 7)
                merged, blended = merge_chunk(queued, np.array(self.blended), safe, s.chunk_merge, s.ensemble_decay)
                sequence, self.sequence = self.sequence, self.sequence + 1
                commands = [Command(np.asarray(a, dtype=np.float64), False, not s.enabled, sequence, i, len(merged),
                                    request.stamps_ns[-1]) for i, a in enumerate(merged)]
                self.queue, self.blended = deque(commands), deque(int(b) for b in blended)
                self.queue_time = now
                self.active = True
                if self.goals.running is not None:
                    self.goals.running.chunks += 1
                self.stats.count('chunks')
                return Chunk(sequence, request.stamps_ns[-1], list(request.stamps_ns), request.instruction,
                             np.asarray(actions, dtype=np.float64), safe, commands, latency_s)
            finally:
                self.inferring = False

    def inference_failed(self, request: Request, message: str, now: float, non_finite: bool = False) -> None:
        with self.lock:
            self.inferring = False
            if non_finite:
                self._refuse('non_finite_output', message)
            else:
                self.stats.count('inference_errors')
            self._end_goal_of(request, 'model_error', f'inference failed: {message}', now)

    def idle(self) -> bool:
        with self.lock:  # no chunk left to run, no inference running, none to start before a new frame comes
            waiting = self.fresh and (self.settings.replan_threshold < 0 or self.seen_last_command)
            return not self.queue and not self.inferring and not waiting

    # -- control --------------------------------------------------------------------------------------
    def tick(self, now: float, stamp_ns: int, send: Send | None = None) -> Command | None:
        """The command of this control period (every limit as it stands now, against the command actually sent
        last), or None while nothing has been commanded (or inactive)."""
        with self.lock:
            if self.closing or not self.commanding:
                return None
            s = self.settings
            limit = self.goals.limit_reached(now)
            if limit is not None:
                self._end_goal(*limit, now)
            goal_ended = self.goals.take_ended()
            fresh = now - self.queue_time <= s.watchdog_timeout
            if self.estop:
                cmd = self.make_hold(stamp_ns, 'estop')
            elif goal_ended and self.active:
                cmd = self.make_hold(stamp_ns, 'goal_end')
            elif self.queue and fresh:
                cmd = self.queue.popleft()
                self.blended.popleft()
                if self.goals.running is not None:
                    self.goals.running.steps += 1  # the limit ends the goal at the next tick: its last step first
                planned = np.asarray(cmd.action, dtype=np.float64)
                cmd = replace(cmd, action=self.safety.limit(planned, self.last_sent), dry_run=not s.enabled)
                limited = changed_values(cmd.action, planned)
                if limited:
                    self.stats.count('values_limited', limited)
            elif self.active:
                self._clear_queue()
                cmd = self.make_hold(stamp_ns, 'watchdog')
            else:
                return None  # nothing commanded yet: stay silent
            return self._send(cmd, send, now)

    def make_hold(self, stamp_ns: int, reason: str) -> Command:
        """Zero motion, the gripper kept inside the limits in force (stopping is never rate-limited)."""
        with self.lock:
            return Command(self.safety.hold(self.last_sent), True, not self.settings.enabled, self.sequence, 0, 0,
                           stamp_ns, reason)

    def _send(self, cmd: Command, send: Send | None, now: float) -> Command:
        cmd = send(cmd) if send is not None else cmd  # the caller's last gate may send a hold instead
        self.last_sent = np.asarray(cmd.action, dtype=np.float64)
        self.seen_last_command = False
        if cmd.reason:
            self.stats.count(f'holds_{cmd.reason}')
        if self.last_send_time is not None:
            self.stats.duration('command_interval', now - self.last_send_time)
        self.last_send_time = now
        return cmd

    def _clear_queue(self) -> None:
        self.queue.clear()
        self.blended.clear()

    def _refuse(self, reason: str, detail: str) -> None:
        self.stats.count(f'rejected_{reason}')
        self.log(reason, detail)
