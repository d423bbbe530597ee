"""Scores of one evaluation run: what the policy commanded vs what the bag recorded.

Pure NumPy on plain records, so lockstep and live runs are scored by the same code and the
tests can check every number by hand.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worldvla_ros.chunk_merge import ensemble_steps

DIMS = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
UNITS = ('m', 'm', 'm', 'rad', 'rad', 'rad', '')  # per control step, with the action scale
JERK_UNITS = ('m/s³', 'm/s³', 'm/s³', 'rad/s³', 'rad/s³', 'rad/s³', '')
GRIPPER = 6


@dataclass
class ChunkRecord:
    frame: int  # index of the observation frame the chunk was computed from
    actions: np.ndarray  # (K, 7) after the safety filter: what the node would command
    raw: np.ndarray  # (K, 7) the model's output
    latency_s: float  # inference
    end_to_end_s: float | None = None  # frame stamp → chunk received (live mode)


@dataclass
class ExecutedAction:
    gt_index: int  # the frame whose recorded action it is compared with
    action: np.ndarray  # (7,)
    seam: bool  # first action of a chunk that follows another chunk


@dataclass
class ImaginedFrame:
    step: int  # horizon step, 1 = the frame after the observation
    psnr: float
    ssim: float
    # the same scores for "nothing changes" (the observed frame repeated): what a world model must beat
    copy_psnr: float | None = None
    copy_ssim: float | None = None


@dataclass
class RunRecord:
    """Everything one episode produced, in either mode."""

    episode: str
    mode: str
    gt: np.ndarray  # (N, 7) recorded actions per frame (NaN = none)
    chunks: list[ChunkRecord] = field(default_factory=list)
    executed: list[ExecutedAction] = field(default_factory=list)
    imagined: list[ImaginedFrame] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # frames, dropped, stale, holds, rejected …
    strip: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (frame, real, imagined)
    times_s: np.ndarray | None = None  # (N,) seconds since the first frame, per frame
    commands: list = field(default_factory=list)  # lockstep: every command the node's loop sent (control.Command)


def executed_from_chunks(chunks: Sequence[ChunkRecord], n_frames: int, merge: str = 'replace',
                         decay: float = 0.01) -> list[ExecutedAction]:
    """Lockstep execution: with ``replace`` each chunk runs until the next one was computed (its frame);
    with ``ensemble`` every chunk runs to its end, each frame the weighted mean of the chunks covering it."""
    if merge == 'ensemble':
        steps = ensemble_steps([(c.frame, c.actions) for c in chunks], n_frames, decay)
        return [ExecutedAction(t, a, seam) for t, a, seam in steps]
    out: list[ExecutedAction] = []
    for j, c in enumerate(chunks):
        stop = chunks[j + 1].frame if j + 1 < len(chunks) else min(n_frames, c.frame + len(c.actions))
        for k in range(min(len(c.actions), stop - c.frame)):
            out.append(ExecutedAction(c.frame + k, c.actions[k], seam=(k == 0 and j > 0)))
    return out


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 6) if len(values) else None


def _per_dim(values: np.ndarray) -> dict[str, float | None]:
    return {d: (None if np.isnan(v) else round(float(v), 9)) for d, v in zip(DIMS, values, strict=True)}


def _nanmean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    with np.errstate(invalid='ignore'):
        count = np.sum(~np.isnan(x), axis=axis)
        total = np.nansum(x, axis=axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


DIRECTION_SPEED = 0.05  # m/s: a recorded move this fast or faster is a clear move (direction agreement)


def action_scores(runs: Sequence[RunRecord], gripper_threshold: float = 0.0,
                  direction_threshold: float = 0.25, action_scale: Sequence[float] | None = None,
                  control_rate_hz: float | None = None) -> dict[str, Any]:
    """L1/RMSE per dimension, gripper accuracy, direction agreement, error per chunk position, steps at seams.

    Direction agreement: how often Δx, Δy, Δz have the recorded action's sign, counted where the recorded
    move is clear (not a hover): faster than ``DIRECTION_SPEED`` when the action scale and control rate are
    known — the same motion counts at any rate — else larger than ``direction_threshold`` action units.
    With ``action_scale`` (metres / radians per action unit) and the control rate, the section
    ``physical`` gives the errors in m and rad per step and the jerk in m/s³ and rad/s³.
    """
    pred, true, seam_flags, prev_pred, prev_true, jerk_pred, jerk_true, jerk_seam = [], [], [], [], [], [], [], []
    nan7 = np.full(7, np.nan)
    for run in runs:
        chain: list[ExecutedAction] = []  # the executed actions of consecutive frames ending at the current one
        for e in run.executed:
            chain = [*chain[-2:], e] if chain and e.gt_index == chain[-1].gt_index + 1 else [e]
            if e.gt_index >= len(run.gt):
                continue
            pred.append(e.action)
            true.append(run.gt[e.gt_index])
            seam_flags.append(e.seam)
            last = chain[-2] if len(chain) > 1 else None
            prev_pred.append(last.action if last else nan7)
            prev_true.append(run.gt[last.gt_index] if last else nan7)
            if len(chain) == 3:
                a, b, c = chain
                jerk_pred.append(c.action - 2 * b.action + a.action)
                jerk_true.append(run.gt[c.gt_index] - 2 * run.gt[b.gt_index] + run.gt[a.gt_index])
                jerk_seam.append(b.seam or c.seam)  # the three steps straddle a chunk boundary
    if not pred:
        return {'actions_compared': 0}
    pred_a, true_a = np.asarray(pred), np.asarray(true)
    err = pred_a - true_a
    out: dict[str, Any] = {
        'actions_compared': int(np.sum(~np.isnan(err[:, :6]).any(axis=1))),
        'l1': _per_dim(_nanmean(np.abs(err))),
        'rmse': _per_dim(np.sqrt(_nanmean(err**2))),
    }
    g_ok = ~np.isnan(err[:, 6])
    out['gripper_accuracy'] = (round(float(np.mean((pred_a[g_ok, 6] > gripper_threshold)
                                                   == (true_a[g_ok, 6] > gripper_threshold))), 6)
                               if g_ok.any() else None)
    if action_scale is not None and control_rate_hz:
        scale = np.asarray(action_scale, dtype=np.float64)[:3]
        threshold = np.where(scale > 0, DIRECTION_SPEED / control_rate_hz / np.where(scale > 0, scale, 1), np.inf)
        out['direction_clear_move'] = f'recorded speed above {DIRECTION_SPEED:g} m/s'
    else:
        threshold = np.full(3, direction_threshold)
        out['direction_clear_move'] = f'recorded value above {direction_threshold:g} action units'
    clear = np.abs(true_a[:, :3]) > threshold
    agree = np.sign(pred_a[:, :3]) == np.sign(true_a[:, :3])
    out['direction_agreement'] = {
        d: (round(float(agree[clear[:, i], i].mean()), 6) if clear[:, i].any() else None) for i, d in enumerate('xyz')}
    out['direction_moves'] = {d: int(clear[:, i].sum()) for i, d in enumerate('xyz')}

    # every predicted position (executed or not) against the frame it was meant for
    k_max = max((len(c.actions) for r in runs for c in r.chunks), default=0)
    per_pos = [[] for _ in range(k_max)]
    for run in runs:
        for c in run.chunks:
            for k, a in enumerate(c.actions):
                if c.frame + k < len(run.gt):
                    per_pos[k].append(np.abs(a - run.gt[c.frame + k]))
    out['l1_by_chunk_position'] = [
        {'position': k, 'n': len(v), 'l1_mean': (round(float(np.nanmean(np.asarray(v))), 6) if v else None),
         'l1': _per_dim(_nanmean(np.asarray(v))) if v else None}
        for k, v in enumerate(per_pos)
    ]

    # |a_n − a_{n−1}| between consecutive executed actions: at seams vs inside chunks, and the
    # recorded actions' own steps at the same places for reference
    step_pred = np.abs(pred_a - np.asarray(prev_pred))
    step_true = np.abs(true_a - np.asarray(prev_true))
    seam = np.asarray(seam_flags)
    inner = ~seam & ~np.isnan(step_pred[:, 0])
    out['step_at_seams'] = _per_dim(_nanmean(step_pred[seam])) if seam.any() else None
    out['step_within_chunks'] = _per_dim(_nanmean(step_pred[inner])) if inner.any() else None
    out['recorded_step_at_seams'] = _per_dim(_nanmean(step_true[seam])) if seam.any() else None
    out['seams'] = int(seam.sum())
    if action_scale is not None and control_rate_hz:
        out['physical'] = _physical(out, np.asarray(action_scale, dtype=np.float64), control_rate_hz,
                                    np.asarray(jerk_pred).reshape(-1, 7), np.asarray(jerk_true).reshape(-1, 7),
                                    np.asarray(jerk_seam, dtype=bool))
    return out


def _physical(scores: dict[str, Any], scale: np.ndarray, rate_hz: float, jerk_pred: np.ndarray,
              jerk_true: np.ndarray, jerk_seam: np.ndarray) -> dict[str, Any]:
    """The errors in metres and radians; jerk from the second difference of the commanded deltas.

    A command is a displacement per control period T, so velocity = a·s/T and jerk = Δ²a·s/T³.
    The gripper is a state, not a motion: no jerk for it.
    """
    def scaled(per_dim: dict[str, float | None] | None, factor: np.ndarray) -> dict[str, float | None] | None:
        if per_dim is None:
            return None
        return {d: (None if v is None or np.isnan(f) else round(v * float(f), 9))
                for (d, v), f in zip(per_dim.items(), factor, strict=True)}

    jerk_scale = scale * rate_hz**3
    jerk_scale[GRIPPER] = np.nan

    def mean_abs(x: np.ndarray, where: np.ndarray) -> dict[str, float | None] | None:
        return scaled(_per_dim(_nanmean(np.abs(x[where]))), jerk_scale) if where.any() else None

    return {
        'action_scale': [float(v) for v in scale],
        'units': dict(zip(DIMS, UNITS, strict=True)),
        'l1': scaled(scores['l1'], scale),
        'rmse': scaled(scores['rmse'], scale),
        'jerk_at_seams': mean_abs(jerk_pred, jerk_seam),
        'jerk_within_chunks': mean_abs(jerk_pred, ~jerk_seam),
        'recorded_jerk_at_seams': mean_abs(jerk_true, jerk_seam),
        'jerk_units': dict(zip(DIMS, JERK_UNITS, strict=True)),
        'seam_windows': int(jerk_seam.sum()),
    }


def _finite_psnr_mean(values: np.ndarray) -> float | None:
    """Mean PSNR over frames that differ (identical frames score +inf); None if none differ."""
    finite = values[np.isfinite(values)]
    return round(float(finite.mean()), 4) if len(finite) else None


def world_model_scores(runs: Sequence[RunRecord]) -> dict[str, Any]:
    frames = [f for r in runs for f in r.imagined]
    steps = sorted({f.step for f in frames})
    by_step = []
    for s in steps:
        at_step = [f for f in frames if f.step == s]
        ps = np.array([f.psnr for f in at_step])
        entry = {'step': s, 'n': len(ps), 'psnr_db': _finite_psnr_mean(ps),
                 'identical_frames': int(np.sum(~np.isfinite(ps))),
                 'ssim': round(float(np.mean([f.ssim for f in at_step])), 6)}
        copied = [f for f in at_step if f.copy_psnr is not None]
        if copied:
            entry['copy_baseline_psnr_db'] = _finite_psnr_mean(np.array([f.copy_psnr for f in copied]))
            entry['copy_baseline_ssim'] = round(float(np.mean([f.copy_ssim for f in copied])), 6)
        by_step.append(entry)
    return {'imagined_frames': len(frames), 'by_horizon_step': by_step}


def timing_scores(runs: Sequence[RunRecord], control_rate_hz: float, deadline_s: float = 0.0) -> dict[str, Any]:
    """Latency percentiles; a deadline miss is a chunk that took longer than it lasts (or ``deadline_s``)."""
    lat, e2e, misses = [], [], 0
    for run in runs:
        for c in run.chunks:
            lat.append(c.latency_s)
            taken = c.end_to_end_s if c.end_to_end_s is not None else c.latency_s
            if c.end_to_end_s is not None:
                e2e.append(c.end_to_end_s)
            budget = deadline_s or len(c.actions) / control_rate_hz
            misses += taken > budget
    counts: dict[str, int] = {}
    for run in runs:
        for k, v in run.counts.items():
            counts[k] = counts.get(k, 0) + int(v)
    return {
        'chunks': len(lat),
        'inference_ms': {q: (None if (v := _pct(lat, p)) is None else round(v * 1e3, 3))
                         for q, p in (('p50', 50), ('p95', 95), ('p99', 99))},
        'end_to_end_ms': {q: (None if (v := _pct(e2e, p)) is None else round(v * 1e3, 3))
                          for q, p in (('p50', 50), ('p95', 95), ('p99', 99))} if e2e else None,
        'deadline': f'{deadline_s} s' if deadline_s else 'chunk length / control_rate_hz',
        'deadline_misses': int(misses),
        **counts,
    }
