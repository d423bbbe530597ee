"""Why the bundled policy fails in closed loop: every grasp attempt and release, per episode, on held-out layouts.

A grasp attempt is a step that closes the open gripper; the sim grasps a block within ``grasp_radius`` (xy) when the
gripper is below ``grasp_height`` after the step's move. Each attempt is scored by its xy distance to the named
block and its height; each release of a held block by its xy distance to the named target (success: within
``target_radius``). Each episode gets the first reason that applies: success; grasped but released off the target;
attempts near enough in xy but all too high; low enough but all too far in xy; both off; never closed.

    python benchmarks/embedded_failures.py [--checkpoint DIR] [--episodes 50] [--ranges 100000 120000] \
        [--light-slant DEG] [--camera-tilt DEG]   # the sim the checkpoint was trained in
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worldvla_ros.metrics import wilson95
from worldvla_ros.model import load_policy
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.closed_loop import run_episode
from worldvla_ros.sim.tabletop import SimConfig, TabletopSim, camera_tilt, light_slant

REASONS = ('success', 'grasped, released off the target', 'near in xy but too high', 'low but off in xy',
           'off in xy and too high', 'never closed')


def traced_episode(policy: Any, seed: int, config: SimConfig | None = None) -> dict[str, Any]:
    attempts: list[dict[str, float]] = []
    releases: list[float] = []

    def watch(sim: TabletopSim) -> None:
        if getattr(sim, '_traced', False):
            return
        sim._traced = True
        step = sim.step

        def traced(action: np.ndarray) -> np.ndarray:
            s, (_, block, target) = sim.state, sim.task
            was_closed, held = s.closed, s.held
            out = step(action)
            closing = float(np.asarray(action)[6]) > 0
            if closing and not was_closed:
                attempts.append({'xy_cm': 100 * float(np.linalg.norm(s.gripper[:2] - s.blocks[block][:2])),
                                 'z_cm': 100 * float(s.gripper[2]), 'grasped': s.held == block})
            if not closing and was_closed and held == block:
                releases.append(100 * float(np.linalg.norm(s.blocks[block][:2] - s.targets[target])))
            return out

        sim.step = traced

    result = run_episode(policy, seed, config=config, on_chunk=watch)
    return {**result, 'attempts': attempts, 'releases_cm': releases}


def reason(ep: dict[str, Any], radius_cm: float, height_cm: float) -> str:
    if ep['success']:
        return REASONS[0]
    if ep['grasped']:
        return REASONS[1]
    att = ep['attempts']
    if not att:
        return REASONS[5]
    near = [a for a in att if a['xy_cm'] < radius_cm]
    low = [a for a in att if a['z_cm'] < height_cm]
    if near:
        return REASONS[2]
    return REASONS[3] if low else REASONS[4]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--checkpoint', default='')
    ap.add_argument('--episodes', type=int, default=50, help='per range')
    ap.add_argument('--ranges', type=int, nargs='+', default=[100_000, 120_000])
    ap.add_argument('--light-slant', type=light_slant, default=SimConfig().light_slant_deg, metavar='DEG')
    ap.add_argument('--camera-tilt', type=camera_tilt, default=0.0, metavar='DEG')
    args = ap.parse_args(argv)
    sim_config = SimConfig(camera_tilt_deg=args.camera_tilt, light_slant_deg=args.light_slant)
    policy = load_policy(args.checkpoint or bundled_checkpoint(), device='cpu')
    policy.use_cpu_threads(1)
    cfg = sim_config
    radius, height, target = 100 * cfg.grasp_radius, 100 * cfg.grasp_height, 100 * cfg.target_radius
    out: dict[str, Any] = {'model': policy.model_id, 'grasp_radius_cm': radius, 'grasp_height_cm': height,
                           'target_radius_cm': target, 'light_slant_deg': args.light_slant,
                           'camera_tilt_deg': args.camera_tilt, 'ranges': {}}
    for base in args.ranges:
        eps = [traced_episode(policy, base + i, sim_config) for i in range(args.episodes)]
        reasons = Counter(reason(e, radius, height) for e in eps)
        att = [a for e in eps for a in e['attempts']]
        rel = [r for e in eps for r in e['releases_cm']]
        n = len(eps)
        out['ranges'][str(base)] = {
            'episodes': n,
            'success': {'rate': sum(e['success'] for e in eps) / n,
                        'ci95': list(wilson95(sum(e['success'] for e in eps), n))},
            'reasons': {k: reasons.get(k, 0) for k in REASONS},
            'grasp_attempts_per_episode': round(len(att) / n, 2),
            'attempts_near_in_xy': round(float(np.mean([a['xy_cm'] < radius for a in att])), 3) if att else None,
            'attempts_low_enough': round(float(np.mean([a['z_cm'] < height for a in att])), 3) if att else None,
            'attempts_both': round(float(np.mean([a['xy_cm'] < radius and a['z_cm'] < height for a in att])), 3)
            if att else None,
            'attempt_xy_cm_median': round(float(np.median([a['xy_cm'] for a in att])), 2) if att else None,
            'attempt_z_cm_median': round(float(np.median([a['z_cm'] for a in att])), 2) if att else None,
            'releases_of_the_named_block': len(rel),
            'release_within_target_radius': round(float(np.mean([r < target for r in rel])), 3) if rel else None,
            'release_cm_median': round(float(np.median(rel)), 2) if rel else None,
        }
        print(f'range {base}: ' + json.dumps(out['ranges'][str(base)]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
