"""Lockstep bag-evaluation throughput (frames/s), printed as JSON.

    python benchmarks/bag_eval.py [--frames 100] [--checkpoint DIR --device cuda]

A synthetic bag of ``--frames`` 256×256 frames at 10 Hz is evaluated three ways: actions only
with the checkpoint's chunking, actions with fixed 5-action chunks, and actions plus a one-step
world-model rollout from every chunk's frame.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from worldvla_ros.evaluation.cli import main as evaluate_bag
from worldvla_ros.evaluation.convert import synthetic_bag
from worldvla_ros.model import make_tiny_checkpoint
from worldvla_ros.model.config import WorldVLAConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frames', type=int, default=100)
    parser.add_argument('--checkpoint', default='')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    bag = synthetic_bag(tmp / 'bag', frames=args.frames, seed=0)
    ckpts = {'checkpoint chunking': args.checkpoint or str(make_tiny_checkpoint(tmp / 'tiny'))}
    if not args.checkpoint:
        ckpts['fixed K=5'] = str(make_tiny_checkpoint(tmp / 'tiny_k5', settings=WorldVLAConfig(min_actions=5)))
    results = {}
    runs = [(name, ck, ['--no-world-model']) for name, ck in ckpts.items()]
    runs.append(('fixed K=5 + world model (1 step per chunk)' if not args.checkpoint else '+ world model',
                 list(ckpts.values())[-1], ['--wm-horizon', '1']))
    for name, ck, extra in runs:
        out = tmp / f'report_{len(results)}'
        t0 = time.perf_counter()
        rc = evaluate_bag([str(bag), '--checkpoint', ck, '--device', args.device, '--out', str(out),
                           '--no-progress', *extra])
        wall = time.perf_counter() - t0
        report = json.loads((out / 'report.json').read_text())
        results[name] = {'exit': rc, 'frames_per_s_model_loop': report['throughput_frames_per_s'],
                         'frames_per_s_with_load_and_report': round(args.frames / wall, 2),
                         'chunks': report['timing']['chunks'],
                         'inference_ms_p50': report['timing']['inference_ms']['p50']}
    print(json.dumps({'frames': args.frames, 'device': args.device, 'results': results}, indent=2))


if __name__ == '__main__':
    main()
