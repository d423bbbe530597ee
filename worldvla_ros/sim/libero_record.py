"""``record_demos OUT --env libero``: the scripted expert's LIBERO episodes as rosbag2 bags, in the format
``evaluate_bag`` and ``worldvla_finetune`` read — ``/camera/image_raw`` (the agentview render as LIBERO draws
it, as its HDF5 demonstrations and ``convert_to_bag libero`` keep it: a checkpoint with ``rotate_180`` turns it
into the release's view), ``/instruction`` and ``/teleop/ee_command`` (the action executed at that frame, in the
release's OSC_POSE units) at LIBERO's 20 Hz. Only successful episodes are kept; one bag per task and initial
state, ``<suite>_task<NN>_trial<NN>``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from worldvla_ros.evaluation.episode import write_episode

from .libero import RATE_HZ, SUITES, LiberoEnv, LiberoMissing


def record(out: Path, suite: str, tasks: list[int] | None, trials: int, storage: str, progress: bool = True) -> int:
    """Bags written (failed episodes are left out, and counted on stderr)."""
    out.mkdir(parents=True, exist_ok=True)
    written = failed = 0
    env = LiberoEnv(suite, (tasks or [0])[0])  # the first task's, which also tells the suite's size
    try:
        if not env.has_expert:
            raise LiberoMissing(f'{suite} has no scripted expert (libero_object has one)')
        todo = [(t, i) for t in (tasks if tasks is not None else range(env.task_count)) for i in range(trials)]
        for task, trial in tqdm(todo, unit='episode', desc=f'record {suite}', disable=not progress, file=sys.stderr):
            name = out / f'{suite}_task{task:02d}_trial{trial:02d}'
            if name.exists():
                written += 1
                continue
            if env.task != task:
                env.close()
                env = LiberoEnv(suite, task)
            step = env.reset(trial)
            frames, actions = [], []
            for _ in range(SUITES[suite]):
                action = env.expert_action()
                frames.append(step.image)
                actions.append(action)
                step = env.step(action)
                if step.done:
                    break
            if not step.done:
                failed += 1
                continue
            write_episode(name, frames, np.asarray(actions), env.language, rate_hz=RATE_HZ, storage=storage)
            written += 1
    finally:
        env.close()
    if failed:
        print(f'record_demos: {failed} of {len(todo)} expert episodes failed and were left out', file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='record_demos --env libero', description=__doc__)
    p.add_argument('out_dir')
    p.add_argument('--suite', default='libero_object')
    p.add_argument('--tasks', default='', help='comma-separated task indices (default: all)')
    p.add_argument('--trials', type=int, default=5, help='initial states per task, from 0')
    p.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    try:
        tasks = [int(t) for t in args.tasks.split(',')] if args.tasks else None
        if args.suite not in SUITES:
            raise LiberoMissing(f'unknown LIBERO suite {args.suite!r}; use one of {", ".join(SUITES)}')
        n = record(Path(args.out_dir), args.suite, tasks, args.trials, args.storage, not args.no_progress)
    except (LiberoMissing, ValueError) as exc:
        print(f'record_demos: error: {exc}', file=sys.stderr)
        return 2
    print(f'{n} bags in {args.out_dir}')
    return 0
