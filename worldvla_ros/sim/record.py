"""Record scripted-expert episodes of the tabletop sim as rosbag2 bags (the bag evaluation's format).

    record_demos OUT_DIR [--episodes 300] [--seed 0] [--noise 0.1] [--storage mcap]

One bag per episode (``/camera/image_raw``, ``/instruction``, ``/teleop/ee_command``), named
``episode_<seed>``; seeds are consecutive from ``--seed``, so disjoint ranges give disjoint
train and held-out sets. Only successful episodes are kept (the expert almost always succeeds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from worldvla_ros.evaluation.episode import write_episode

from .tabletop import SimConfig, TabletopSim, scripted_action


def expert_episode(seed: int, noise: float = 0.1, config: SimConfig | None = None
                   ) -> tuple[list[np.ndarray], np.ndarray, str, bool]:
    """(frames, actions, instruction, success): frame i is seen, then action i is sent."""
    sim = TabletopSim(config)
    frame = sim.reset(seed)
    rng = np.random.default_rng(10_000 + seed)
    frames, actions = [], []
    while not sim.done:
        a = scripted_action(sim, rng, noise)
        frames.append(frame)
        actions.append(a)
        frame = sim.step(a)
    return frames, np.asarray(actions), sim.instruction, sim.success


def record_demos(out_dir: str | Path, episodes: int, seed: int = 0, noise: float = 0.1, storage: str = 'mcap',
                 rate_hz: float = 10.0, progress: bool = True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bags = []
    for s in tqdm(range(seed, seed + episodes), desc='recording', unit='episode', disable=not progress,
                  file=sys.stderr):
        frames, actions, instruction, success = expert_episode(s, noise)
        if success:
            bags.append(write_episode(out / f'episode_{s:05d}', frames, actions, instruction, rate_hz, storage))
    return bags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='record_demos', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir')
    parser.add_argument('--episodes', type=int, default=300)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--noise', type=float, default=0.1, help='std of the noise on the expert’s Δxyz')
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap')
    args = parser.parse_args(argv)
    bags = record_demos(args.out_dir, args.episodes, args.seed, args.noise, args.storage)
    print(f'{len(bags)} of {args.episodes} episodes succeeded and were written to {args.out_dir}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
