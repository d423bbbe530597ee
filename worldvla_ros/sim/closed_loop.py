"""Closed-loop success rate of a checkpoint in the tabletop sim (no ROS: the policy object directly).

    worldvla_sim_eval --checkpoint DIR [--episodes 50] [--no-action-mask] [--chance] [--workers 2]

Every step goes through the action node's control loop (``worldvla_ros.control``): each chunk is executed
open-loop and the next one is computed from the newest frames, after its last action (replan_threshold 0,
the release's protocol; ``--replan-threshold``/``--chunk-merge`` measure the node's other settings); commands
pass the node's limits with the release's ranges, at send time. Held-out layouts: seeds start at 100000
(demonstrations are recorded from seed 0 upwards).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm import tqdm

from worldvla_ros.control import Controller, ControlSettings
from worldvla_ros.control.loop import SynchronousLoop
from worldvla_ros.control.types import MERGES
from worldvla_ros.metrics import wilson95
from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN
from worldvla_ros.safety import SafetyLimits

from .tabletop import TASKS, SimConfig, TabletopSim, camera_tilt, light_slant

HELD_OUT_SEED = 100_000


class Progress:
    """Sub-goals, to tell a policy that almost works from one that does nothing: the closest the
    gripper came to the named block (xy, cm) and whether it ever held that block."""

    def __init__(self, sim: TabletopSim) -> None:
        self.sim = sim
        self.closest = np.inf
        self.grasped = False

    def update(self) -> None:
        s, block = self.sim.state, self.sim.task[1]
        self.closest = min(self.closest, float(np.linalg.norm(s.gripper[:2] - s.blocks[block][:2])))
        self.grasped |= s.held == block

    def result(self, seed: int, chunks: int) -> dict[str, Any]:
        sim = self.sim
        return {'seed': seed, 'task': sim.instruction, 'success': sim.success, 'steps': sim.state.steps,
                'chunks': chunks, 'grasped': self.grasped, 'closest_cm': round(100 * self.closest, 2)}


# each chunk run out, the next from the frame after its last action, as the release evaluates
CLOSED_LOOP = ControlSettings(rate_hz=10.0, replan_threshold=0, enabled=True)
LIMITS = SafetyLimits(LIBERO_ACTION_MIN, LIBERO_ACTION_MAX, (0.0,) * 7)


def run_episode(policy: Any, seed: int, action_mask: bool = True, config: SimConfig | None = None,
                on_chunk: Callable[[TabletopSim], None] | None = None,
                settings: ControlSettings = CLOSED_LOOP, trace: list | None = None) -> dict[str, Any]:
    """One episode through the action node's control loop (``worldvla_ros.control``), one control period per sim
    step; ``on_chunk(sim)`` is called at every state where the policy is asked for a chunk. ``trace`` receives
    (frame, the command executed from it) per step and (last frame, None) at the end."""
    sim = TabletopSim(config)
    frame = sim.reset(seed)
    progress = Progress(sim)
    progress.update()
    ctrl = Controller(replace(settings, history_frames=policy.config.history_frames), LIMITS)
    ctrl.set_instruction(sim.instruction)
    ctrl.activate()

    def infer(request: Any) -> tuple[np.ndarray, float]:
        if on_chunk is not None:
            on_chunk(sim)
        pred = policy.predict(request.frames, request.instruction, batched=action_mask, action_mask=action_mask)
        return pred.actions, pred.timing.total_s

    loop = SynchronousLoop(ctrl, infer)
    period_ns = round(1e9 / settings.rate_hz)
    step = silent = 0
    while not sim.done and silent < 3:
        command = loop.step(frame, step * period_ns)
        step += 1
        silent = silent + 1 if command is None else 0  # nothing commanded yet: the model failed its first chunk
        if command is not None:
            if trace is not None:
                trace.append((frame, np.asarray(command.action, dtype=np.float64)))
            frame = sim.step(command.action)
            progress.update()
    if trace is not None:
        trace.append((frame, None))
    return progress.result(seed, len(loop.chunks))


def run_chance_episode(seed: int, config: SimConfig | None = None) -> dict[str, Any]:
    """Uniformly random commands over the release's ranges: the chance baseline."""
    sim = TabletopSim(config)
    sim.reset(seed)
    progress = Progress(sim)
    progress.update()
    rng = np.random.default_rng(seed)
    lo, hi = np.asarray(LIBERO_ACTION_MIN), np.asarray(LIBERO_ACTION_MAX)
    while not sim.done:
        sim.step(rng.uniform(lo, hi))
        progress.update()
    return progress.result(seed, 0)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = np.array([r['success'] for r in results], dtype=float)
    per_task = {t: float(np.mean([r['success'] for r in results if r['task'] == t]))
                for t, _, _ in TASKS if any(r['task'] == t for r in results)}
    n, p = len(ok), ok.mean() if len(ok) else 0.0
    return {'episodes': n, 'success_rate': round(float(p), 4), 'wilson95': list(wilson95(int(ok.sum()), n)),
            'mean_steps': round(float(np.mean([r['steps'] for r in results])), 1) if n else None,
            'grasped_named_block': round(float(np.mean([r['grasped'] for r in results])), 4) if n else None,
            'median_closest_cm': round(float(np.median([r['closest_cm'] for r in results])), 2) if n else None,
            'per_task': per_task}


