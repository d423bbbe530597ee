"""Record scripted-expert episodes of the tabletop sim as rosbag2 bags (the bag evaluation's format).

    record_demos OUT_DIR [--episodes 300] [--seed 0] [--noise 0.1] [--storage mcap] [--diverse-starts]
    record_demos OUT_DIR --snippets 5 [--episodes N] [--seed S] [--near 0.08] [--held 0.3]
    record_demos OUT_DIR --snippets 5 --dagger CHECKPOINT [--episodes N] [--seed 400000]
    record_demos OUT_DIR --env libero --suite libero_object [--tasks 0,1] [--trials 5]

One bag per episode (``/camera/image_raw``, ``/instruction``, ``/teleop/ee_command``: the expert's
command for the frame; the robot executed it with exploration noise, see ``expert_episode``), named
``episode_<seed>``; seeds are consecutive from ``--seed``, so disjoint ranges give disjoint
train and held-out sets. Only successful episodes are kept (the expert almost always succeeds).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN

from .tabletop import TABLE, SimConfig, TabletopSim, camera_tilt, light_slant, scripted_action

SNIPPET_PREFIX = 'snippet_'  # bags cut off mid-task: the trainer must not pad their chunks with holds
HELD_SHARE = 0.3  # diverse starts holding the named block, unless --held says otherwise


def with_exploration_noise(expert: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """What the robot executes: the expert's command plus N(0, noise) on Δxyz, kept in range."""
    executed = expert.copy()
    if noise > 0:
        executed[:3] += rng.normal(0, noise, 3)
        executed[:6] = np.clip(executed[:6], LIBERO_ACTION_MIN[:6], LIBERO_ACTION_MAX[:6])
    return executed


def diverse_start(sim: TabletopSim, rng: np.random.Generator, held: float = HELD_SHARE, near: float = 0.0) -> None:
    """Move the gripper anywhere over the table at any height and, with probability ``held``, put
    the named block in it: the expert then starts from states its own trajectories rarely visit
    (low beside a block, carrying from anywhere), so the gripper's position is less tied to the
    layout and the episode's phase.

    ``near`` > 0: start within ``near`` m (xy, uniform over the disc) of where the expert is heading,
    the named block or, when holding it, the named target. Uniform starts put only ~4 % of the
    states within 5 cm of the block, where the grasp is decided.
    """
    s = sim.state
    s.gripper = np.array([*rng.uniform(0.02, TABLE - 0.02, 2), rng.uniform(0.0, 0.15)])
    holding = rng.random() < held
    if near > 0:
        goal = s.targets[sim.task[2]] if holding else s.blocks[sim.task[1]][:2]
        r, phi = near * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        s.gripper[:2] = np.clip(goal + r * np.array([np.cos(phi), np.sin(phi)]), 0.02, TABLE - 0.02)
    if holding:
        name = sim.task[1]
        s.gripper[2] = max(s.gripper[2], 0.02)
        s.held, s.closed = name, True
        s.blocks[name] = np.array([s.gripper[0], s.gripper[1], s.gripper[2] - 0.01])


