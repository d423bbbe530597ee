"""World-model monitor: surprise signals of a real transition, their calibration, and sustained alerts.

Torch-free: the signals are computed from a ``CodeLikelihood`` (numpy), so the calibration tool and
the node's alert logic run and are tested without a model.

Signals (larger = more surprising):
- ``bits_per_token``: mean bits of the real next frame's codes given frame + commanded action.
- ``excess_bits``: mean of (bits − the bits the model expected at that code), so states that are
  hard to predict everywhere (a moving arm) do not look surprising by themselves.
- ``surprise_z``: the summed excess in standard deviations of the model's own prediction.
- ``peak_excess_bits``: the mean excess of the worst 1/16 of the codes: a block teleported or
  removed changes a few codes, which a mean over the whole frame dilutes.
- ``action_consistency``: bits under the commanded action − bits under no motion: positive when
  standing still explains the real frame better than the command does (a stuck arm).
- ``wm_evidence``: bits of the real next frame under the command − under the counterfactual action that
  explains it best (``motion_check.counterfactual_actions``; rows of the same forward batch): positive when the
  world model finds the robot did something else.
- ``motion_evidence`` / ``motion_cusum``: the same comparison by the calibration's ``MotionModel`` (flow at
  128 px), per transition and summed over the recent ones (CUSUM): a robot moving the wrong way or a camera
  seeing late. No motion is no alternative here (a blocked arm looks like a stuck one; ``action_consistency``
  and the frame change see standing still).
- ``frame_change`` (model-free baseline): mean squared pixel change between the two frames.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worldvla_ros.motion_check import (
    CUSUM_DRIFT,
    EVIDENCE_CLIP,
    NOT_MOTION_EVIDENCE,
    MotionModel,
    SequentialEvidence,
    counterfactual_actions,
    evidence,
)

LIKELIHOOD_SIGNALS = ('bits_per_token', 'excess_bits', 'surprise_z', 'peak_excess_bits', 'action_consistency')
MOTION_SIGNALS = ('motion_evidence', 'motion_cusum')
KNOWN_SIGNALS = (*LIKELIHOOD_SIGNALS, 'wm_evidence', *MOTION_SIGNALS, 'frame_change')
DEFAULT_ALERT_SIGNALS = ('peak_excess_bits', 'action_consistency')
MOTION_ALERT_SIGNALS = (*DEFAULT_ALERT_SIGNALS, 'motion_cusum')  # with a motion model
CUSUM_CAP = 24.0  # bits, for a calibration file without one (calibrate_episodes: twice the threshold)
CALIBRATION_FORMAT = 'worldvla-monitor-calibration/1'
CALIBRATION_FILE = 'monitor_calibration.json'  # a checkpoint may ship one (the bundled model does, for the sim)


def likelihood_signals(bits: np.ndarray, expected: np.ndarray, variance: np.ndarray,
                       bits_still: np.ndarray | None = None) -> dict[str, float]:
    """The likelihood signals of one transition from its per-code arrays (grid×grid each)."""
    excess = (np.asarray(bits) - np.asarray(expected)).reshape(-1)
    worst = max(1, excess.size // 16)
    out = {
        'bits_per_token': float(np.mean(bits)),
        'excess_bits': float(excess.mean()),
        'surprise_z': float(excess.sum() / math.sqrt(float(np.sum(variance)) + 1e-6)),
        'peak_excess_bits': float(np.sort(excess)[-worst:].mean()),
    }
    if bits_still is not None:
        out['action_consistency'] = float(np.mean(bits) - np.mean(bits_still))
    return out


def transition_signals(likelihood: Any, frame: np.ndarray, next_frame: np.ndarray,
                       hypotheses: Sequence[str] = ()) -> dict[str, float]:
    """Every signal of one transition: the likelihood signals of a ``CodeLikelihood`` whose rows are the commanded
    action, no motion and (named by ``hypotheses``, which then lists every row) further counterfactuals, and
    the frame change between the two model-resolution frames."""
    lik = likelihood
    out = likelihood_signals(lik.bits[0], lik.expected_bits[0], lik.variance[0], lik.bits[1])
    if len(hypotheses) > 2:
        out['wm_evidence'] = world_model_evidence(lik, hypotheses)[0]
    out['frame_change'] = frame_change(frame, next_frame)
    return out


def world_model_evidence(likelihood: Any, hypotheses: Sequence[str]) -> tuple[float, str]:
    """(bits of the whole next frame under the command − under the best other row, that row's name)."""
    totals = np.asarray(likelihood.bits).reshape(len(hypotheses), -1).sum(axis=1)
    if hypotheses[0] != 'command':
        raise ValueError('the first row must be the command')
    return evidence(dict(zip(hypotheses, (float(t) for t in totals), strict=True)))


def frame_change(frame: np.ndarray, next_frame: np.ndarray) -> float:
    """Mean squared change per pixel and channel (0–65025): the model-free baseline."""
    a, b = np.asarray(frame, dtype=np.float32), np.asarray(next_frame, dtype=np.float32)
    return float(np.mean((a - b) ** 2))


def excess_map(bits: np.ndarray, expected: np.ndarray, resolution: int, max_bits: float = 8.0) -> np.ndarray:
    """R×R×3 uint8 heat map of the excess bits per code (black: as expected or better; white: ``max_bits``)."""
    import cv2

    excess = np.clip((np.asarray(bits) - np.asarray(expected)) / max_bits, 0.0, 1.0)
    gray = np.round(excess * 255).astype(np.uint8)
    heat = cv2.applyColorMap(cv2.resize(gray, (resolution, resolution), interpolation=cv2.INTER_NEAREST),
                             cv2.COLORMAP_INFERNO)
    return np.ascontiguousarray(heat[..., ::-1])


class CalibrationError(ValueError):
    pass


class MotionFitError(CalibrationError):
    """The motion model could not be fitted (too few or degenerate transitions); a calibration without it can."""


@dataclass
class Calibration:
    """Per-signal thresholds for a false-alarm rate, found on normal transitions (an alarm: any signal above)."""

    thresholds: dict[str, float]
    false_alarm_rate: float
    transitions: int
    model_id: str = ''
    measured_rate: float = 0.0
    source: list[str] = field(default_factory=list)
    weights: str = ''  # checkpoint.weights_fingerprint of the weights it was found with
    motion: MotionModel | None = None  # the robot's motion, for motion_evidence / motion_cusum
    cusum_drift: float = CUSUM_DRIFT
    cusum_cap: float = CUSUM_CAP
    # thresholds of transitions in a condition that legitimately surprises more (CONDITIONS), found on those alone
    by_condition: dict[str, dict[str, float]] = field(default_factory=dict)

    def fits(self, model_id: str, weights: str = '') -> bool:
        """Whether these thresholds were found for these weights: ids are ``<directory>@<config digest>`` and a
        checkpoint's directory name differs between the source tree and an install, so the config digest decides,
        and the weights' fingerprint where both sides have one (one config.json is shared by a fine-tune that kept
        the action statistics, or by the weights before a revision). An empty id (a hand-written file) fits any
        model."""
        if not self.model_id:
            return True
        same_config = self.model_id.split('@')[-1] == model_id.split('@')[-1]
        return same_config and (not self.weights or not weights or self.weights == weights)

    def alarm(self, signals: Mapping[str, float], condition: str = 'normal') -> list[str]:
        """The signals above their thresholds (an alarm when not empty) for a transition in ``condition``
        (``transition_condition``); a missing signal never alarms."""
        thresholds = self.by_condition.get(condition, self.thresholds)
        return [k for k, t in thresholds.items() if k in signals and signals[k] > t]

    def to_json(self) -> dict[str, Any]:
        out = {'format': CALIBRATION_FORMAT, 'model_id': self.model_id, 'weights': self.weights,
               'false_alarm_rate': self.false_alarm_rate,
               'measured_rate': self.measured_rate, 'transitions': self.transitions,
               'thresholds': self.thresholds, 'source': self.source}
        if self.by_condition:
            out['by_condition'] = self.by_condition
        if self.motion is not None:
            out['motion'] = {**self.motion.to_json(), 'cusum_drift': self.cusum_drift, 'cusum_cap': self.cusum_cap}
        return out

    def sequential(self) -> SequentialEvidence | None:
        """A fresh CUSUM of this calibration's motion evidence (None without a motion model)."""
        return None if self.motion is None else SequentialEvidence(self.cusum_drift, self.cusum_cap)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + '\n')

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """A calibration file, every field checked: a CalibrationError naming the file and the field otherwise."""
        from worldvla_ros.files import MB, FileRefused, read_text

        try:
            data = json.loads(read_text(path, MB, 'monitor calibration'))
        except FileRefused as exc:
            raise CalibrationError(str(exc)) from exc
        except (ValueError, RecursionError) as exc:
            raise CalibrationError(f'monitor calibration {path}: not valid JSON ({type(exc).__name__}: '
                                   f'{str(exc)[:200]})') from exc
        if not isinstance(data, dict) or data.get('format') != CALIBRATION_FORMAT:
            raise CalibrationError(f'{path} is not a monitor calibration ({CALIBRATION_FORMAT})')
        th = data.get('thresholds')
        if not isinstance(th, dict) or not th or not all(_is_number(v) and math.isfinite(v) for v in th.values()):
            raise CalibrationError(f'{path}: thresholds must be a non-empty map of finite numbers')
        unknown = set(th) - set(KNOWN_SIGNALS)
        if unknown:
            raise CalibrationError(f'{path}: unknown signals {sorted(unknown)}')
        motion, drift, cap = None, CUSUM_DRIFT, CUSUM_CAP
        if data.get('motion') is not None:
            m = data['motion']
            try:
                motion = MotionModel.from_json(m)
            except (ValueError, TypeError) as exc:
                raise CalibrationError(f'{path}: motion: {exc}') from exc
            drift, cap = m.get('cusum_drift', CUSUM_DRIFT), m.get('cusum_cap', CUSUM_CAP)
            if not (_is_number(drift) and _is_number(cap) and 0 <= drift < 1e3 and 0 < cap < 1e6):
                raise CalibrationError(f'{path}: motion: cusum_drift in [0, 1000) and cusum_cap in (0, 1e6)')
        elif set(MOTION_SIGNALS) & set(th):
            raise CalibrationError(f'{path}: thresholds for {sorted(set(MOTION_SIGNALS) & set(th))} need a motion '
                                   'model')
        rate = data.get('false_alarm_rate', 0.0)
        if not _is_number(rate) or not 0.0 < rate < 1.0:
            raise CalibrationError(f'{path}: false_alarm_rate must be a number in (0, 1), got {rate!r}')
        measured = data.get('measured_rate', 0.0)
        if not _is_number(measured) or not 0.0 <= measured <= 1.0:
            raise CalibrationError(f'{path}: measured_rate must be a number in [0, 1], got {measured!r}')
        transitions = data.get('transitions', 0)
        if not isinstance(transitions, int) or isinstance(transitions, bool) or transitions < 0:
            raise CalibrationError(f'{path}: transitions must be a whole number ≥ 0, got {transitions!r}')
        model_id, source = data.get('model_id', ''), data.get('source', [])
        if not isinstance(model_id, str):
            raise CalibrationError(f'{path}: model_id must be a string, got {model_id!r}')
        weights = data.get('weights', '')
        if not isinstance(weights, str) or len(weights) > 64:
            raise CalibrationError(f'{path}: weights must be a fingerprint string, got {str(weights)[:80]!r}')
        if not isinstance(source, list) or not all(isinstance(x, str) for x in source):
            raise CalibrationError(f'{path}: source must be a list of bag names')
        by_condition = data.get('by_condition', {})
        if not isinstance(by_condition, dict) or not set(by_condition) <= set(CONDITIONS) or not all(
                isinstance(t, dict) and set(t) == set(th) and all(_is_number(v) and math.isfinite(v)
                                                                  for v in t.values()) for t in by_condition.values()):
            raise CalibrationError(f'{path}: by_condition must map conditions {CONDITIONS} to thresholds of the same '
                                   'signals')
        return cls({k: float(v) for k, v in th.items()}, float(rate), transitions, model_id, float(measured),
                   list(source), weights, motion, float(drift), float(cap),
                   {c: {k: float(v) for k, v in t.items()} for c, t in by_condition.items()})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def min_transitions(false_alarm_rate: float) -> int:
    """Normal transitions needed to calibrate for ``false_alarm_rate``: at least two above the threshold."""
    return math.ceil(2 / false_alarm_rate)


