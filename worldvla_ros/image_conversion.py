"""sensor_msgs/Image ↔ NumPy without cv_bridge: checked, step-aware, zero-copy where possible.

Duck-typed on the message fields so it needs neither rclpy nor torch.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import cv2
import numpy as np
from PIL import Image as PILImage

_CHANNELS = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1}
MAX_SIDE = 8192  # per side, raw and compressed alike
COMPRESSED_FORMATS = ('PNG', 'JPEG')  # what image_transport's compressed plugin writes


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
    check_size(w, h)
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


def check_size(width: int, height: int) -> None:
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise ImageRejected('size', f'image size {width}x{height} out of range (1 … {MAX_SIDE} per side)')


def declared_size(data: bytes, fmt: str = '') -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, without decoding a pixel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data), formats=COMPRESSED_FORMATS) as im:
                return im.size
    except PILImage.DecompressionBombError as exc:  # Pillow's own bound is far above ours
        raise ImageRejected('size', f'compressed image declares too many pixels ({exc})') from exc
    except Exception as exc:
        raise ImageRejected('decode', f'not a PNG or JPEG image (format {fmt!r}): {type(exc).__name__}') from exc


def compressed_msg_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg/png) → H×W×3 uint8 RGB.

    The size the header declares is checked against the raw-frame limit before anything is
    decoded: a small file may declare a huge image (a decompression bomb).
    """
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if not buf.size:
        raise ImageRejected('decode', f'empty compressed image (format {msg.format!r})')
    width, height = declared_size(buf.tobytes(), msg.format)
    check_size(width, height)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageRejected('decode', f'cannot decode compressed image (format {msg.format!r}): {exc}') from exc
    if bgr is None:
        raise ImageRejected('decode', f'cannot decode compressed image (format {msg.format!r})')
    if bgr.shape[:2] != (height, width):
        raise ImageRejected('size', f'decoded {bgr.shape[1]}x{bgr.shape[0]}, header declared {width}x{height}')
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


def to_model_frame(frame: np.ndarray, resolution: int, rotate_180: bool) -> np.ndarray:
    """Any H×W×3 uint8 RGB → center-cropped square, resized to the model's resolution.

    The same function serves the action node, the world-model node and the bag evaluation,
    so every path feeds the model identical pixels.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f'expected an H×W×3 uint8 RGB frame, got {frame.shape} {frame.dtype}')
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = frame[top : top + side, left : left + side]
    if side != resolution:
        interp = cv2.INTER_AREA if side > resolution else cv2.INTER_LINEAR
        square = cv2.resize(square, (resolution, resolution), interpolation=interp)
    if rotate_180:
        square = square[::-1, ::-1]
    return np.ascontiguousarray(square)
