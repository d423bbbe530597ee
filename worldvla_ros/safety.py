"""The safety layer between decoded actions and the robot: no ROS, no torch, easy to test."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GRIPPER = 6


@dataclass(frozen=True)
class SafetyLimits:
    """Per-dimension clamps and per-step limits (the largest change between two commands)."""

    action_min: tuple[float, ...]
    action_max: tuple[float, ...]
    max_step: tuple[float, ...]  # ≤ 0 disables the limit for that dimension

    def __post_init__(self) -> None:
        for name in ('action_min', 'action_max', 'max_step'):
            values = getattr(self, name)
            if len(values) != 7 or not np.all(np.isfinite(values)):
                raise ValueError(f'{name} needs 7 finite values, got {list(values)}')
        if np.any(np.asarray(self.action_max) < np.asarray(self.action_min)):
            raise ValueError('action_max must be ≥ action_min in every dimension')


class UnsafeChunk(ValueError):
    """A chunk that must not reach the robot at all (NaN/inf, wrong shape)."""


def hold_action(last_gripper: float) -> np.ndarray:
    """Zero motion, gripper unchanged."""
    out = np.zeros(7)
    out[GRIPPER] = last_gripper
    return out


class SafetyFilter:
    """Rejects non-finite chunks, clamps every dimension, limits the change between commands."""

    def __init__(self, limits: SafetyLimits) -> None:
        self.limits = limits
        self._lo = np.asarray(limits.action_min, dtype=np.float64)
        self._hi = np.asarray(limits.action_max, dtype=np.float64)
        self._step = np.asarray(limits.max_step, dtype=np.float64)

    def check(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] != 7 or len(actions) == 0:
            raise UnsafeChunk(f'chunk has shape {actions.shape}, expected (K, 7) with K ≥ 1')
        if not np.all(np.isfinite(actions)):
            raise UnsafeChunk('chunk contains NaN or inf')
        return actions

    def apply(self, actions: np.ndarray, previous: Sequence[float] | None) -> tuple[np.ndarray, int]:
        """(K, 7) → (safe (K, 7), number of values changed). ``previous`` is the last command sent."""
        actions = self.check(actions)
        safe = np.clip(actions, self._lo, self._hi)
        limited = self._step > 0
        prev = None if previous is None else np.asarray(previous, dtype=np.float64)
        for i in range(len(safe)):
            if prev is not None and limited.any():
                delta = np.clip(safe[i] - prev, -self._step, self._step)
                safe[i] = np.where(limited, prev + delta, safe[i])
            prev = safe[i]
        changed = int(np.count_nonzero(np.abs(safe - actions) > 1e-12))
        return safe, changed
