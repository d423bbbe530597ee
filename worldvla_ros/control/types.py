"""What flows through the controller: settings, the frames it holds, inference requests, chunks, commands
and goals — plain data, no ROS, no torch."""
from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUTCOMES = ('succeeded', 'step_limit', 'time_limit', 'canceled', 'preempted', 'estopped', 'model_error', 'shutdown',
            'deactivated')
MERGES = ('replace', 'ensemble')


@dataclass(frozen=True)
class ControlSettings:
    """The control loop's parameters (the action node's of the same names)."""

    rate_hz: float = 10.0  # commands per second
    replan_threshold: int = -1  # next chunk once at most this many commands are queued; -1: on every new frame
    chunk_merge: str = 'replace'
    ensemble_decay: float = 0.01
    watchdog_timeout: float = 1.0  # s without a fresh chunk before holds are sent
    max_obs_age: float = 0.5  # s; an older newest frame gives no chunk (stale)
    max_future_stamp: float = 0.1  # s; a newest frame stamped further ahead gives no chunk (the clock went back)
    enabled: bool = False  # false: every command is marked dry_run
    history_frames: int = 1  # frames per request
    goal_policy: str = 'preempt'  # a goal while one runs: preempt | reject
    min_goal_interval: float = 0.1  # s between accepted goals

    def __post_init__(self) -> None:
        if not self.rate_hz > 0:
            raise ValueError(f'rate_hz must be > 0, got {self.rate_hz}')
        if self.chunk_merge not in MERGES:
            raise ValueError(f'chunk_merge must be one of {", ".join(MERGES)}, got {self.chunk_merge!r}')
        if self.goal_policy not in ('preempt', 'reject'):
            raise ValueError(f'goal_policy must be preempt or reject, got {self.goal_policy!r}')
        if self.replan_threshold < -1 or self.history_frames < 1:
            raise ValueError('replan_threshold ≥ -1 and history_frames ≥ 1')
        for name in ('ensemble_decay', 'watchdog_timeout', 'max_obs_age', 'max_future_stamp', 'min_goal_interval'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f'{name} must be a finite number ≥ 0, got {value}')

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz

    @classmethod
    def from_parameters(cls, params: dict[str, Any], **overrides: Any) -> ControlSettings:
        """From the action node's parameters (declared values, or its YAML section: a key not given keeps the
        default here, which is the node's default)."""
        given = {field: params[name] for name, field in PARAMETER_FIELDS.items() if name in params}
        return cls(**{**given, **overrides})


PARAMETER_FIELDS = {  # the action node's parameter → ControlSettings field (changed at runtime: from the next decision)
    'control_rate_hz': 'rate_hz', 'replan_threshold': 'replan_threshold', 'chunk_merge': 'chunk_merge',
    'ensemble_decay': 'ensemble_decay', 'watchdog_timeout': 'watchdog_timeout', 'max_obs_age': 'max_obs_age',
    'max_future_stamp': 'max_future_stamp', 'enabled': 'enabled', 'goal_policy': 'goal_policy',
    'min_goal_interval': 'min_goal_interval'}


@dataclass
class Request:
    """An inference the controller asks for: the model's input and what the answer is checked against."""

    frames: list[Any]  # oldest first, opaque to the controller (the node's model-resolution crops)
    stamps_ns: list[int]
    instruction: str
    version: int  # the instruction's version: a chunk of an older task never runs
    epoch: int  # +1 at every e-stop, reset and lifecycle change: a chunk of an older epoch never runs
    intake_s: float = 0.0  # the newest frame's own handling before it was stored (node overhead)
    stored_at: float = 0.0  # monotonic time the newest frame was stored


@dataclass
class Command:
    """One command for one control period, in action units; ``hold``: zero motion, gripper kept."""

    action: np.ndarray  # (7,)
    hold: bool = False
    dry_run: bool = True
    chunk_sequence: int = 0
    index: int = 0
    chunk_size: int = 0
    stamp_ns: int = 0  # the observation the chunk came from; a hold: when it was made
    reason: str = ''  # a hold's: estop, watchdog, goal_end, deactivate, shutdown, output_gate


@dataclass
class Chunk:
    """A chunk as accepted: the model's actions and the merged commands that will run from the next period."""

    sequence: int
    stamp_ns: int
    observation_stamps_ns: list[int]
    instruction: str
    raw: np.ndarray  # (K, 7) the model's
    safe: np.ndarray  # (K, 7) after the safety filter (clamped, step-limited from the last command sent)
    commands: list[Command]  # merged with what was queued: what runs from the next period
    latency_s: float = 0.0


@dataclass
class Goal:
    """A task as the control loop runs it; ``outcome`` is set once (then ``done``)."""

    key: Any  # the caller's handle (a ROS goal handle, an episode number …)
    instruction: str
    max_steps: int = 0
    time_limit: float = 0.0
    start: float = 0.0
    chunks: int = 0
    steps: int = 0  # motion commands sent
    cancel_requested: bool = False
    outcome: str = ''
    message: str = ''
    end: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def duration(self) -> float:
        return self.end - self.start


class Tally:
    """Counters and durations for callers without a node's ``Stats`` (the same two methods)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.durations: dict[str, list[float]] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def duration(self, name: str, seconds: float) -> None:
        self.durations.setdefault(name, []).append(seconds)
