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
    max_step: tuple[float, ...]  # 0 disables the limit for that dimension

    def __post_init__(self) -> None:
        for name in ('action_min', 'action_max', 'max_step'):
            values = getattr(self, name)
            if len(values) != 7 or not np.all(np.isfinite(values)):
                raise ValueError(f'{name} needs 7 finite values, got {list(values)}')
        if np.any(np.asarray(self.action_max) < np.asarray(self.action_min)):
            raise ValueError('action_max must be ≥ action_min in every dimension')
        if np.any(np.asarray(self.max_step) < 0):
            raise ValueError(f'max_step must be ≥ 0 in every dimension (0: no limit), got {list(self.max_step)}')


class UnsafeChunk(ValueError):
    """A chunk that must not reach the robot at all (NaN/inf, wrong shape)."""


def hold_action(last_gripper: float) -> np.ndarray:
    """Zero motion, gripper unchanged."""
    out = np.zeros(7)
    out[GRIPPER] = last_gripper
    return out


def at_rest() -> np.ndarray:
    """The command a robot is taken to have before the first one: no motion, gripper unknown (NaN: not limited)."""
    return hold_action(np.nan)


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

    def limit_step(self, action: np.ndarray, previous: Sequence[float] | None) -> np.ndarray:
        """``action`` moved at most ``max_step`` away from ``previous`` in every limited dimension.

        Dimensions where ``previous`` is NaN (unknown) or ``max_step`` ≤ 0 are left as they are.
        """
        action = np.asarray(action, dtype=np.float64)
        if previous is None:
            return action.copy()
        prev = np.asarray(previous, dtype=np.float64)
        limited = (self._step > 0) & np.isfinite(prev)
        return np.where(limited, np.clip(action, prev - self._step, prev + self._step), action)

    def limit(self, action: np.ndarray, previous: Sequence[float] | None) -> np.ndarray:
        """One command as it goes out: clamped to [action_min, action_max] and step-limited.

        The clamp has the last word: after limits were tightened at runtime the previous command
        may lie outside the new range, and the step limit must not hold the command out there.
        """
        clamped = np.clip(np.asarray(action, dtype=np.float64), self._lo, self._hi)
        return np.clip(self.limit_step(clamped, previous), self._lo, self._hi)

    def hold(self, previous: Sequence[float]) -> np.ndarray:
        """Zero motion; the gripper stays where it was, inside the gripper limits in force now."""
        gripper = float(previous[GRIPPER]) if np.isfinite(previous[GRIPPER]) else 0.0
        return hold_action(float(np.clip(gripper, self._lo[GRIPPER], self._hi[GRIPPER])))

    def apply(self, actions: np.ndarray, previous: Sequence[float] | None) -> tuple[np.ndarray, int]:
        """(K, 7) → (safe (K, 7), number of values changed). ``previous`` is the last command sent."""
        actions = self.check(actions)
        safe = np.empty_like(actions)
        prev = previous
        for i in range(len(actions)):
            safe[i] = prev = self.limit(actions[i], prev)
        return safe, changed_values(safe, actions)


def changed_values(new: np.ndarray, old: np.ndarray) -> int:
    return int(np.count_nonzero(np.abs(np.asarray(new) - np.asarray(old)) > 1e-12))
