"""The table of docs/embedded-default.md for the bundled model: closed-loop success and world-model quality.

    python benchmarks/embedded_default.py --episodes 150 --heldout-episodes 10 --wm-horizon 2 \\
        --world-model 'world-model only, 2500 steps=artifacts/wm_only' \\
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
from worldvla_ros.sim.baselines import majority_gripper_accuracy, other_layout_baseline
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.closed_loop import HELD_OUT_SEED, evaluate
from worldvla_ros.sim.probes import reach_direction_probe
from worldvla_ros.sim.record import record_demos


def lockstep_report(checkpoint: str, bags: list[Path], horizon: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        rc = evaluate_bag([*map(str, bags), '--checkpoint', checkpoint, '--device', 'cpu', '--out', out,
                           '--wm-horizon', str(horizon), '--action-scale', 'tabletop', '--no-progress'])
        assert rc == 0
        return json.loads((Path(out) / 'report.json').read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default='')
    parser.add_argument('--world-model', action='append', default=[], metavar='LABEL=DIR',
                        help='another checkpoint whose world model to score (repeatable)')
    parser.add_argument('--episodes', type=int, default=50)
    parser.add_argument('--first-seed', type=int, default=HELD_OUT_SEED,
                        help='closed loop: the first held-out layout (a second range: 120000)')
    parser.add_argument('--heldout', default='artifacts/heldout_demos')
    parser.add_argument('--heldout-episodes', type=int, default=20)
    parser.add_argument('--wm-horizon', type=int, default=3)
    parser.add_argument('--json', default='', help='also write the result here')
    args = parser.parse_args()
    ckpt = args.checkpoint or str(bundled_checkpoint())
    policy = load_policy(ckpt, device='cpu')
    result: dict = {'checkpoint': ckpt, 'first_seed': args.first_seed, 'closed_loop': {}}
    for label, kwargs in (('with action mask', {'action_mask': True}), ('without action mask', {'action_mask': False})):
        r = evaluate(policy, args.episodes, args.first_seed, **kwargs)
        result['closed_loop'][label] = {k: v for k, v in r.items() if k != 'results'}
    r = evaluate(None, args.episodes, args.first_seed)
    result['closed_loop']['chance (random commands)'] = {k: v for k, v in r.items() if k != 'results'}
    result['reach_direction_probe'] = reach_direction_probe(policy, range(100_200, 100_225))

    heldout = Path(args.heldout)
    if not any(heldout.glob('*/metadata.yaml')):
        record_demos(heldout, args.heldout_episodes, seed=100_000)
    bags = sorted(p for p in heldout.iterdir() if (p / 'metadata.yaml').is_file())[: args.heldout_episodes]
    bundled = lockstep_report(ckpt, bags, args.wm_horizon)
    seeds = [int(b.name.rsplit('_', 1)[1]) for b in bags]  # record_demos names each bag by its seed
    result['open_loop_actions'] = {k: bundled['actions'].get(k) for k in
                                   ('actions_compared', 'direction_agreement', 'gripper_accuracy', 'l1')}
    result['open_loop_actions']['gripper_majority_baseline'] = majority_gripper_accuracy(seeds)
    result['world_model'] = {'joint (bundled)': bundled['world_model']}
    result['image_tokenizer'] = tokenizer_report(policy, bags)
    for spec in args.world_model:
        label, _, path = spec.rpartition('=')
        result['world_model'][label or path] = lockstep_report(path, bags, args.wm_horizon)['world_model']
    result['other_layout_baseline'] = [other_layout_baseline(seeds, policy.config.resolution, h)
                                       for h in range(1, args.wm_horizon + 1)]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print('\n| policy | success | 95 % interval | grasped the named block | median closest approach | mean steps |'
          '\n|---|---|---|---|---|---|')
    for label, r in result['closed_loop'].items():
        lo, hi = r['wilson95']
        print(f'| {label} | {r["success_rate"]:.0%} ({round(r["success_rate"] * r["episodes"])}/{r["episodes"]}) '
              f'| {lo:.0%} – {hi:.0%} | {r["grasped_named_block"]:.0%} | {r["median_closest_cm"]} cm '
              f'| {r["mean_steps"]} |')
    print('\n| model | ' + ' | '.join(f'step {s["step"]} PSNR / SSIM' for s in
                                     result['world_model']['joint (bundled)']['by_horizon_step']) + ' |')
    print('|---' * (1 + args.wm_horizon) + '|')
    for label, w in result['world_model'].items():
        print(f'| {label} | ' + ' | '.join(f'{s["psnr_db"]:.2f} dB / {s["ssim"]:.3f}' for s in w['by_horizon_step'])
              + ' |')
    copy = result['world_model']['joint (bundled)']['by_horizon_step']
    print('| observed frame repeated (baseline) | ' + ' | '.join(
        f'{s["copy_baseline_psnr_db"]:.2f} dB / {s["copy_baseline_ssim"]:.3f}' for s in copy) + ' |')
    print('| a frame of another layout, same time step (baseline) | ' + ' | '.join(
        f'{s["psnr_db"]:.2f} dB / {s["ssim"]:.3f}' for s in result['other_layout_baseline']) + ' |')
    a = result['open_loop_actions']
    print(f'\nopen loop, {a["actions_compared"]} held-out frames: direction agreement '
          + ', '.join(f'{k} {v:.0%}' for k, v in a['direction_agreement'].items())
          + f' (chance 50 %); gripper {a["gripper_accuracy"]:.0%} (majority {a["gripper_majority_baseline"]:.0%})')
    t = result['image_tokenizer']
    print(f'image tokenizer on the held-out frames: reconstruction {t["reconstruction_psnr_db"]:.2f} dB; a patch '
          f'whose pixels did not change keeps its code {t["unchanged_patch_keeps_code"]:.0%} of the time; '
          f'{t["codes_used"]} distinct codes')
    g = result['reach_direction_probe']
    print(f'reach-direction probe, gripper 12 cm beside the named block ({g["placements"]} placements): '
          f'moves toward it in x {g["x"]:.0%}, y {g["y"]:.0%} (expert 100 %, ignoring the geometry ≈ 50 %)')


def tokenizer_report(policy, bags: list[Path]) -> dict:
    """How faithfully and how consistently the VQGAN names the held-out frames."""
    import numpy as np
    import torch

    from worldvla_ros.evaluation.episode import read_episode
    from worldvla_ros.model.image_tokenizer import to_model_frame
    from worldvla_ros.train.vqgan_trainer import reconstruction_psnr

    vq, cfg = policy.images.vqgan, policy.config
    kept, used, frames_all = [], set(), []
    for bag in bags:
        episode = read_episode(bag, frame_size=cfg.resolution)
        frames = np.stack([to_model_frame(f, cfg.resolution, cfg.rotate_180) for f in episode.frames])
        frames_all.append(frames)
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(policy.device)
        codes = vq.encode(pixels.to(next(vq.parameters()).dtype)).cpu().numpy()
        n, g = codes.shape[0], codes.shape[1]
        f = cfg.resolution // g
        patches = frames.reshape(n, g, f, g, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g, g, -1).astype(int)
        unchanged = np.abs(patches[1:] - patches[:-1]).max(-1) == 0
        kept.append((codes[1:] == codes[:-1])[unchanged])
        used |= set(np.unique(codes).tolist())
    return {'reconstruction_psnr_db': round(reconstruction_psnr(vq, np.concatenate(frames_all)[::4]), 2),
            'unchanged_patch_keeps_code': round(float(np.concatenate(kept).mean()), 3), 'codes_used': len(used)}


if __name__ == '__main__':
    main()