def evaluate(policy: Any | None, episodes: int, first_seed: int = HELD_OUT_SEED, action_mask: bool = True,
             progress: bool = True, config: SimConfig | None = None,
             settings: ControlSettings = CLOSED_LOOP) -> dict[str, Any]:
    results = []
    for seed in tqdm(range(first_seed, first_seed + episodes), desc='episodes', disable=not progress,
                     file=sys.stderr):
        results.append(run_chance_episode(seed, config) if policy is None
                       else run_episode(policy, seed, action_mask, config, settings=settings))
    return {**summarize(results), 'results': results}


_WORKER: dict[str, Any] = {}


def _worker_start(checkpoint: str, device: str) -> None:
    import torch

    from worldvla_ros.model import load_policy

    torch.set_num_threads(1)  # one core per worker: the small models here gain nothing from a second thread
    _WORKER['policy'] = load_policy(checkpoint, device=device)


def _worker_episode(job: tuple[int, bool, SimConfig | None, ControlSettings]) -> dict[str, Any]:
    seed, action_mask, config, settings = job
    return run_episode(_WORKER['policy'], seed, action_mask, config, settings=settings)


def evaluate_parallel(checkpoint: str, episodes: int, first_seed: int = HELD_OUT_SEED, workers: int = 2,
                      action_mask: bool = True, device: str = 'cpu', stop_after_successes: int = 0,
                      progress: bool = True, config: SimConfig | None = None,
                      settings: ControlSettings = CLOSED_LOOP) -> dict[str, Any]:
    """``evaluate`` over ``workers`` processes (seeds handed out in order, results kept in seed order).
    ``stop_after_successes`` > 0: stop once that many layouts are solved (the rest is not run)."""
    import multiprocessing

    results: list[dict[str, Any]] = []
    jobs = [(seed, action_mask, config, settings) for seed in range(first_seed, first_seed + episodes)]
    pool = multiprocessing.get_context('spawn').Pool(workers, _worker_start, (str(checkpoint), device))
    try:
        for r in tqdm(pool.imap(_worker_episode, jobs), total=episodes, desc='episodes', disable=not progress,
                      file=sys.stderr):
            results.append(r)
            if stop_after_successes and sum(x['success'] for x in results) >= stop_after_successes:
                break
    finally:
        pool.terminate()
        pool.join()
    return {**summarize(results), 'results': results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='worldvla_sim_eval', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default='', help='default: the bundled model')
    parser.add_argument('--episodes', type=int, default=50)
    parser.add_argument('--first-seed', type=int, default=HELD_OUT_SEED)
    parser.add_argument('--no-action-mask', action='store_true', help='decode with plain causal attention')
    parser.add_argument('--chance', action='store_true', help='random commands instead of a model')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', default='', help='also write the result here')
    parser.add_argument('--workers', type=int, default=1, help='episodes run in this many processes at once')
    parser.add_argument('--light-slant', type=light_slant, default=SimConfig().light_slant_deg, metavar='DEG',
                        help='the lamp DEG from vertical: the gripper shadow falls away from it by its height '
                             '(the lighting the checkpoint was trained with)')
    parser.add_argument('--camera-tilt', type=camera_tilt, default=0.0, metavar='DEG',
                        help='the sim camera tilted by DEG from straight down (the view the checkpoint was trained '
                             'on; the bundled model: 0)')
    parser.add_argument('--replan-threshold', type=int, default=0, metavar='N',
                        help='departure from the release: the next chunk once at most N commands are queued '
                             '(-1: on every frame; default 0: once the chunk has run out)')
    parser.add_argument('--chunk-merge', choices=MERGES, default='replace',
                        help='departure from the release: how a new chunk meets the queued one (the node\'s '
                             'chunk_merge)')
    args = parser.parse_args(argv)
    try:
        settings = replace(CLOSED_LOOP, replan_threshold=args.replan_threshold, chunk_merge=args.chunk_merge)
    except ValueError as exc:
        parser.error(str(exc))
    config = SimConfig(camera_tilt_deg=args.camera_tilt, light_slant_deg=args.light_slant)
    policy = None
    t0 = time.perf_counter()
    if not args.chance:
        from worldvla_ros.model import CheckpointError, load_policy

        from .bundled import bundled_checkpoint

        try:
            policy = load_policy(args.checkpoint or bundled_checkpoint(), device=args.device)
        except CheckpointError as exc:
            print(f'worldvla_sim_eval: error: {exc}', file=sys.stderr)
            return 1
    if policy is not None and args.workers > 1:
        result = evaluate_parallel(args.checkpoint or str(bundled_checkpoint()), args.episodes, args.first_seed,
                                   args.workers, not args.no_action_mask, args.device, config=config,
                                   settings=settings)
    else:
        result = evaluate(policy, args.episodes, args.first_seed, not args.no_action_mask, config=config,
                          settings=settings)
    label = 'chance' if args.chance else ('without action mask' if args.no_action_mask else 'with action mask')
    summary = {'policy': label, 'checkpoint': '' if args.chance else str(args.checkpoint or 'bundled'),
               'replan_threshold': args.replan_threshold, 'chunk_merge': args.chunk_merge,
               'wall_s': round(time.perf_counter() - t0, 1), **{k: v for k, v in result.items() if k != 'results'}}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({**summary, 'results': result['results']}, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
