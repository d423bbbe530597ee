"""Many robots on one machine: chunks/s for N robots served by one batching model vs N separate models.

    python benchmarks/fleet.py --config tiny --robots 1 2 4 8 --seconds 10
    python benchmarks/fleet.py --config bundled --device cuda

"batched": one process, one ``BatchingPolicy``, N threads (one per robot, as the fleet node's action
nodes) each asking for a chunk for a new camera frame as soon as it has the last one; each encodes its
frame and prefills its prompt in its own thread, the chunks are decoded together. "separate": N
processes each with its own model (N action nodes, one torch thread each: ``cpu_threads``). Both count
the chunks all robots got per second; the model call only (ROS transport is the same either way).

"phases": what one chunk costs, phase by phase (encode a frame, prefill a prompt: per robot; decode: shared
by a batch), and the ceiling ratio a batch of the largest N can reach over separate models on equal compute.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _load(config: str, device: str, resolution: int):
    from worldvla_ros.model import load_policy, make_tiny_checkpoint
    from worldvla_ros.model.config import WorldVLAConfig

    if config == 'bundled':
        from worldvla_ros.sim.bundled import bundled_checkpoint

        return load_policy(bundled_checkpoint(), device=device)
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / 'tiny', settings=WorldVLAConfig(resolution=resolution))
    return load_policy(path, device=device)


def _robot_loop(predict, resolution: int, seed: int, seconds: float, counts: list[int], index: int) -> None:
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)]
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        frames = [*frames[-1:], rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)]
        predict(frames, f'robot {index}: put the red block in the bowl')
        n += 1
    counts[index] = n


def _separate_worker(config: str, device: str, resolution: int, threads: int, seconds: float, index: int,
                     start: mp.Event, out: mp.Queue) -> None:
    policy = _load(config, device, resolution)
    policy.warmup()
    counts = [0]
    start.wait()

    def robot() -> None:  # in a thread, as the action node's worker, with its cpu_threads
        policy.use_cpu_threads(threads)
        _robot_loop(policy.predict, policy.resolution, index, seconds, counts, 0)

    worker = threading.Thread(target=robot)
    worker.start()
    worker.join()
    out.put(counts[0])


def separate(config: str, device: str, resolution: int, robots: int, seconds: float) -> float:
    ctx = mp.get_context('spawn')
    start, out = ctx.Event(), ctx.Queue()
    threads = 1  # the action node's cpu_threads default
    procs = [ctx.Process(target=_separate_worker, args=(config, device, resolution, threads, seconds, i, start, out))
             for i in range(robots)]
    for p in procs:
        p.start()
    time.sleep(2.0 + 1.5 * robots)  # every process loaded and warmed up (loading is not measured)
    start.set()
    total = sum(out.get(timeout=seconds + 600) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def batched(policy, robots: int, seconds: float, max_wait_s: float, threads: int) -> tuple[float, float]:
    from worldvla_ros.model.batching import BatchingPolicy

    shared = BatchingPolicy(policy, callers=robots, max_wait_s=max_wait_s, cpu_threads=threads)
    counts = [0] * robots
    threads = [threading.Thread(target=_robot_loop, args=(shared.predict, policy.resolution, i, seconds, counts, i))
               for i in range(robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = list(shared.batch_sizes)
    shared.close()
    return sum(counts) / seconds, float(np.mean(sizes)) if sizes else 0.0


def phases(policy, robots: int, repeats: int = 15) -> dict:
    """Median ms of each phase of a chunk, one at a time in this thread: what a batch can and cannot share.
    Encoding a frame and prefilling a prompt are per robot; only the decoding is shared by a batch. The
    ceiling is what a batch of ``robots`` can gain over separate models on the same compute."""
    import statistics

    import torch

    from worldvla_ros.model.engine import engine_chunks_batched, prefill_prompt
    from worldvla_ros.model.prompts import action_prompt

    rng = np.random.default_rng(0)
    r = policy.resolution
    frames = [rng.integers(0, 256, (r, r, 3), dtype=np.uint8) for _ in range(robots + 1)]

    def ms(call) -> float:
        call()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            if policy.device.type == 'cuda':
                torch.cuda.synchronize(policy.device)
            times.append(time.perf_counter() - t0)
        return round(1000 * statistics.median(times), 2)

    blocks = policy.images.encode(frames)
    prompts = [action_prompt(policy.text, blocks[i : i + 2], f'robot {i}: put the red block in the bowl',
                             policy.config.action_prompt) for i in range(robots)]
    caches = [prefill_prompt(policy.engine, p) for p in prompts]
    k = policy.chunk_size
    out = {'encode_frame_ms': ms(lambda: policy.images.encode(frames[:1])),
           'prefill_prompt_ms': ms(lambda: prefill_prompt(policy.engine, prompts[0])),
           'prompt_tokens': len(prompts[0]),
           'decode_1_robot_ms': ms(lambda: engine_chunks_batched(policy.engine, prompts[:1], k, 1,
                                                                 prefilled=caches[:1])),
           f'decode_{robots}_robots_ms': ms(lambda: engine_chunks_batched(policy.engine, prompts, k, 1,
                                                                          prefilled=caches))}
    own = out['encode_frame_ms'] + out['prefill_prompt_ms']
    alone, batched = own + out['decode_1_robot_ms'], own + out[f'decode_{robots}_robots_ms'] / robots
    out.update(ms_per_chunk_alone=round(alone, 2), ms_per_chunk_in_batch=round(batched, 2),
               batch_ceiling_ratio=round(alone / batched, 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', choices=['tiny', 'bundled'], default='tiny')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--resolution', type=int, default=256, help='tiny config only')
    parser.add_argument('--robots', type=int, nargs='+', default=[1, 2, 4, 8])
    parser.add_argument('--seconds', type=float, default=10.0)
    parser.add_argument('--max-wait-ms', type=float, default=20.0)
    parser.add_argument('--threads', type=int, default=1, help='torch threads of the batching process (0: default)')
    args = parser.parse_args()
    policy = _load(args.config, args.device, args.resolution)
    policy.warmup()
    if args.device == 'cpu':
        policy.use_cpu_threads(args.threads)  # the phases on one thread, as each robot's and the batch's work
    cost = phases(policy, max(args.robots))
    print(json.dumps({'phases': cost}), flush=True)
    rows = []
    for n in args.robots:
        rate, mean_batch = batched(policy, n, args.seconds, args.max_wait_ms / 1000, args.threads)
        alone = separate(args.config, args.device, args.resolution, n, args.seconds)
        rows.append({'robots': n, 'batched_chunks_per_s': round(rate, 2), 'mean_batch': round(mean_batch, 2),
                     'separate_chunks_per_s': round(alone, 2), 'ratio': round(rate / alone, 2) if alone else None})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({'config': args.config, 'device': args.device, 'cpu_count': os.cpu_count(),
                      'seconds': args.seconds, 'phases': cost, 'rows': rows}, indent=2))


if __name__ == '__main__':
    main()
