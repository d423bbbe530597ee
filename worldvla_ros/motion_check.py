"""Which commanded motion explains what the camera saw: counterfactual actions and a learned motion model.

A robot that moves the wrong way (a sign error in a driver), along another axis (a wrong frame) or whose
camera lags shows frames that the command does not explain but another action does: its opposite, the command
turned by 90° about z, no motion, or the command of one or two steps ago. ``counterfactual_actions`` lists
those hypotheses; the world model scores the real next frame under each of them in one batch
(``WorldModelPolicy.transition_likelihood``), and so does ``MotionModel``.

``MotionModel`` is an inverse model of the robot's own motion, fitted on its normal work: dense optical flow
between two camera frames at ``MOTION_RESOLUTION`` (where one step moves the gripper a few pixels, while the
world model's 64-pixel frame and 8-pixel codes see a fraction of a code), summarised by ``FEATURES`` values (its
mean overall and per region), mapped linearly to the commanded Δxyz. Its residual, a Student-t with the residual
covariance of normal work (flow fails now and then: an occlusion, a grasp; a Gaussian made those single
transitions look like faults), gives each hypothesis a cost in bits; the evidence of a transition is the
command's cost minus the best alternative's (no motion excepted: ``NOT_MOTION_EVIDENCE``), a log-likelihood
ratio, clipped so that one transition can only add so much, which ``SequentialEvidence`` (CUSUM) adds up over
transitions. Torch-free (numpy and OpenCV).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from worldvla_ros.image_conversion import to_model_frame

MOTION_RESOLUTION = 128
FEATURES = 8 + 2 * 4 * 4  # motion_features: 8 summary values, the mean flow of 4 × 4 regions
HYPOTHESES = ('command', 'still', 'opposite', 'turned_left', 'turned_right', 'flipped_x', 'flipped_y', 'flipped_z',
              'previous_1', 'previous_2')
DEGREES_OF_FREEDOM = 3.0  # of the Student-t residual
EVIDENCE_CLIP = 12.0  # bits one transition may add to (or take from) the sequential evidence
CUSUM_DRIFT = 3.0  # bits subtracted per transition: normal work's evidence mostly sits below it
# An arm that does not move although commanded looks the same to a camera whether it is stuck or blocked (a table
# edge, contact, a workspace limit), and a robot's normal work meets the second: no motion is no alternative for the
# motion evidence, which is about direction and timing (the world model's action_consistency sees standing still).
NOT_MOTION_EVIDENCE = ('still',)
_LN2 = math.log(2.0)


def counterfactual_actions(action: np.ndarray, recent: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
    """The command and the actions a faulty robot might have executed instead (7-vectors, gripper as commanded):
    ``still`` (nothing moved), ``opposite`` (translation and rotation negated), ``turned_left``/``turned_right``
    (the translation turned by ±90° about z: a wrong frame), ``flipped_x/y/z`` (one axis' sign wrong: a driver's
    sign error), ``previous_k`` (the command k steps back, newest
    last in ``recent``: a camera k steps late). Hypotheses without their command (the chain's first steps) are
    left out."""
    a = np.asarray(action, dtype=np.float64).reshape(7)
    out = {'command': a.copy(), 'still': np.zeros(7), 'opposite': -a, 'turned_left': a.copy(),
           'turned_right': a.copy()}
    out['still'][6] = out['opposite'][6] = a[6]
    out['turned_left'][:2] = (-a[1], a[0])
    out['turned_right'][:2] = (a[1], -a[0])
    for i, axis in enumerate('xyz'):
        out[f'flipped_{axis}'] = a.copy()
        out[f'flipped_{axis}'][i] = -a[i]
    for k in (1, 2):
        if len(recent) >= k:
            out[f'previous_{k}'] = np.asarray(recent[-k], dtype=np.float64).reshape(7).copy()
    return out


def motion_frame(frame: np.ndarray) -> np.ndarray:
    """The gray, square ``MOTION_RESOLUTION`` crop of a camera frame (the model's crop, not its resolution)."""
    square = to_model_frame(frame, MOTION_RESOLUTION, rotate_180=False)
    return cv2.cvtColor(square, cv2.COLOR_RGB2GRAY)


_GRID = np.mgrid[0:MOTION_RESOLUTION, 0:MOTION_RESOLUTION].astype(np.float32)
CELLS = 4  # the flow's mean in CELLS × CELLS regions: where in the image a motion is changes how it looks


def motion_features(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Flow summary of two ``motion_frame`` images (``FEATURES`` values): the magnitude-weighted mean flow (u, v),
    the divergence about the moving region's centre (height: things nearer the camera grow), the mean magnitude,
    their products with it, a constant, and the mean flow (u, v) of each of ``CELLS``² regions (perspective and
    the camera's placement make the same motion look different across the image)."""
    flow = cv2.calcOpticalFlowFarneback(before, after, None, 0.5, 3, 9, 3, 5, 1.1, 0)
    mag = np.linalg.norm(flow, axis=-1)
    total = float(mag.mean())
    w = mag / (float(mag.sum()) + 1e-6)
    mean = (flow * w[..., None]).sum((0, 1))
    yy, xx = _GRID
    rx, ry = xx - float((xx * w).sum()), yy - float((yy * w).sum())
    radial = (flow[..., 0] * rx + flow[..., 1] * ry) / np.sqrt(rx * rx + ry * ry + 1e-3)
    div = float((radial * w).sum())
    side = MOTION_RESOLUTION // CELLS
    cells = flow.reshape(CELLS, side, CELLS, side, 2).mean((1, 3)).reshape(-1)
    summary = [mean[0], mean[1], div, mean[0] * total, mean[1] * total, div * total, total, 1.0]
    return np.concatenate([np.array(summary), cells]).astype(np.float64)


@dataclass
class MotionModel:
    """Commanded Δxyz ≈ features @ weights; residuals ~ Student-t(dof) with the residual covariance, both found on
    normal transitions."""

    weights: np.ndarray  # (FEATURES, 3)
    covariance: np.ndarray  # (3, 3)
    dof: float = DEGREES_OF_FREEDOM
    precision: np.ndarray = field(init=False, repr=False, compare=False)  # the covariance's inverse, once

    def __post_init__(self) -> None:
        self.precision = np.linalg.inv(self.covariance)

    @classmethod
    def fit(cls, features: np.ndarray, actions: np.ndarray, ridge: float = 1e-3) -> MotionModel:
        x = np.asarray(features, dtype=np.float64).reshape(-1, FEATURES)
        y = np.asarray(actions, dtype=np.float64).reshape(len(x), -1)[:, :3]
        if len(x) < 2 * FEATURES:
            raise ValueError(f'{len(x)} transitions are too few to fit the motion model (need {2 * FEATURES})')
        w = np.linalg.solve(x.T @ x + ridge * np.eye(FEATURES), x.T @ y)
        residual = y - x @ w
        covariance = np.cov(residual, rowvar=False) + 1e-4 * np.eye(3)
        return cls(w, covariance)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.weights

    def costs(self, features: np.ndarray, hypotheses: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Bits of each hypothesis' Δxyz under the Student-t residual (constant terms dropped: only differences
        between hypotheses mean anything)."""
        p = self.predict(features)
        inv = self.precision
        nu = self.dof
        return {k: float((nu + 3) / 2 * math.log1p(float((p - h[:3]) @ inv @ (p - h[:3])) / nu) / _LN2)
                for k, h in hypotheses.items()}

    def to_json(self) -> dict[str, Any]:
        return {'resolution': MOTION_RESOLUTION, 'weights': self.weights.tolist(),
                'covariance': self.covariance.tolist(), 'dof': self.dof}

    @classmethod
    def from_json(cls, data: Any) -> MotionModel:
        if not isinstance(data, dict) or data.get('resolution') != MOTION_RESOLUTION:
            raise ValueError(f'a motion model at {MOTION_RESOLUTION} px expected')
        w = np.asarray(data.get('weights'), dtype=np.float64)
        c = np.asarray(data.get('covariance'), dtype=np.float64)
        if w.ndim == 2 and w.shape[1:] == (3,) and w.shape[0] != FEATURES:
            raise ValueError(f'its motion model reads {w.shape[0]} flow features and this version {FEATURES}: '
                             'made by another version of worldvla; calibrate again (evaluate_bag '
                             '--calibrate-monitor FILE on normal bags)')
        if w.shape != (FEATURES, 3) or c.shape != (3, 3) or not (np.isfinite(w).all() and np.isfinite(c).all()):
            raise ValueError(f'weights must be {FEATURES}×3 and covariance 3×3, finite')
        if not np.allclose(c, c.T) or np.linalg.eigvalsh(c).min() <= 0:
            raise ValueError('covariance must be symmetric positive definite')
        dof = data.get('dof', DEGREES_OF_FREEDOM)
        if not isinstance(dof, (int, float)) or isinstance(dof, bool) or not 0 < dof < 1e6:
            raise ValueError(f'dof must be a positive number, got {dof!r}')
        return cls(w, c, float(dof))


def evidence(costs: Mapping[str, float], clip: float = math.inf, ignore: Sequence[str] = ()) -> tuple[float, str]:
    """(the command's cost − the best alternative's, within ±``clip``; that alternative): positive when something
    other than the command explains the transition better, by that many bits. Hypotheses in ``ignore`` are no
    alternatives."""
    best = min((k for k in costs if k != 'command' and k not in ignore), key=lambda k: costs[k])
    return float(np.clip(costs['command'] - costs[best], -clip, clip)), best


@dataclass
class SequentialEvidence:
    """CUSUM of per-transition evidence: S ← min(cap, max(0, S + x − drift)). A persistent fault whose steps are
    each only a little surprising adds up; one odd frame does not, and ``cap`` bounds how long S takes to fall
    back once the fault is over. ``reset`` (a new episode or instruction, an e-stop reset) starts again at 0."""

    drift: float
    cap: float = math.inf
    value: float = 0.0

    def update(self, x: float) -> float:
        if math.isfinite(x):
            self.value = min(self.cap, max(0.0, self.value + x - self.drift))
        return self.value

    def reset(self) -> None:
        self.value = 0.0


def cusum_series(xs: Sequence[float], drift: float, cap: float = math.inf) -> list[float]:
    """S after each of ``xs`` from 0 (one episode)."""
    s = SequentialEvidence(drift, cap)
    return [s.update(x) for x in xs]
