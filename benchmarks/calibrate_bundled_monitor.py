"""The bundled model's two monitor calibrations, made on held-out sim layouts (1 % false alarms per transition).

- ``monitor_calibration.json`` (what the world-model node loads by default): the robot's own normal work as the
  demo runs it, episodes the bundled policy drives and episodes the scripted expert drives, together;
- ``monitor_calibration_expert.json``: the expert's episodes alone: tighter thresholds, for a robot driven by a
  teleoperator or a scripted controller (``monitor_calibration:=…/monitor_calibration_expert.json``).

Both carry the motion model (``motion_cusum``), fitted on the episodes they were made on.

    python benchmarks/calibrate_bundled_monitor.py [--out worldvla_ros/data/tabletop_model]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_faults import policy_episode, score_episode

from worldvla_ros.model import load_policy
from worldvla_ros.monitor import CALIBRATION_FILE, MOTION_ALERT_SIGNALS, calibrate_episodes
from worldvla_ros.sim.anomalies import fault_episode
from worldvla_ros.sim.bundled import bundled_checkpoint

EXPERT_FILE = 'monitor_calibration_expert.json'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(bundled_checkpoint()))
    ap.add_argument('--expert-episodes', type=int, default=128)
    ap.add_argument('--policy-episodes', type=int, default=48)
    ap.add_argument('--first-seed', type=int, default=195_000)
    ap.add_argument('--false-alarm-rate', type=float, default=0.01)
    args = ap.parse_args(argv)
    policy = load_policy(bundled_checkpoint(), device='cpu')
    policy.use_cpu_threads(1)
    expert, driven = [], []
    for i in range(args.expert_episodes):
        seed = args.first_seed + i
        ep = fault_episode(None, seed, steps=40)
        scored = score_episode(policy, ep.observed, ep.commands, counterfactuals=False)
        scored.name = f'expert_{seed}'
        expert.append(scored)
    for i in range(args.policy_episodes):
        seed = args.first_seed + 500 + i
        frames, commands = policy_episode(policy, seed, 100)
        if len(commands) > 1:
            scored = score_episode(policy, frames, commands, counterfactuals=False)
            scored.name = f'policy_{seed}'
            driven.append(scored)
    for name, episodes in ((CALIBRATION_FILE, expert + driven), (EXPERT_FILE, expert)):
        cal = calibrate_episodes(episodes, args.false_alarm_rate, MOTION_ALERT_SIGNALS, policy.model_id,
                                 policy.weights_digest)
        cal.save(Path(args.out) / name)
        print(f'{name}: {cal.transitions} transitions of {len(episodes)} episodes, false alarms '
              f'{cal.measured_rate:.4f}; thresholds ' + ', '.join(f'{k} {v:.4g}' for k, v in cal.thresholds.items()),
              file=sys.stderr)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
