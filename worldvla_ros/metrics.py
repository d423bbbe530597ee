"""Image similarity of imagined vs real frames (world-model surprise, bag evaluation)."""
from __future__ import annotations

import math

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _same_size(real: np.ndarray, imagined: np.ndarray) -> np.ndarray:
    if real.shape[:2] != imagined.shape[:2]:
        real = cv2.resize(real, (imagined.shape[1], imagined.shape[0]), interpolation=cv2.INTER_AREA)
    return real


def psnr(real: np.ndarray, imagined: np.ndarray) -> float:
    real = _same_size(real, imagined)
    if np.array_equal(real, imagined):
        return float('inf')
    return float(peak_signal_noise_ratio(real, imagined, data_range=255))


def ssim(real: np.ndarray, imagined: np.ndarray) -> float:
    real = _same_size(real, imagined)
    return float(structural_similarity(real, imagined, channel_axis=2, data_range=255))


def side_by_side(real: np.ndarray, imagined: np.ndarray) -> np.ndarray:
    """real | imagined | |difference| (amplified ×4), all at the imagined frame's size."""
    real = _same_size(real, imagined)
    diff = np.clip(np.abs(real.astype(np.int16) - imagined.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.concatenate([real, imagined, diff], axis=1))


def wilson95(successes: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of a success rate: honest error bars for a few dozen episodes."""
    if n <= 0:
        return (0.0, 0.0)
    p, z = successes / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(centre - half, 0.0), 4), round(min(centre + half, 1.0), 4))
