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