def calibrate(normal: Sequence[Mapping[str, float]], false_alarm_rate: float,
              signals: Sequence[str] = DEFAULT_ALERT_SIGNALS, model_id: str = '', weights: str = '') -> Calibration:
    """Thresholds at one common quantile of each signal's normal values, chosen so that the share of normal
    transitions with any signal above its threshold is at most ``false_alarm_rate`` (the largest such)."""
    if not 0.0 < false_alarm_rate < 1.0:  # NaN fails too
        raise CalibrationError(f'false_alarm_rate must be in (0, 1), got {false_alarm_rate}')
    missing = [s for s in signals if any(s not in n for n in normal)]
    if missing:
        raise CalibrationError(f'signals missing from some transitions: {missing}')
    values = np.array([[n[s] for s in signals] for n in normal], dtype=np.float64).reshape(len(normal), len(signals))
    values = values[np.isfinite(values).all(axis=1)]
    if len(values) < min_transitions(false_alarm_rate):
        raise CalibrationError(f'{len(values)} normal transitions are too few for a false-alarm rate of '
                               f'{false_alarm_rate} (need at least {min_transitions(false_alarm_rate)})')
    ranks = np.argsort(np.argsort(values, axis=0), axis=0)  # 0 … n-1 per signal
    n = len(values)
    # a threshold just above the value of rank r alarms on ranks > r; alarms(r) = rows whose max rank > r
    worst = ranks.max(axis=1)
    allowed = math.floor(false_alarm_rate * n)
    r = int(np.sort(worst)[n - 1 - allowed])  # alarm only on rows above this rank (allowed < n: the rate is < 1)
    ordered = np.sort(values, axis=0)
    thresholds = {s: float(ordered[r, i]) for i, s in enumerate(signals)}
    measured = float(np.mean((values > ordered[r][None]).any(axis=1)))
    return Calibration(thresholds, false_alarm_rate, n, model_id, measured, weights=weights)


