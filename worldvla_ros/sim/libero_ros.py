"""``worldvla_libero_eval --through-ros``: the same episodes through the real nodes — the action node and the
LIBERO sim node, in a ROS domain of their own on this machine — one start of the nodes per task."""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from .libero_eval import Options


def run_through_ros(jobs: list[tuple[int, int]], opts: Options, args: argparse.Namespace, out: Path,
                    progress: bool = True, timeout_s: float = 7200.0) -> list[dict[str, Any]]:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String
    from tqdm import tqdm

    from worldvla_ros.bringup import default_config, sim_config, start_nodes, stop_nodes
    from worldvla_ros.nodes.common import reliable_qos

    from .libero import LiberoMissing

    if args.policy != 'model':
        raise LiberoMissing('--through-ros runs the model (--policy model); the expert through ROS: '
                            'libero_sim_node publish_expert:=true relayed to worldvla/ee_command')
    if opts.replan or opts.chunk_merge != 'replace' or not opts.action_mask:
        raise LiberoMissing('--through-ros runs the release protocol as config/libero_sim.yaml sets it; '
                            '--replan, --chunk-merge and --no-action-mask are in-process only')
    runs: list[tuple[int, int, int]] = []  # (task, first trial, episodes): consecutive trials, one start each
    for task, trial in jobs:
        if runs and runs[-1][0] == task and runs[-1][1] + runs[-1][2] == trial:
            runs[-1] = (task, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((task, trial, 1))
    domain = args.domain_id if getattr(args, 'domain_id', None) is not None else random.randint(120, 230)
    isolation = {'ROS_DOMAIN_ID': str(domain), 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'}
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), unit='episode', desc=f'{opts.suite} via ROS', disable=not progress)
    context = rclpy.Context()
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node('worldvla_libero_eval', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    received: list[dict[str, Any]] = []
    node.create_subscription(String, 'sim/episode_result', lambda m: received.append(json.loads(m.data)),
                             reliable_qos(100))
    try:
        for task, first, count in runs:
            sim_params = {'suite': opts.suite, 'task': str(task), 'first_trial': str(first), 'episodes': str(count),
                          'prompt_source': opts.prompt_source, 'max_steps': str(opts.max_steps)}
            procs = start_nodes(args.checkpoint, [default_config(), sim_config('libero')], args.device,
                                use_world_model=False, extra={'dtype': args.dtype}, use_sim=True, sim='libero',
                                sim_params=sim_params, env=isolation)
            try:
                deadline = time.monotonic() + timeout_s
                done = 0
                while done < count:
                    executor.spin_once(timeout_sec=0.2)
                    while received:
                        r = received.pop(0)
                        record = {'task': r['task'], 'trial': r['trial'], 'success': r['success'],
                                  'steps': r['steps'], 'chunks': None, 'instruction': r['instruction'],
                                  'wall_s': r['wall_s'], 'holds': r['holds'], 'actions_sha': r['actions_sha'],
                                  **({'error': r['error']} if 'error' in r else {})}
                        with open(out / 'episodes.jsonl', 'a') as f:
                            f.write(json.dumps(record) + '\n')
                        results.append(record)
                        done += 1
                        bar.update(1)
                    dead = [p for p in procs if p.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        raise RuntimeError(f'task {task}: a node exited with code {dead[0].returncode}' if dead
                                           else f'task {task}: no result within {timeout_s:.0f} s')
            finally:
                stop_nodes(procs)
    finally:
        bar.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
    return results
