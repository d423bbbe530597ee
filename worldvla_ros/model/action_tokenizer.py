"""Action tokenizer of the release: 256-bin uniform quantization of min/max-normalized actions."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import tokens as T

LIBERO_ACTION_MIN = (-0.9375, -0.9375, -0.9375, -0.32571429, -0.375, -0.375, -1.0)
LIBERO_ACTION_MAX = (0.9375, 0.9375, 0.9375, 0.375, 0.375, 0.375, 1.0)
# What one unit of a LIBERO action moves: robosuite's OSC_POSE controller maps [-1, 1] to
# ±0.05 m of position and ±0.5 rad of axis-angle rotation per control step; the gripper has no unit.
LIBERO_ACTION_SCALE = (0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 1.0)
# No physical action is this many units (LIBERO's lie within ±0.94): a recorded value beyond it is a broken
# recording, and no tokenizer range may reach beyond it either.
MAX_ACTION_UNITS = 100.0


class ActionTokenizer:
    """Maps (K, 7) un-normalized actions to K blocks of ``10004, v1 … v7, 15004`` and back."""

    n_bins = 256

    def __init__(
        self,
        action_min: Sequence[float] = LIBERO_ACTION_MIN,
        action_max: Sequence[float] = LIBERO_ACTION_MAX,
    ) -> None:
        self.action_min = np.asarray(action_min, dtype=np.float64)
        self.action_max = np.asarray(action_max, dtype=np.float64)
        if self.action_min.shape != (T.ACTION_DIMS,) or self.action_max.shape != (T.ACTION_DIMS,):
            raise ValueError('action_min and action_max need 7 values each')
        if np.any(self.action_max <= self.action_min):
            raise ValueError('action_max must be greater than action_min in every dimension')
        if not (np.all(np.isfinite(self.action_min)) and np.all(np.isfinite(self.action_max))) or np.any(
                np.abs(np.concatenate([self.action_min, self.action_max])) > MAX_ACTION_UNITS):
            raise ValueError(f'action ranges must be finite and within ±{MAX_ACTION_UNITS:g} action units')
        self.bins = np.linspace(-1.0, 1.0, self.n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0  # 255 centers

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        x = 2.0 * (actions - self.action_min) / (self.action_max - self.action_min + 1e-8) - 1.0
        return np.clip(x, -1.0, 1.0)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        return (x + 1.0) / 2.0 * (self.action_max - self.action_min + 1e-8) + self.action_min

    def encode_values(self, actions: np.ndarray) -> np.ndarray:
        """(K, 7) actions → (K, 7) value token ids in 10006 … 10261."""
        actions = self._check(actions)
        return (np.digitize(self.normalize(actions), self.bins) + T.ACTION_BIN_FIRST - 1).astype(np.int64)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """(K, 7) actions → (K * 9,) token ids, one ``10004 … 15004`` block per action."""
        values = self.encode_values(actions)
        k = values.shape[0]
        start = np.full((k, 1), T.ACTION_START, dtype=np.int64)
        end = np.full((k, 1), T.ACTION_END, dtype=np.int64)
        return np.concatenate([start, values, end], axis=1).reshape(-1)

    def decode_values(self, values: np.ndarray) -> np.ndarray:
        """(K, 7) value token ids → (K, 7) un-normalized actions."""
        values = np.asarray(values, dtype=np.int64)
        idx = np.clip(values - T.ACTION_BIN_FIRST, 0, len(self.bin_centers) - 1)
        return self.unnormalize(self.bin_centers[idx])

    def decode(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token ids holding K complete action blocks (anything else around them ignored) → (K, 7)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        blocks = []
        starts = np.flatnonzero(ids == T.ACTION_START)
        for s in starts:
            block = ids[s + 1 : s + 1 + T.ACTION_DIMS + 1]
            if len(block) == T.ACTION_DIMS + 1 and block[-1] == T.ACTION_END:
                blocks.append(block[:-1])
        if not blocks:
            return np.zeros((0, T.ACTION_DIMS))
        return self.decode_values(np.stack(blocks))

    @staticmethod
    def _check(actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim == 1:
            actions = actions[None]
        if actions.ndim != 2 or actions.shape[1] != T.ACTION_DIMS:
            raise ValueError(f'actions must have shape (K, 7), got {actions.shape}')
        if not np.all(np.isfinite(actions)):
            raise ValueError('actions contain NaN or inf')
        return actions
