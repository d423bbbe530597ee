"""A small OpenCV-drawn tabletop camera for demos and tests: a gripper that follows commands."""
from __future__ import annotations

import cv2
import numpy as np


class SyntheticCamera:
    """256×256 RGB frames of a table, a red block, a bowl and a gripper moved by Δxyz commands."""

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.size = size
        self.block = rng.uniform(0.2, 0.8, 2)
        self.bowl = rng.uniform(0.2, 0.8, 2)
        self.gripper = np.array([0.5, 0.5, 0.3])  # x, y in [0, 1], height z
        self.closed = False

    def step(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.size == 7 and np.all(np.isfinite(action)):
            self.gripper = np.clip(self.gripper + 0.02 * action[:3], 0.05, 0.95)
            self.closed = action[6] > 0
        return self.render()

    def render(self) -> np.ndarray:
        s = self.size
        img = np.zeros((s, s, 3), dtype=np.uint8)
        img[:] = (200, 170, 130)  # table
        img[: s // 5] = (90, 110, 140)  # wall
        px = lambda p: (int(p[0] * s), int(p[1] * s))  # noqa: E731
        cv2.circle(img, px(self.bowl), s // 12, (60, 60, 200), -1)
        cv2.circle(img, px(self.bowl), s // 18, (40, 40, 150), -1)
        b = px(self.block)
        cv2.rectangle(img, (b[0] - 8, b[1] - 8), (b[0] + 8, b[1] + 8), (220, 30, 30), -1)
        g = px(self.gripper)
        open_w = 6 if self.closed else 14
        radius = int(4 + 10 * self.gripper[2])
        cv2.circle(img, (g[0] + 3, g[1] + 6), radius, (50, 50, 50), -1)  # shadow grows with height
        cv2.rectangle(img, (g[0] - open_w, g[1] - 4), (g[0] - open_w + 4, g[1] + 10), (30, 30, 30), -1)
        cv2.rectangle(img, (g[0] + open_w - 4, g[1] - 4), (g[0] + open_w, g[1] + 10), (30, 30, 30), -1)
        return img