CONDITIONS = ('gripper_toggle',)  # besides 'normal'


def transition_condition(command: np.ndarray, previous: np.ndarray | None) -> str:
    """'gripper_toggle' when the gripper command changed sign since the previous command (fingers move, a block is
    picked or dropped: the world model is more surprised, legitimately), else 'normal'."""
    if previous is not None and np.sign(float(np.asarray(previous)[6])) != np.sign(float(np.asarray(command)[6])):
        return 'gripper_toggle'
    return 'normal'


def motion_signals(model: MotionModel, cusum: SequentialEvidence, features: np.ndarray, command: np.ndarray,
                   recent: Sequence[np.ndarray] = ()) -> tuple[dict[str, float], str]:
    """``motion_evidence`` and ``motion_cusum`` (``cusum`` updated) of one transition, and which counterfactual
    action explains its flow best."""
    x, best = evidence(model.costs(features, counterfactual_actions(command, recent)), EVIDENCE_CLIP,
                       NOT_MOTION_EVIDENCE)
    return {'motion_evidence': x, 'motion_cusum': cusum.update(x)}, best


def chain_motion_signals(model: MotionModel, cusum: SequentialEvidence, features: Sequence[np.ndarray],
                         commands: Sequence[np.ndarray]) -> list[tuple[dict[str, float], str, str]]:
    """Along one chain of transitions (the command of each and the two before it, as the node sees them): the
    motion signals, the best explanation and the transition's condition of each."""
    out = []
    for k, command in enumerate(commands):
        found, best = motion_signals(model, cusum, features[k], command, list(commands[max(0, k - 2):k]))
        out.append((found, best, transition_condition(command, commands[k - 1] if k else None)))
    return out


