"""The README's table for the bundled model: closed-loop success and world-model quality.

    python benchmarks/embedded_default.py --episodes 50 \\
        --world-model 'joint, 2000 steps=artifacts/train_v2/step_2000' \\
        --world-model 'world-model only, 2000 steps=artifacts/train_world' \\
        [--checkpoint worldvla_ros/data/tabletop_model] [--heldout artifacts/heldout_demos]

Closed loop: held-out layouts (seeds from 100000), with the action attention mask (batched
decoding), without it (plain causal attention, sequential decoding), and uniformly random
commands (chance). World model: one- to three-step rollouts from every chunk's frame of
held-out expert episodes (``evaluate_bag`` lockstep), PSNR/SSIM against the recorded frames,
for the bundled (jointly trained) model and every ``--world-model LABEL=DIR`` (e.g. a
world-model-only model with the same image tokenizer, and the joint run's checkpoint at the same
number of steps).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from worldvla_ros.evaluation.cli import main as evaluate_bag
from worldvla_ros.model import load_policy
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.closed_loop import evaluate
from worldvla_ros.sim.record import record_demos


def world_model(checkpoint: str, bags: list[Path], horizon: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        rc = evaluate_bag([*map(str, bags), '--checkpoint', checkpoint, '--device', 'cpu', '--out', out,
                           '--wm-horizon', str(horizon), '--no-progress'])
        assert rc == 0
        return json.loads((Path(out) / 'report.json').read_text())['world_model']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default='')
    parser.add_argument('--world-model', action='append', default=[], metavar='LABEL=DIR',
                        help='another checkpoint whose world model to score (repeatable)')
    parser.add_argument('--episodes', type=int, default=50)
    parser.add_argument('--heldout', default='artifacts/heldout_demos')
    parser.add_argument('--heldout-episodes', type=int, default=20)
    parser.add_argument('--wm-horizon', type=int, default=3)
    args = parser.parse_args()
    ckpt = args.checkpoint or str(bundled_checkpoint())
    policy = load_policy(ckpt, device='cpu')
    result: dict = {'checkpoint': ckpt, 'closed_loop': {}}
    for label, kwargs in (('with action mask', {'action_mask': True}), ('without action mask', {'action_mask': False})):
        r = evaluate(policy, args.episodes, **kwargs)
        result['closed_loop'][label] = {k: v for k, v in r.items() if k != 'results'}
    r = evaluate(None, args.episodes)
    result['closed_loop']['chance (random commands)'] = {k: v for k, v in r.items() if k != 'results'}

    heldout = Path(args.heldout)
    if not any(heldout.glob('*/metadata.yaml')):
        record_demos(heldout, args.heldout_episodes, seed=100_000)
    bags = sorted(p for p in heldout.iterdir() if (p / 'metadata.yaml').is_file())[: args.heldout_episodes]
    result['world_model'] = {'joint (bundled)': world_model(ckpt, bags, args.wm_horizon)}
    for spec in args.world_model:
        label, _, path = spec.rpartition('=')
        result['world_model'][label or path] = world_model(path, bags, args.wm_horizon)
    print(json.dumps(result, indent=2))
    print('\n| policy | success | 95 % interval | mean steps |\n|---|---|---|---|')
    for label, r in result['closed_loop'].items():
        lo, hi = r['wilson95']
        print(f'| {label} | {r["success_rate"]:.0%} ({round(r["success_rate"] * r["episodes"])}/{r["episodes"]}) '
              f'| {lo:.0%} – {hi:.0%} | {r["mean_steps"]} |')
    print('\n| model | ' + ' | '.join(f'step {s["step"]} PSNR / SSIM' for s in
                                     result['world_model']['joint (bundled)']['by_horizon_step']) + ' |')
    print('|---' * (1 + args.wm_horizon) + '|')
    for label, w in result['world_model'].items():
        print(f'| {label} | ' + ' | '.join(f'{s["psnr_db"]:.2f} dB / {s["ssim"]:.3f}' for s in w['by_horizon_step'])
              + ' |')


if __name__ == '__main__':
    main()
