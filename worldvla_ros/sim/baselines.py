"""Baselines a trained tabletop model must beat, computed on the same expert episodes it is scored on."""
from __future__ import annotations

import numpy as np

from worldvla_ros.metrics import psnr, ssim
from worldvla_ros.model.image_tokenizer import to_model_frame

from .record import expert_episode


def other_layout_baseline(seeds: list[int], resolution: int, horizon: int = 1) -> dict[str, float]:
    """PSNR/SSIM of frame t+h of an episode against frame t+h of the next episode (another layout).

    A world model that only draws "a tabletop" scores about this; one that imagines *this* scene
    scores higher.
    """
    episodes = [expert_episode(s)[0] for s in seeds]
    p, s = [], []
    for i, frames in enumerate(episodes):
        other = episodes[(i + 1) % len(episodes)]
        for t in range(horizon, min(len(frames), len(other))):
            a = to_model_frame(frames[t], resolution, rotate_180=False)
            b = to_model_frame(other[t], resolution, rotate_180=False)
            p.append(psnr(a, b))
            s.append(ssim(a, b))
    return {'psnr_db': round(float(np.mean(p)), 4), 'ssim': round(float(np.mean(s)), 6)}


def majority_gripper_accuracy(seeds: list[int], threshold: float = 0.0) -> float:
    """Gripper open/closed accuracy of always answering the expert's more frequent state."""
    closed = np.concatenate([expert_episode(s)[1][:, 6] > threshold for s in seeds])
    return round(float(max(closed.mean(), 1 - closed.mean())), 6)