@dataclass
class CalibrationEpisode:
    """One episode of normal work, transition by transition: flow features, commands, the other signals."""

    name: str
    features: list[np.ndarray]
    commands: list[np.ndarray]
    signals: list[dict[str, float]]


def calibrate_episodes(episodes: Sequence[CalibrationEpisode], false_alarm_rate: float,
                       signals: Sequence[str] = MOTION_ALERT_SIGNALS, model_id: str = '', weights: str = '',
                       drift: float = CUSUM_DRIFT, cap: float | None = None) -> Calibration:
    """A calibration with a motion model, on whole episodes (the sequential evidence runs along each): the motion
    model is fitted on every transition; the thresholds come from motion evidence cross-fitted by episode (each
    half's from a model fitted on the other half), so they are not those of a model that has seen the very
    transitions it scores. ``cap`` (default: twice the motion_cusum threshold, found uncapped) bounds how long
    the evidence takes to fall back after a fault; a cap above the threshold changes no alarm of the calibration
    set but the ones that follow a peak above it."""
    eps = [e for e in episodes if e.commands]
    feats = [np.asarray(e.features, dtype=np.float64).reshape(len(e.commands), -1) for e in eps]
    acts = [np.asarray(e.commands, dtype=np.float64).reshape(len(e.commands), 7) for e in eps]
    try:
        model = MotionModel.fit(np.concatenate(feats), np.concatenate(acts))
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise MotionFitError(f'cannot fit the motion model: {exc}') from exc
    folds = [model] * len(eps)
    if len(eps) >= 4:
        try:
            half = [MotionModel.fit(np.concatenate(feats[1 - j::2]), np.concatenate(acts[1 - j::2])) for j in (0, 1)]
            folds = [half[i % 2] for i in range(len(eps))]
        except (ValueError, np.linalg.LinAlgError):
            pass  # too few transitions in a half: thresholds from the model that saw them (a little optimistic)
    rows: list[dict[str, float]] = []
    conditions: list[str] = []
    for e, f, a, m in zip(eps, feats, acts, folds, strict=True):
        for k, (found, _, condition) in enumerate(chain_motion_signals(m, SequentialEvidence(
                drift, math.inf if cap is None else cap), f, a)):
            rows.append({**e.signals[k], **found})
            conditions.append(condition)
    # each condition with enough transitions gets thresholds of its own at the same rate; the rest share them
    special = {c: [r for r, rc in zip(rows, conditions, strict=True) if rc == c] for c in CONDITIONS}
    special = {c: rs for c, rs in special.items() if len(rs) >= min_transitions(false_alarm_rate)}
    usual = [r for r, rc in zip(rows, conditions, strict=True) if rc not in special]
    cal = calibrate(usual, false_alarm_rate, signals, model_id, weights)
    cal.by_condition = {c: calibrate(rs, false_alarm_rate, signals).thresholds for c, rs in special.items()}
    if special:
        alarms = sum(bool(cal.alarm(r, c)) for r, c in zip(rows, conditions, strict=True))
        cal.transitions, cal.measured_rate = len(rows), alarms / len(rows)
    if cap is None:
        cap = 2 * max(cal.thresholds.get('motion_cusum', CUSUM_CAP / 2), drift, 1.0)
    cal.motion, cal.cusum_drift, cal.cusum_cap = model, float(drift), float(cap)
    cal.source = [e.name for e in eps]
    return cal


