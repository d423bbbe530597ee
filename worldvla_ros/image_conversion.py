"""sensor_msgs/Image ↔ NumPy without cv_bridge: checked, step-aware, zero-copy where possible.

Duck-typed on the message fields so it needs neither rclpy nor torch.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

_CHANNELS = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1}
MAX_SIDE = 8192


class ImageRejected(ValueError):
    """An image message that cannot be used; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f'{reason}: {detail}')
        self.reason = reason


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """rgb8/bgr8/rgba8/bgra8/mono8 ``sensor_msgs/Image`` → H×W×3 uint8 RGB (honours ``step``)."""
    enc = msg.encoding.lower()
    if enc not in _CHANNELS:
        raise ImageRejected('encoding', f'unsupported encoding {msg.encoding!r} (use {", ".join(_CHANNELS)})')
    h, w, c = int(msg.height), int(msg.width), _CHANNELS[enc]
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise ImageRejected('size', f'image size {w}x{h} out of range')
    if msg.step < w * c:
        raise ImageRejected('step', f'step {msg.step} < width*channels {w * c}')
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size != msg.step * h:
        raise ImageRejected('step', f'data has {buf.size} bytes, step*height is {msg.step * h}')
    arr = buf.reshape(h, msg.step)[:, : w * c].reshape(h, w, c)
    if enc == 'rgb8':
        return arr
    code = {'bgr8': cv2.COLOR_BGR2RGB, 'rgba8': cv2.COLOR_RGBA2RGB, 'bgra8': cv2.COLOR_BGRA2RGB,
            'mono8': cv2.COLOR_GRAY2RGB}[enc]
    return cv2.cvtColor(arr, code)


def compressed_msg_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg/png) → H×W×3 uint8 RGB."""
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise ImageRejected('decode', f'cannot decode compressed image (format {msg.format!r})')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def fill_image_msg(msg: Any, rgb: np.ndarray) -> Any:
    """Write an H×W×3 uint8 RGB array into an Image message as rgb8 (``tobytes``, never lists)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f'expected H×W×3 uint8, got {rgb.shape} {rgb.dtype}')
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = 'rgb8'
    msg.is_bigendian = 0
    msg.step = int(rgb.shape[1] * 3)
    msg.data = np.ascontiguousarray(rgb).tobytes()
    return msg
