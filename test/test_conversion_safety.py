"""Image conversion and the safety layer, without a ROS graph."""
from __future__ import annotations

import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from worldvla_ros.image_conversion import ImageRejected, compressed_msg_to_rgb, fill_image_msg, image_msg_to_rgb
from worldvla_ros.safety import SafetyFilter, SafetyLimits, UnsafeChunk, at_rest, hold_action


def test_round_trip_and_padded_rows() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    msg = fill_image_msg(Image(), rgb)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)
    padded = Image(height=48, width=64, encoding='bgr8', step=64 * 3 + 16)
    rows = np.zeros((48, 64 * 3 + 16), dtype=np.uint8)
    rows[:, : 64 * 3] = rgb[:, :, ::-1].reshape(48, -1)
    padded.data = rows.tobytes()
    np.testing.assert_array_equal(image_msg_to_rgb(padded), rgb)


@pytest.mark.parametrize(('change', 'reason'), [
    ({'encoding': '16UC1'}, 'encoding'), ({'width': 0}, 'size'), ({'step': 10}, 'step'),
    ({'height': 49}, 'step'),
])
def test_bad_images_are_rejected_with_a_reason(change: dict, reason: str) -> None:
    msg = fill_image_msg(Image(), np.zeros((48, 64, 3), dtype=np.uint8))
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(ImageRejected) as err:
        image_msg_to_rgb(msg)
    assert err.value.reason == reason


def test_compressed() -> None:
    import cv2

    rgb = np.full((32, 32, 3), (10, 200, 30), dtype=np.uint8)
    ok, png = cv2.imencode('.png', rgb[:, :, ::-1])
    assert ok
    np.testing.assert_array_equal(compressed_msg_to_rgb(CompressedImage(format='png', data=png.tobytes())), rgb)
    with pytest.raises(ImageRejected):
        compressed_msg_to_rgb(CompressedImage(format='jpeg', data=b'not an image'))


LIMITS = SafetyLimits((-0.5,) * 6 + (-1.0,), (0.5,) * 6 + (1.0,), (0.1, 0.1, 0.1, 0, 0, 0, 0))


def test_clamp_and_step_limit() -> None:
    f = SafetyFilter(LIMITS)
    actions = np.array([[0.9, -0.9, 0.05, 0.7, 0, 0, 1.0], [0.9, -0.9, 0.05, 0.7, 0, 0, -1.0]])
    safe, changed = f.apply(actions, previous=np.zeros(7))
    np.testing.assert_allclose(safe[0], [0.1, -0.1, 0.05, 0.5, 0, 0, 1.0])
    np.testing.assert_allclose(safe[1], [0.2, -0.2, 0.05, 0.5, 0, 0, -1.0])
    assert changed == 6  # dims 0, 1, 3 of both rows


def test_motion_ramps_up_from_rest_and_after_a_hold() -> None:
    f = SafetyFilter(LIMITS)
    # from rest (the node's state before its first command): xyz ramp up, the unknown gripper is free
    safe, _ = f.apply(np.array([[0.5, 0.5, -0.5, 0, 0, 0, 1.0]] * 3), previous=at_rest())
    np.testing.assert_allclose(safe[:, 0], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(safe[:, 2], [-0.1, -0.2, -0.3])
    assert list(safe[:, 6]) == [1.0, 1.0, 1.0]
    # the step is checked against what was sent last: after a hold, motion starts again from zero
    np.testing.assert_allclose(f.limit_step(safe[2], hold_action(1.0)), [0.1, 0.1, -0.1, 0, 0, 0, 1.0])
    # dimensions without a limit (max_step 0) pass unchanged
    np.testing.assert_allclose(f.limit_step(np.array([0, 0, 0, 0.5, -0.5, 0.5, -1.0]), hold_action(1.0)),
                               [0, 0, 0, 0.5, -0.5, 0.5, -1.0])


@pytest.mark.parametrize('bad', [np.array([[np.nan] * 7]), np.array([[np.inf] + [0] * 6]), np.zeros((0, 7)),
                                 np.zeros((2, 6))])
def test_unsafe_chunks_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(UnsafeChunk):
        SafetyFilter(LIMITS).apply(bad, None)


def test_hold_keeps_the_gripper() -> None:
    np.testing.assert_array_equal(hold_action(0.7), [0, 0, 0, 0, 0, 0, 0.7])


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        SafetyLimits((0.0,) * 7, (-1.0,) * 7, (0.0,) * 7)
    with pytest.raises(ValueError):
        SafetyLimits((0.0,) * 6, (1.0,) * 7, (0.0,) * 7)


def test_limits_tightened_at_runtime_win_over_the_step_limit() -> None:
    """After action_max drops below the last command, the next one obeys the clamp, not the step limit."""
    tight = SafetyFilter(SafetyLimits((-0.01,) * 7, (0.01,) * 7, (0.05,) * 7))
    previous = np.array([0.9, -0.9, 0.3, 0.0, 0.0, 0.0, 0.8])
    out = tight.limit(np.array([0.9, -0.9, 0.9, 0.0, 0.0, 0.0, 0.8]), previous)
    assert np.abs(out).max() <= 0.01
    hold = tight.hold(previous)
    assert list(hold[:6]) == [0.0] * 6 and hold[6] == pytest.approx(0.01)  # gripper kept, but inside the limit


def test_negative_step_limit_is_refused() -> None:
    with pytest.raises(ValueError, match='≥ 0'):
        SafetyLimits((-1.0,) * 7, (1.0,) * 7, (0.1, -0.1, 0, 0, 0, 0, 0))


@pytest.mark.parametrize('text', ['pick up\x00 the bowl', '\x1b[31mput\x1b[0m it', 'put \u202eeht lwob', 'a\x9b31mb'])
def test_instructions_with_control_characters_are_refused(text: str) -> None:
    from worldvla_ros.model.prompts import check_instruction

    with pytest.raises(ValueError, match='control characters') as err:
        check_instruction(text, 512)
    assert not any(c in str(err.value) for c in '\x00\x1b\u202e\x9b')  # the message shows them escaped
    assert check_instruction('  put the\tred block\n in the bowl ', 512) == 'put the red block in the bowl'


def png_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b'\0' * (1 + 3 * width) * 4)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', body) + chunk(b'IEND', b'')


@pytest.mark.parametrize(('width', 'height'), [(40000, 40000), (9000, 10), (10, 9000)])
def test_compressed_frames_declaring_a_huge_size_are_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageRejected) as err:
        compressed_msg_to_rgb(CompressedImage(format='png', data=png_declaring(width, height)))
    assert err.value.reason == 'size'


def test_truncated_and_foreign_compressed_frames_are_refused() -> None:
    import cv2

    ok, png = cv2.imencode('.png', np.zeros((64, 64, 3), dtype=np.uint8))
    assert ok
    for data in (png.tobytes()[:60], b'GIF89a' + b'\0' * 100, b''):
        with pytest.raises(ImageRejected) as err:
            compressed_msg_to_rgb(CompressedImage(format='png', data=data))
        assert err.value.reason == 'decode'
