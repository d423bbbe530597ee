"""Commands in the forms robot drivers already take: MoveIt Servo twists, pose targets, gripper
positions for ros2_control's forward-command and joint-trajectory controllers.

Every form is computed from the one command the action node sends (after clamp, step limit,
hold and e-stop), so the limits reach each of them. Conventions, for an action
a = [Δx, Δy, Δz, Δrx, Δry, Δrz, g] over one control period T with ``action_scale`` s:

- twist: v = a[:3]·s[:3] / T (m/s), ω = a[3:6]·s[3:6] / T (rad/s); the rotation delta is a rotation
  vector (axis × angle) in the twist's frame, as robosuite's OSC_POSE controller reads it;
- pose target: p' = p + a[:3]·s[:3], R' = Rot(a[3:6]·s[3:6]) · R, both in the measured pose's frame
  (the rotation applied in that frame, not the end effector's);
- gripper: q = open + (g + 1)/2 · (closed − open) per joint, g = −1 open, +1 closed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.transform import Rotation


def twist_from_action(action: np.ndarray, scale: np.ndarray, period: float) -> tuple[np.ndarray, np.ndarray]:
    """(linear m/s, angular rad/s) of one command."""
    a, s = np.asarray(action, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    return a[:3] * s[:3] / period, a[3:6] * s[3:6] / period


def pose_target(position: np.ndarray, quat_xyzw: np.ndarray, action: np.ndarray,
                scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, quaternion x y z w) one command moves the measured pose to."""
    a, s = np.asarray(action, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    q = np.asarray(quat_xyzw, dtype=np.float64)
    if not np.all(np.isfinite(q)) or np.linalg.norm(q) < 1e-6:
        raise ValueError(f'measured orientation is not a rotation: {q.tolist()}')
    rotated = Rotation.from_rotvec(a[3:6] * s[3:6]) * Rotation.from_quat(q)
    return np.asarray(position, dtype=np.float64) + a[:3] * s[:3], rotated.as_quat()


def gripper_positions(gripper: float, open_positions: Sequence[float], closed_positions: Sequence[float]) -> np.ndarray:
    """Joint positions for a gripper command in [−1 open, +1 closed] (clipped)."""
    t = (float(np.clip(gripper, -1.0, 1.0)) + 1.0) / 2.0
    lo, hi = np.asarray(open_positions, dtype=np.float64), np.asarray(closed_positions, dtype=np.float64)
    return lo + t * (hi - lo)
