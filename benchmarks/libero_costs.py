"""What LIBERO costs on this machine, printed as JSON: env creation, reset (with the ten wait steps), a step with
the agentview camera and with both cameras, the simulator process's memory, and episodes per hour with the
scripted expert and with the tiny checkpoint at 1 and 2 simulators (``--envs``).

    MUJOCO_GL=egl PYOPENGL_PLATFORM=egl python benchmarks/libero_costs.py [--suites libero_object libero_spatial]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from worldvla_ros.sim.libero import LiberoEnv
from worldvla_ros.sim.libero_eval import main as libero_eval


def env_costs(suite: str, wrist: bool, steps: int) -> dict:
    t0 = time.perf_counter()
    env = LiberoEnv(suite, 0, wrist=wrist)
    opened = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        env.reset(0)
        reset = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            env.step(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]))
            times.append(time.perf_counter() - t0)
        rss = psutil.Process(env.proc.pid).memory_info().rss / 2**20
    finally:
        env.close()
    return {'open_s': round(opened, 2), 'reset_with_wait_steps_s': round(reset, 2),
            'step_ms_p50': round(1e3 * float(np.median(times)), 1), 'env_rss_mib': round(rss)}


def episodes_per_hour(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        assert libero_eval([*args, '--out', out, '--no-progress']) == 0
        return json.loads((Path(out) / 'report.json').read_text())['episodes_per_hour']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suites', nargs='+', default=['libero_object', 'libero_spatial'])
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--episodes', type=int, default=2)
    parser.add_argument('--model-steps', type=int, default=40, help='step limit of the tiny-model episodes')
    args = parser.parse_args()
    result: dict = {'cpus': psutil.cpu_count()}
    for suite in args.suites:
        result[suite] = {'agentview': env_costs(suite, False, args.steps),
                         'agentview_and_wrist': env_costs(suite, True, args.steps)}
    from worldvla_ros.model import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        ckpt = make_tiny_checkpoint(Path(d) / 'tiny')
        trials = str(args.episodes)
        result['episodes_per_hour'] = {
            'expert_libero_object': episodes_per_hour(['--suite', 'libero_object', '--policy', 'expert',
                                                       '--tasks', '0', '--trials', trials]),
            **{f'tiny_model_{args.model_steps}_steps_envs_{n}': episodes_per_hour(
                ['--suite', 'libero_object', '--checkpoint', str(ckpt), '--device', 'cpu', '--tasks', '0',
                 '--trials', trials, '--max-steps', str(args.model_steps), '--envs', str(n)]) for n in (1, 2)}}
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
