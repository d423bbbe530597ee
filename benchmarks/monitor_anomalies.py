"""Anomaly detection of the world-model monitor in the tabletop sim (held-out layouts), printed as JSON.

For 300 normal and 100 anomalous transitions of each kind (``worldvla_ros.sim.anomalies``): every signal
of ``worldvla_ros.monitor`` (the likelihood signals, one teacher-forced pass of two rows), the old
surprise (PSNR/SSIM of the imagined vs the real next frame; larger score = lower PSNR) and the
model-free baseline (pixel change between the two real frames). Reported per kind and signal: AUROC
and the detection rate at 5 % false alarms, each read in the direction that detects best (named); the cost
per transition of each; and the calibrated
monitor (thresholds from a separate set of normal transitions) as the node would run it.

    python benchmarks/monitor_anomalies.py [--checkpoint DIR] > benchmarks/results/monitor_anomalies.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worldvla_ros.metrics import psnr, ssim
from worldvla_ros.model import load_policy
from worldvla_ros.monitor import (
    DEFAULT_ALERT_SIGNALS,
    Calibration,
    auroc,
    calibrate,
    detection_rate,
    frame_change,
    likelihood_signals,
    motion_signals,
)
from worldvla_ros.motion_check import motion_features, motion_frame
from worldvla_ros.sim.anomalies import KINDS, anomalous_transition, normal_transition
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.closed_loop import HELD_OUT_SEED

SHIPPED: Calibration | None = None


def score(policy, t, imagine: bool, costs: dict[str, list[float]]) -> dict[str, float]:
    t0 = time.perf_counter()
    lik = policy.transition_likelihood(t.frame, t.action, t.next_frame)
    t1 = time.perf_counter()
    out = likelihood_signals(lik.bits[0], lik.expected_bits[0], lik.variance[0], lik.bits[1])
    t2 = time.perf_counter()
    out['frame_change'] = frame_change(policy.model_frame(t.frame), policy.model_frame(t.next_frame))
    if SHIPPED is not None and SHIPPED.motion is not None:  # a transition on its own: a chain of one
        feats = motion_features(motion_frame(t.frame), motion_frame(t.next_frame))
        out.update(motion_signals(SHIPPED.motion, SHIPPED.sequential(), feats, t.action)[0])
    t3 = time.perf_counter()
    costs['likelihood_ms'].append((t1 - t0) * 1e3 + (t2 - t1) * 1e3)
    costs['frame_change_ms'].append((t3 - t2) * 1e3)
    if imagine:
        t4 = time.perf_counter()
        imagined = policy.imagine(t.frame, t.action)
        costs['imagine_ms'].append((time.perf_counter() - t4) * 1e3)
        real = policy.model_frame(t.next_frame)
        p = psnr(real, imagined)
        out['imagined_psnr'] = -(p if np.isfinite(p) else 100.0)  # larger = more surprising
        out['imagined_ssim'] = -ssim(real, imagined)
    return out


def oriented(normal: list[float], anomalous: list[float]) -> dict:
    """AUROC and detection at 5 % false alarms read in the direction that detects best (a baseline at its best:
    a stuck arm changes no pixel, so the frame change detects it by being low), and which direction that is."""
    a = auroc(normal, anomalous)
    sign = 1.0 if a >= 0.5 else -1.0
    return {'auroc': round(max(a, 1 - a), 3), 'direction': 'higher' if sign > 0 else 'lower',
            'detected_at_5pct': round(detection_rate([sign * x for x in normal], [sign * x for x in anomalous]), 3)}


def stream_costs(policy, steps: int = 40) -> dict[str, float]:
    """Median ms per transition of each signal on one expert episode, as the node meets them: every camera
    frame's tokens are encoded once and reused by the next transition (the per-kind costs above encode both
    frames of every transition)."""
    from worldvla_ros.sim.record import expert_episode

    frames, actions, _, _ = expert_episode(HELD_OUT_SEED + 99_000, max_steps=steps + 1)
    times: dict[str, list[float]] = {'likelihood_two_rows_ms': [], 'likelihood_one_row_ms': [], 'imagine_ms': [],
                                     'frame_change_ms': []}
    calls = {
        'likelihood_two_rows_ms': lambda f, a, nxt: policy.transition_likelihood(f, a, nxt),
        'likelihood_one_row_ms': lambda f, a, nxt: policy.transition_likelihood(f, a, nxt, still=False),
        'imagine_ms': lambda f, a, nxt: policy.imagine(f, a),
        'frame_change_ms': lambda f, a, nxt: frame_change(policy.model_frame(f), policy.model_frame(nxt)),
    }
    for i in range(len(actions) - 1):
        for key, call in calls.items():
            t = time.perf_counter()
            call(frames[i], actions[i], frames[i + 1])
            times[key].append((time.perf_counter() - t) * 1e3)
    return {k: round(float(np.median(v)), 2) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--checkpoint', default=None, help='default: the bundled model')
    ap.add_argument('--per-kind', type=int, default=100, help='anomalous transitions per kind')
    ap.add_argument('--normal', type=int, default=300, help='normal transitions (the false alarms of every table)')
    ap.add_argument('--calibration', type=int, default=500,
                    help='other normal transitions, for the calibrated monitor')
    ap.add_argument('--false-alarm-rate', type=float, default=0.05)
    ap.add_argument('--no-imagine', action='store_true', help='skip the imagined-frame surprise (the slow part)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--costs-only', action='store_true', help='only the per-transition costs on a stream')
    ap.add_argument('--offset', type=int, default=0,
                    help='shift every seed by this much (another held-out range: 5000 keeps within each block)')
    ap.add_argument('--shipped', default='', metavar='FILE',
                    help='also report this calibration file as it stands (e.g. the one the bundled model ships)')
    args = ap.parse_args(argv)
    global SHIPPED
    SHIPPED = Calibration.load(args.shipped) if args.shipped else None
    policy = load_policy(args.checkpoint or bundled_checkpoint(), device=args.device)
    policy.use_cpu_threads(1)
    imagine = not args.no_imagine
    if args.costs_only:
        print(json.dumps({'model': policy.model_id, 'device': str(policy.device),
                          'cost_ms_stream': stream_costs(policy)}, indent=1))
        return 0
    costs: dict[str, list[float]] = {'likelihood_ms': [], 'frame_change_ms': [], 'imagine_ms': []}
    # every layout held out (100000–199999; training used the other ranges): normal 110000+, the kinds
    # 120000+ … 170000+, calibration 180000+ (each at most 10000)
    base = HELD_OUT_SEED + 10_000 + args.offset
    if not 0 <= args.offset <= 10_000 - max(args.normal, args.per_kind, args.calibration):
        raise SystemExit('--offset must keep every block within its 10000 seeds')
    normal = [score(policy, normal_transition(base + i), imagine, costs) for i in range(args.normal)]
    anomalous = {kind: [score(policy, anomalous_transition(kind, base + 10_000 * (k + 1) + i), imagine, costs)
                        for i in range(args.per_kind)] for k, kind in enumerate(KINDS)}
    signals = [s for s in normal[0] if s in normal[0]]
    table = {kind: {s: oriented([n[s] for n in normal], [a[s] for a in rows]) for s in signals}
             for kind, rows in anomalous.items()}
    calib_set = [score(policy, normal_transition(base + 70_000 + i), False, costs) for i in range(args.calibration)]
    monitors = {}
    for name, chosen in (('default', DEFAULT_ALERT_SIGNALS), ('with_frame_change', (*DEFAULT_ALERT_SIGNALS,
                                                                                    'frame_change'))):
        cal = calibrate(calib_set, args.false_alarm_rate, chosen, model_id=policy.model_id,
                        weights=policy.weights_digest)
        monitors[name] = {'thresholds': cal.thresholds, 'calibration_rate': cal.measured_rate,
                          'held_out_false_alarms': float(np.mean([bool(cal.alarm(n)) for n in normal])),
                          'held_out_false_alarms_by_signal': {k: float(np.mean([n[k] > t for n in normal]))
                                                              for k, t in cal.thresholds.items()},
                          'detected': {kind: float(np.mean([bool(cal.alarm(a)) for a in rows]))
                                       for kind, rows in anomalous.items()}}
    if SHIPPED is not None:
        monitors['as_shipped'] = {'file': args.shipped, 'thresholds': SHIPPED.thresholds,
                                  'held_out_false_alarms': float(np.mean([bool(SHIPPED.alarm(n)) for n in normal])),
                                  'detected': {kind: float(np.mean([bool(SHIPPED.alarm(a)) for a in rows]))
                                               for kind, rows in anomalous.items()}}
    result = {
        'model': policy.model_id, 'device': str(policy.device), 'seed_offset': args.offset,
        'per_kind': args.per_kind, 'normal': args.normal,
        'calibration': args.calibration,
        'table': table, 'calibrated_monitor': monitors,
        'cost_ms_median': {k: round(float(np.median(v)), 2) for k, v in costs.items() if v},
        'cost_ms_stream': stream_costs(policy),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