@dataclass
class AlertState:
    """Sustained surprise: WARN after ``warn_after`` alarms in a row, ERROR after ``error_after``."""

    warn_after: int = 2
    error_after: int = 5
    streak: int = 0

    def update(self, alarm: bool) -> int:
        """The diagnostics level after one transition: 0 OK, 1 WARN, 2 ERROR."""
        self.streak = self.streak + 1 if alarm else 0
        return self.level

    @property
    def level(self) -> int:
        if self.streak >= self.error_after:
            return 2
        return 1 if self.streak >= self.warn_after else 0


def auroc(normal: Sequence[float], anomalous: Sequence[float]) -> float:
    """Probability that an anomalous score exceeds a normal one (ties count half)."""
    a, b = np.asarray(normal, dtype=np.float64), np.asarray(anomalous, dtype=np.float64)
    if not len(a) or not len(b):
        return float('nan')
    greater = (b[:, None] > a[None, :]).mean()
    ties = (b[:, None] == a[None, :]).mean()
    return float(greater + 0.5 * ties)


def detection_rate(normal: Sequence[float], anomalous: Sequence[float], false_alarm_rate: float = 0.05) -> float:
    """Share of anomalies above the threshold that lets ``false_alarm_rate`` of the normal scores through."""
    a = np.sort(np.asarray(normal, dtype=np.float64))
    k = len(a) - 1 - math.floor(false_alarm_rate * len(a))
    threshold = a[max(k, 0)]
    return float(np.mean(np.asarray(anomalous, dtype=np.float64) > threshold))
