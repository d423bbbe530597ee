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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

# the most one action unit may move: 1 m, π rad, the gripper's own ±1 (LIBERO: 0.05 m, 0.5 rad)
MAX_ACTION_SCALE = (1.0, 1.0, 1.0, math.pi, math.pi, math.pi, 1.0)


def action_scale_problem(values: Sequence[float]) -> str | None:
    """Why ``values`` is not a plausible action scale (7 finite values in [0, MAX_ACTION_SCALE]), or None."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) != 7 or not np.all(np.isfinite(v)):
        return f'needs 7 finite values, got {list(values)}'
    if np.any(v < 0):
        return f'must be ≥ 0 in every dimension, got {[float(x) for x in v]}'
    if np.any(v > np.asarray(MAX_ACTION_SCALE)):
        return (f'at most 1 m, π rad and 1 per action unit (metres for Δxyz, radians for Δrotation, the gripper), '
                f'got {[float(x) for x in v]}')
    return None


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
    if not np.all(np.isfinite(position)):
        raise ValueError(f'measured position is not finite: {np.asarray(position).tolist()}')
    rotated = Rotation.from_rotvec(a[3:6] * s[3:6]) * Rotation.from_quat(q)
    return np.asarray(position, dtype=np.float64) + a[:3] * s[:3], rotated.as_quat()


def gripper_positions(gripper: float, open_positions: Sequence[float], closed_positions: Sequence[float]) -> np.ndarray:
    """Joint positions for a gripper command in [−1 open, +1 closed] (clipped)."""
    t = (float(np.clip(gripper, -1.0, 1.0)) + 1.0) / 2.0
    lo, hi = np.asarray(open_positions, dtype=np.float64), np.asarray(closed_positions, dtype=np.float64)
    return lo + t * (hi - lo)


@dataclass
class DriverOutputs:
    """One command in every configured driver form (None: that form is off or has no value this time)."""

    twist: tuple[np.ndarray, np.ndarray] | None = None  # (linear m/s, angular rad/s)
    pose: tuple[np.ndarray, np.ndarray] | None = None  # (position, quaternion x y z w)
    gripper: np.ndarray | None = None  # joint positions


def output_problem(action: np.ndarray, outputs: DriverOutputs, action_min: Sequence[float],
                   action_max: Sequence[float], scale: Sequence[float], period: float,
                   measured_position: np.ndarray | None, gripper_open: Sequence[float],
                   gripper_closed: Sequence[float], hold: bool = False) -> str | None:
    """The last gate before anything is published: why a command or one of its forms may not go out (not
    finite, or beyond what the limits in force allow), or None. ``hold``: zero motion is always allowed."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    lo, hi = np.asarray(action_min, dtype=np.float64), np.asarray(action_max, dtype=np.float64)
    if a.shape != (7,) or not np.all(np.isfinite(a)):
        return f'command not finite: {a.tolist()}'
    tol = 1e-9
    if not hold and (np.any(a < lo - tol) or np.any(a > hi + tol)):
        return f'command {a.tolist()} outside action_min/action_max'
    reach = np.maximum(np.abs(lo), np.abs(hi)) * np.asarray(scale, dtype=np.float64)  # most one period may move
    if hold:
        reach[:6] = 0.0
    if outputs.twist is not None:
        linear, angular = outputs.twist
        speed = np.concatenate([linear, angular])
        if not np.all(np.isfinite(speed)) or np.any(np.abs(speed) > reach[:6] / period * (1 + 1e-9) + 1e-12):
            return f'twist {speed.tolist()} not finite or beyond the limits ({(reach[:6] / period).tolist()})'
    if outputs.pose is not None:
        position, quat = outputs.pose
        if not np.all(np.isfinite(position)) or not np.all(np.isfinite(quat)) or abs(np.linalg.norm(quat) - 1) > 1e-6:
            return f'pose target not finite: {np.asarray(position).tolist()}, {np.asarray(quat).tolist()}'
        if measured_position is not None and np.any(
                np.abs(np.asarray(position) - measured_position) > reach[:3] * (1 + 1e-9) + 1e-12):
            return f'pose target {np.asarray(position).tolist()} beyond the limits from the measured pose'
    if outputs.gripper is not None:
        q = np.asarray(outputs.gripper, dtype=np.float64)
        lo_q = np.minimum(gripper_open, gripper_closed) - tol
        hi_q = np.maximum(gripper_open, gripper_closed) + tol
        if not np.all(np.isfinite(q)) or np.any(q < lo_q) or np.any(q > hi_q):
            return f'gripper positions {q.tolist()} not finite or outside gripper_open … gripper_closed'
    return None