def expert_rollout(sim: TabletopSim, rng: np.random.Generator, noise: float = 0.1, clean_labels: bool = True,
                   max_steps: int | None = None, pauses: float = 0.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Let the expert act from the sim's current state: (frames, actions), frame i seen, then action i labelled.

    The robot executes the expert's command plus Gaussian noise on Δxyz, so the demos visit the
    states a learned policy drifts into. With ``clean_labels`` the label is the expert's command
    before the noise (DART, Laskey et al. 2017): one correct action per state instead of a noisy
    spread the model would have to model too; without it, the label is what was executed.
    """
    frame = sim.render()
    frames, actions = [], []
    while not sim.done and (max_steps is None or len(actions) < max_steps):
        expert = scripted_action(sim)
        executed = with_exploration_noise(expert, rng, noise)
        if pauses and rng.random() < pauses:  # the robot pauses: no motion, the gripper as it is
            expert = np.zeros(7)
            expert[6] = 1.0 if sim.state.closed else -1.0
            executed = expert
        frames.append(frame)
        actions.append(expert if clean_labels else executed)
        frame = sim.step(executed)
    return frames, np.asarray(actions)


def expert_episode(seed: int, noise: float = 0.1, config: SimConfig | None = None, clean_labels: bool = True,
                   diverse: bool = False, max_steps: int | None = None, near: float = 0.0, held: float = HELD_SHARE,
                   pauses: float = 0.0) -> tuple[list[np.ndarray], np.ndarray, str, bool]:
    """(frames, actions, instruction, success) of one layout (``expert_rollout``)."""
    sim = TabletopSim(config)
    sim.reset(seed)
    rng = np.random.default_rng(10_000 + seed)
    if diverse:
        diverse_start(sim, rng, held=held, near=near)
    frames, actions = expert_rollout(sim, rng, noise, clean_labels, max_steps, pauses)
    return frames, actions, sim.instruction, sim.success


def state_snippet(seed: int, steps: int = 5, noise: float = 0.1, config: SimConfig | None = None,
                  near: float = 0.0, held: float = HELD_SHARE) -> tuple[list[np.ndarray], np.ndarray, str]:
    """``steps`` frames and clean expert labels from a diverse start (``diverse_start``): one
    training state per layout, for a policy that has to read positions rather than follow a
    trajectory it has seen. The snippet ends mid-task, so it carries no "hold still" ending."""
    frames, actions, instruction, _ = expert_episode(seed, noise, config, diverse=True, max_steps=steps, near=near,
                                                     held=held)
    return frames, actions, instruction


def record_snippets(out_dir: str | Path, count: int, seed: int = 0, steps: int = 5, noise: float = 0.1,
                    storage: str = 'mcap', rate_hz: float = 10.0, progress: bool = True, near: float = 0.0,
                    held: float = HELD_SHARE, config: SimConfig | None = None) -> list[Path]:
    from worldvla_ros.evaluation.episode import write_episode  # rosbags only where bags are written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bags = []
    for s in tqdm(range(seed, seed + count), desc='recording snippets', unit='snippet', disable=not progress,
                  file=sys.stderr):
        frames, actions, instruction = state_snippet(s, steps, noise, config, near=near, held=held)
        bags.append(write_episode(out / f'{SNIPPET_PREFIX}{s:05d}', frames, actions, instruction, rate_hz, storage))
    return bags


def record_dagger(policy: Any, out_dir: str | Path, episodes: int, seed: int = 400_000, steps: int = 5,
                  noise: float = 0.1, storage: str = 'mcap', rate_hz: float = 10.0, progress: bool = True,
                  action_mask: bool = True, config: SimConfig | None = None) -> list[Path]:
    """DAgger (Ross et al. 2011): run ``policy`` in closed loop and, at every state where it computes a
    chunk, write the expert's ``steps``-step snippet from that state (on a copy of the sim), named
    ``snippet_<seed>_<chunk>``. The policy's own mistakes take it where the expert never goes."""
    from worldvla_ros.evaluation.episode import write_episode  # rosbags only where bags are written

    from .closed_loop import run_episode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bags: list[Path] = []
    for s in tqdm(range(seed, seed + episodes), desc='DAgger episodes', unit='episode', disable=not progress,
                  file=sys.stderr):
        visited: list[TabletopSim] = []
        run_episode(policy, s, action_mask, config, on_chunk=lambda sim, seen=visited: seen.append(copy.deepcopy(sim)))
        rng = np.random.default_rng(10_000 + s)
        for k, twin in enumerate(visited):
            instruction = twin.instruction
            frames, actions = expert_rollout(twin, rng, noise, max_steps=steps)
            if len(actions) == steps:
                bags.append(write_episode(out / f'{SNIPPET_PREFIX}{s:05d}_{k:03d}', frames, actions, instruction,
                                          rate_hz, storage))
    return bags


def record_demos(out_dir: str | Path, episodes: int, seed: int = 0, noise: float = 0.1, storage: str = 'mcap',
                 rate_hz: float = 10.0, progress: bool = True, clean_labels: bool = True,
                 diverse: bool = False, pauses: float = 0.0, config: SimConfig | None = None) -> list[Path]:
    from worldvla_ros.evaluation.episode import write_episode  # rosbags only where bags are written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bags = []
    for s in tqdm(range(seed, seed + episodes), desc='recording', unit='episode', disable=not progress,
                  file=sys.stderr):
        frames, actions, instruction, success = expert_episode(s, noise, config, clean_labels=clean_labels,
                                                               diverse=diverse, pauses=pauses)
        if success:
            bags.append(write_episode(out / f'episode_{s:05d}', frames, actions, instruction, rate_hz, storage))
    return bags


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--env', choices=('tabletop', 'libero'), default='tabletop')
    which, rest = pre.parse_known_args(argv)
    if which.env == 'libero':
        from .libero_record import main as record_libero

        return record_libero(rest)
    parser = argparse.ArgumentParser(prog='record_demos', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir')
    parser.add_argument('--env', choices=('tabletop', 'libero'), default='tabletop',
                        help='libero: the scripted expert in LIBERO (record_demos OUT --env libero --help)')
    parser.add_argument('--episodes', type=int, default=300)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--noise', type=float, default=0.1, help='std of the noise on the expert’s Δxyz')
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap')
    parser.add_argument('--executed-labels', action='store_true',
                        help='label each frame with the noisy command executed, not the expert’s clean one')
    parser.add_argument('--diverse-starts', action='store_true',
                        help='start each episode from a random gripper pose, 30 %% of them holding the named block')
    parser.add_argument('--snippets', type=int, default=0, metavar='STEPS',
                        help='instead of whole episodes, write STEPS-long snippets from diverse starts '
                             '(snippet_<seed>), one training state per layout')
    parser.add_argument('--near', type=float, default=0.0, metavar='M',
                        help='with --snippets: start within M metres of the named block (of the target when '
                             'holding the block) instead of anywhere')
    parser.add_argument('--held', type=float, default=None, metavar='P',
                        help='with --snippets: share of snippets that start with the named block in the gripper '
                             f'(carry and release; default {HELD_SHARE})')
    parser.add_argument('--dagger', default='', metavar='CHECKPOINT',
                        help='with --snippets: label the states this checkpoint visits in closed loop (DAgger), '
                             '--episodes layouts from --seed')
    parser.add_argument('--pauses', type=float, default=0.0, metavar='P',
                        help='episodes: at each step, with probability P the robot pauses (zero motion, gripper '
                             'kept; labelled so): world-model data in which "no motion" is seen, not only moves')
    parser.add_argument('--light-slant', type=light_slant, default=SimConfig().light_slant_deg, metavar='DEG',
                        help='the lamp DEG from vertical: the gripper shadow falls away from it by its height '
                             '(train and evaluate with the same lighting)')
    parser.add_argument('--camera-tilt', type=camera_tilt, default=0.0, metavar='DEG',
                        help='the sim camera tilted by DEG from straight down (an oblique view shows height; '
                             'train and evaluate with the same view)')
    parser.add_argument('--max-steps', type=int, default=0,
                        help='with --dagger: closed-loop episodes end after this many commands (0: the sim’s '
                             f'{SimConfig().max_steps})')
    args = parser.parse_args(argv)
    if args.max_steps < 0 or (args.max_steps and not args.dagger):
        parser.error('--max-steps is a positive number of commands, with --dagger')
    if (args.near or args.dagger) and not args.snippets:
        parser.error('--near and --dagger need --snippets')
    if args.held is not None and (args.dagger or not args.snippets):
        parser.error('--held needs --snippets from diverse starts (not --dagger)')
    held = HELD_SHARE if args.held is None else args.held
    if not 0.0 <= held <= 1.0:
        parser.error('--held is a probability in [0, 1]')
    if args.near and args.dagger:
        parser.error('--dagger starts where the checkpoint goes; --near does not apply')
    if not 0.0 <= args.pauses < 1.0 or (args.pauses and (args.snippets or args.dagger)):
        parser.error('--pauses is a probability in [0, 1), for whole episodes')
    config = SimConfig(camera_tilt_deg=args.camera_tilt, light_slant_deg=args.light_slant)
    if args.dagger:
        from dataclasses import replace

        from worldvla_ros.model import load_policy

        config = replace(config, max_steps=args.max_steps) if args.max_steps else config
        bags = record_dagger(load_policy(args.dagger), args.out_dir, args.episodes, args.seed, args.snippets,
                             args.noise, args.storage, config=config)
        print(f'{len(bags)} snippets of {args.snippets} steps from the states of {args.dagger} written to '
              f'{args.out_dir}')
        return 0
    if args.snippets:
        bags = record_snippets(args.out_dir, args.episodes, args.seed, args.snippets, args.noise, args.storage,
                               near=args.near, held=held, config=config)
        print(f'{len(bags)} snippets of {args.snippets} steps written to {args.out_dir}')
        return 0
    bags = record_demos(args.out_dir, args.episodes, args.seed, args.noise, args.storage,
                        clean_labels=not args.executed_labels, diverse=args.diverse_starts, pauses=args.pauses,
                        config=config)
    print(f'{len(bags)} of {args.episodes} episodes succeeded and were written to {args.out_dir}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
