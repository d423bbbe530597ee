"""How precisely the bundled model sees and moves: the image tokenizer's locality and the policy's aim at short range.

1. Tokenizer locality: on held-out layouts (gripper 10 cm from the named block, hovering), how many of the 8 × 8
   image codes change when the named block is taken away, moved 1.5 cm, or the gripper moves one full step
   (1.87 cm). A tokenizer whose codes show only their own patch changes 1–4 codes for each; every further
   change is a code flipped in a patch whose pixels did not change, which the backbone must learn to ignore.
2. Short-range aim: the gripper put at 2–12 cm from the named block (open, hovering) or from the named target
   (holding the block), in a random direction; the chunk the policy answers with is summed into its planned
   displacement, scored by the cosine between it and the way to the goal, and by the distance from the goal
   where the chunk would leave the gripper, against where the scripted expert is after as many steps from the same
   placement (it moves at most 1.87 cm per axis and step, so from 9–12 cm it has not arrived either).

    python benchmarks/embedded_precision.py [--checkpoint DIR] [--layouts 40] [--first-seed 100000] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worldvla_ros.model import load_policy
from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.tabletop import HOVER_Z, TABLE, SimConfig, TabletopSim, scripted_action

DISTANCES = (0.02, 0.03, 0.04, 0.06, 0.09, 0.12)


def tokenizer_locality(policy: Any, seeds: range, rng: np.random.Generator) -> dict[str, float]:
    sim = TabletopSim()
    step = SimConfig().meters_per_unit * LIBERO_ACTION_MAX[0]  # one full step along x
    changed: dict[str, list[int]] = {'block removed': [], 'block moved 1.5 cm': [], 'gripper moved one step': []}

    def codes() -> np.ndarray:
        return policy.images.encode_codes([sim.render()])[0]

    for seed in seeds:
        sim.reset(seed)
        block = sim.state.blocks[sim.task[1]]
        home = block[:2].copy()
        phi = rng.uniform(0, 2 * np.pi)
        sim.state.gripper[:] = [*np.clip(home + 0.1 * np.array([np.cos(phi), np.sin(phi)]), 0.02, TABLE - 0.02),
                                HOVER_Z]
        base = codes()
        block[:2] = (-1.0, -1.0)  # off the table, out of view
        changed['block removed'].append(int((codes() != base).sum()))
        block[:2] = home + np.array([0.015, 0.0])
        changed['block moved 1.5 cm'].append(int((codes() != base).sum()))
        block[:2] = home
        sim.state.gripper[0] += step if sim.state.gripper[0] + step < TABLE - 0.02 else -step
        changed['gripper moved one step'].append(int((codes() != base).sum()))
    return {k: round(float(np.mean(v)), 2) for k, v in changed.items()} | {'codes_per_frame': policy.images.grid ** 2}


def short_range_aim(policy: Any, seeds: range, rng: np.random.Generator, per_layout: int = 2) -> dict[str, Any]:
    sim = TabletopSim()
    unit = SimConfig().meters_per_unit
    out: dict[str, Any] = {}
    for goal_kind in ('block', 'target'):
        rows = []
        for dist in DISTANCES:
            cosines, misses, expert = [], [], []
            for seed in seeds:
                for _ in range(per_layout):
                    sim.reset(seed)
                    s, (_, block, target) = sim.state, sim.task
                    goal = s.blocks[block][:2].copy() if goal_kind == 'block' else s.targets[target].copy()
                    phi = rng.uniform(0, 2 * np.pi)
                    away = np.array([np.cos(phi), np.sin(phi)])
                    pos = goal + dist * away
                    if np.any(pos < 0.02) or np.any(pos > TABLE - 0.02):
                        continue
                    s.gripper[:] = [*pos, HOVER_Z]
                    if goal_kind == 'target':
                        s.held, s.closed = block, True
                        s.blocks[block] = np.array([*pos, HOVER_Z - 0.01])
                    chunk = np.asarray(policy.predict_actions([sim.render()], sim.instruction))
                    move = chunk[:, :2].sum(0) * unit
                    cosines.append(float(move @ -away / (np.linalg.norm(move) + 1e-9)))
                    misses.append(float(np.linalg.norm(pos + move - goal)))
                    for _ in range(len(chunk)):  # the expert from the same placement, as many steps, closed loop
                        sim.step(scripted_action(sim))
                    expert.append(float(np.linalg.norm(s.gripper[:2] - goal)))
            rows.append({'distance_cm': round(100 * dist), 'placements': len(cosines),
                         'median_cosine_toward_goal': round(float(np.median(cosines)), 3),
                         'share_within_45_deg': round(float(np.mean(np.array(cosines) > np.cos(np.pi / 4))), 3),
                         'median_chunk_end_miss_cm': round(100 * float(np.median(misses)), 2),
                         'expert_median_miss_cm': round(100 * float(np.median(expert)), 2)})
        out[goal_kind] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default='', help='default: the bundled model')
    p.add_argument('--layouts', type=int, default=40)
    p.add_argument('--first-seed', type=int, default=100_000)
    p.add_argument('--json', default='')
    args = p.parse_args(argv)
    policy = load_policy(args.checkpoint or bundled_checkpoint(), device='cpu')
    seeds = range(args.first_seed, args.first_seed + args.layouts)
    result = {'checkpoint': args.checkpoint or 'bundled', 'layouts': [seeds.start, seeds.stop - 1],
              'tokenizer_codes_changed': tokenizer_locality(policy, seeds, np.random.default_rng(1)),
              'short_range_aim': short_range_aim(policy, seeds, np.random.default_rng(0))}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
