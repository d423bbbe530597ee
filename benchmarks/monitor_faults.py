"""The monitor against persistent faults: a robot moving the wrong way, along another axis, or a camera seeing late.

Tabletop sim, bundled model, expert-driven episodes (``worldvla_ros.sim.anomalies.fault_episode``): each fault
starts at a random transition of an episode's first half and lasts to its end. The monitor is calibrated
(``calibrate_episodes``, 1 % false alarms per transition) on normal expert episodes of one layout range and
tested on two other held-out ranges, and on episodes the bundled policy drives (its own normal work). Per range:
per-transition AUROC of each signal, read in the direction that detects best (fault transitions from the onset
to 10 after it, against every normal transition); the calibrated monitor's detection within 5 transitions of the
onset, its latency, false alarms per transition and per hour at 10 Hz, with Wilson 95 % intervals; the cost per
transition of each part.

    python benchmarks/monitor_faults.py --calibration worldvla_ros/data/tabletop_model/monitor_calibration.json \
        --no-counterfactuals --policy-episodes 20 > benchmarks/results/monitor_faults_shipped.json
    python benchmarks/monitor_faults.py [--episodes 20]   # calibrated in the run, on expert episodes 185000+
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worldvla_ros.metrics import wilson95
from worldvla_ros.model import load_policy
from worldvla_ros.monitor import (
    MOTION_ALERT_SIGNALS,
    AlertState,
    Calibration,
    CalibrationEpisode,
    auroc,
    calibrate_episodes,
    chain_motion_signals,
    transition_signals,
    world_model_evidence,
)
from worldvla_ros.motion_check import counterfactual_actions, motion_features, motion_frame
from worldvla_ros.sim.anomalies import FAULTS, fault_episode
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.closed_loop import run_episode

WINDOW = 5  # transitions from the onset within which a detection counts
SCORED_AFTER_ONSET = 10
CONTROL_HZ = 10.0
COSTS: dict[str, list[float]] = {'world_model_2_rows_ms': [], 'world_model_all_rows_ms': [], 'motion_ms': []}


def score_episode(policy, observed: list, commands: list, last: int | None = None,
                  counterfactuals: bool = True) -> CalibrationEpisode:
    """Every signal but the calibrated motion ones, per transition (up to ``last``); without ``counterfactuals``
    the world model scores the command and no motion only (no wm_evidence)."""
    n = len(commands) if last is None else min(len(commands), last)
    gray = [motion_frame(f) for f in observed[: n + 1]]
    model = [policy.model_frame(f) for f in observed[: n + 1]]
    feats, rows = [], []
    for k in range(n):
        t0 = time.perf_counter()
        feats.append(motion_features(gray[k], gray[k + 1]))
        t1 = time.perf_counter()
        COSTS['motion_ms'].append((t1 - t0) * 1e3)
        if not counterfactuals:
            lik = policy.transition_likelihood(model[k], commands[k], model[k + 1])
            COSTS['world_model_2_rows_ms'].append((time.perf_counter() - t1) * 1e3)
            rows.append(transition_signals(lik, model[k], model[k + 1]))
            continue
        hyp = counterfactual_actions(commands[k], commands[max(0, k - 2):k])
        lik = policy.transition_likelihood(model[k], None, model[k + 1], rows=list(hyp.values()))
        t2 = time.perf_counter()
        sig = transition_signals(lik, model[k], model[k + 1], list(hyp))
        sig['wm_best'] = world_model_evidence(lik, list(hyp))[1]
        rows.append(sig)
        COSTS['world_model_all_rows_ms'].append((t2 - t1) * 1e3)
        if k % 10 == 0:
            t3 = time.perf_counter()
            policy.transition_likelihood(model[k], commands[k], model[k + 1])
            COSTS['world_model_2_rows_ms'].append((time.perf_counter() - t3) * 1e3)
    return CalibrationEpisode('', feats, [np.asarray(c, dtype=np.float64) for c in commands[:n]], rows)


def with_motion(cal, ep: CalibrationEpisode) -> list[dict]:
    found = chain_motion_signals(cal.motion, cal.sequential(), ep.features, ep.commands)
    return [{**sig, **f, 'motion_best': best, 'condition': condition}
            for sig, (f, best, condition) in zip(ep.signals, found, strict=True)]


def policy_episode(policy, seed: int, steps: int) -> tuple[list, list]:
    trace: list = []
    run_episode(policy, seed, trace=trace)
    frames = [f for f, _ in trace][: steps + 1]
    return frames, [a for _, a in trace if a is not None][:steps]


def rate(hits: int, n: int) -> dict:
    lo, hi = wilson95(hits, n)
    return {'rate': round(hits / n, 4) if n else None, 'ci95': [round(lo, 4), round(hi, 4)], 'n': n}


def oriented_auroc(normal: list[float], faulty: list[float]) -> dict:
    a = auroc(normal, faulty)
    return {'auroc': round(max(a, 1 - a), 3), 'direction': 'higher' if a >= 0.5 else 'lower'}


def false_alarms(cal, episodes: list[list[dict]]) -> dict:
    """Per transition and per hour at CONTROL_HZ, WARN events (AlertState), and which signals alarmed."""
    n = alarmed = warns = 0
    by_signal: Counter[str] = Counter()
    for ep in episodes:
        state, level = AlertState(), 0
        for s in ep:
            fired = cal.alarm(s, s['condition'])
            by_signal.update(fired)
            n, alarmed = n + 1, alarmed + bool(fired)
            new = state.update(bool(fired))
            warns += new >= 1 and level == 0
            level = new
    hours = n / CONTROL_HZ / 3600
    per_hour = lambda count: round(count / hours, 1) if n else None  # noqa: E731 (no episodes: --policy-episodes 0)
    return {'per_transition': rate(alarmed, n), 'alarmed_transitions_per_hour': per_hour(alarmed),
            'warn_events_per_hour': per_hour(warns), 'alarms_by_signal': dict(by_signal)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--checkpoint', default=None, help='default: the bundled model')
    ap.add_argument('--episodes', type=int, default=20, help='per kind and range (normal, each fault)')
    ap.add_argument('--calibration-episodes', type=int, default=40)
    ap.add_argument('--policy-episodes', type=int, default=8, help='policy-driven normal episodes per range')
    ap.add_argument('--steps', type=int, default=40)
    ap.add_argument('--false-alarm-rate', type=float, default=0.01)
    ap.add_argument('--ranges', type=int, nargs='+', default=[140_000, 160_000])
    ap.add_argument('--calibration-range', type=int, default=185_000)
    ap.add_argument('--calibration', default='', metavar='FILE',
                    help='test this calibration (e.g. the one the bundled model ships) instead of making one')
    ap.add_argument('--faults', nargs='+', default=list(FAULTS), choices=FAULTS)
    ap.add_argument('--no-counterfactuals', action='store_true',
                    help="skip the world model's counterfactual rows (wm_evidence; about 5× the cost of the rest)")
    args = ap.parse_args(argv)
    policy = load_policy(args.checkpoint or bundled_checkpoint(), device='cpu')
    policy.use_cpu_threads(1)

    def expert(fault, seed):
        ep = fault_episode(fault, seed, args.steps)
        last = None if fault is None else ep.onset + SCORED_AFTER_ONSET
        return ep, score_episode(policy, ep.observed, ep.commands, last, not args.no_counterfactuals)

    if args.calibration:
        cal = Calibration.load(args.calibration)
        if cal.motion is None:
            raise SystemExit(f'{args.calibration} has no motion model')
        cal_eps = []
    else:
        cal_eps = []
        for i in range(args.calibration_episodes):
            _, scored = expert(None, args.calibration_range + i)
            scored.name = f'expert_{args.calibration_range + i}'
            cal_eps.append(scored)
        cal = calibrate_episodes(cal_eps, args.false_alarm_rate, MOTION_ALERT_SIGNALS, policy.model_id,
                                 policy.weights_digest)
    signals = ('peak_excess_bits', 'action_consistency', 'wm_evidence', 'motion_evidence', 'motion_cusum',
               'frame_change')
    result = {'model': policy.model_id, 'calibration': {'file': args.calibration or None,
                                                        'episodes': len(cal_eps) or len(cal.source),
                                                        'transitions': cal.transitions,
                                                        'thresholds': cal.thresholds,
                                                        'measured_rate': cal.measured_rate},
              'ranges': {}}
    for base in args.ranges:
        normal = [with_motion(cal, expert(None, base + i)[1]) for i in range(args.episodes)]
        flat = [s for ep in normal for s in ep]
        by_range: dict = {'normal_expert': false_alarms(cal, normal)}
        driven = []
        for i in range(args.policy_episodes):
            frames, commands = policy_episode(policy, base + 9_000 + i, args.steps * 2)
            if len(commands) > 1:
                driven.append(with_motion(cal, score_episode(policy, frames, commands,
                                                             counterfactuals=not args.no_counterfactuals)))
        by_range['normal_policy'] = false_alarms(cal, driven)
        for fault in args.faults:
            j = FAULTS.index(fault)  # the same layouts whichever faults are run
            rows, detected, latency, short = [], 0, [], 0
            for i in range(args.episodes):
                ep, scored = expert(fault, base + 1_000 * (j + 1) + i)
                short += len(ep.commands) - ep.onset < WINDOW  # counted as they are (a short fault is harder)
                sig = with_motion(cal, scored)
                rows += sig[ep.onset:]
                hits = [k - ep.onset for k in range(ep.onset, len(sig)) if cal.alarm(sig[k], sig[k]['condition'])]
                if hits and hits[0] < WINDOW:
                    detected += 1
                latency.append(hits[0] if hits else None)
            found = [x for x in latency if x is not None]
            best_wm = {}
            for r in rows:
                if 'wm_best' in r:
                    best_wm[r['wm_best']] = best_wm.get(r['wm_best'], 0) + 1
            by_range[fault] = {
                'auroc': {s: oriented_auroc([n[s] for n in flat], [r[s] for r in rows]) for s in signals
                          if all(s in r for r in rows)},
                'detected_within_5': rate(detected, args.episodes),
                'latency_median': float(np.median(found)) if found else None,
                'never_detected': sum(x is None for x in latency),
                'episodes_with_fewer_faulty_transitions_than_the_window': short,
                'world_model_best_explanation': best_wm,
            }
        result['ranges'][str(base)] = by_range
    result['cost_ms_median'] = {k: round(float(np.median(v)), 2) for k, v in COSTS.items() if v}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
