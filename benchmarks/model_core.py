"""Model-core speed and memory, printed as JSON.

    python benchmarks/model_core.py --config tiny --device cpu
    python benchmarks/model_core.py --config bundled --device cpu   # the bundled tabletop model, sim frames
    python benchmarks/model_core.py --config 7b --device cuda --dtype bfloat16   # random weights

Reports prefill ms, ms per action chunk (sequential, batched, batched on the static-cache engine, the
same with the decode step captured — ``--capture``, CUDA graphs by default on a GPU —, plain
transformers ``generate``),
ms per world-model frame (``world_model_frame_reference_ms``: transformers' forward a token at a step;
``_engine_ms``: the static-cache engine; ``_drafted_ms``: greedy verified against the current frame's
tokens, what ``WorldVLAPolicy.imagine`` uses; ``world_model_frame_ms`` = drafted; with classifier-free
guidance (scale 3): ``_cfg_ms``, both streams one batch of two rows, ``_cfg_two_sessions_ms``, two
sessions; sampled at temperature 1: ``_sampled_engine_ms`` a token a step, ``_sampled_drafted_ms``
speculative sampling with the current frame as the draft) and peak memory.
The 7B config uses random weights: speed and memory are those of the real model, the outputs are not
(random weights accept few draft tokens: drafted decoding is measured on the bundled model).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, DynamicCache

from worldvla_ros.model import load_policy, make_tiny_checkpoint
from worldvla_ros.model import tokens as T
from worldvla_ros.model.attention_mask import action_attention_mask_rows, additive_mask
from worldvla_ros.model.config import RELEASE_7B, WorldVLAConfig
from worldvla_ros.model.engine import (
    DecodeEngine,
    EngineSession,
    engine_chunk_batched,
    engine_image_block,
    engine_image_block_drafted,
)
from worldvla_ros.model.generate import (
    ImageSampling,
    SessionPair,
    forward_logits,
    generate_chunk_batched,
    generate_chunk_sequential,
    generate_image_block,
    image_block_loop,
)
from worldvla_ros.model.prompts import action_prompt, world_model_prompt
from worldvla_ros.model.tiny import build_vocab


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


# HBM bandwidth by device name (vendor figures, GB/s); --peak-gbs for others
PEAK_GBS = {'NVIDIA H100 80GB HBM3': 3350.0, 'NVIDIA H100 PCIe': 2000.0, 'NVIDIA H200': 4800.0,
            'NVIDIA A100-SXM4-80GB': 2039.0, 'NVIDIA A100-SXM4-40GB': 1555.0}


def bandwidth_floor(lm: ChameleonForConditionalGeneration, result: dict, peak_gbs: float | None) -> dict:
    """A decode pass reads every weight once: the chunk's floor is the prefill plus 9 such reads; the bandwidth
    a path achieved over its 9 decode passes (its chunk time minus the prefill)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    out = {'weights_gb': weight_bytes / 1e9, 'peak_gbs': peak_gbs}
    for path in ('chunk_engine_ms', 'chunk_captured_ms'):
        decode_s = (result.get(path, 0.0) - result['prefill_ms']) / 1e3
        if decode_s > 0:
            out[path.replace('_ms', '_decode_gbs')] = T.TOKENS_PER_ACTION * weight_bytes / decode_s / 1e9
    if peak_gbs:
        floor = result['prefill_ms'] + T.TOKENS_PER_ACTION * weight_bytes / (peak_gbs * 1e9) * 1e3
        out['chunk_floor_ms'] = floor
        for path in ('chunk_engine_ms', 'chunk_captured_ms', 'chunk_transformers_generate_ms'):
            if path in result:
                out[path.replace('_ms', '_over_floor')] = result[path] / floor
    return out


def captured_chunk(engine: DecodeEngine, prompt: list[int], k: int, args: argparse.Namespace, sync) -> dict:
    """The engine's chunk with the decode step captured: ms, the first call's ms (recording/compiling) and
    whether its tokens are the uncaptured step's."""
    how = engine.auto_capture() if args.capture == 'auto' else args.capture
    if how == 'off':
        return {}
    expected = engine_chunk_batched(engine, prompt, k, min_actions=k).tokens
    engine.capture(how)
    t = time.perf_counter()
    first = engine_chunk_batched(engine, prompt, k, min_actions=k).tokens
    sync()
    first_ms = (time.perf_counter() - t) * 1e3
    out = {'capture': how, 'chunk_captured_first_call_ms': first_ms,
           'chunk_captured_ms': timed(lambda: engine_chunk_batched(engine, prompt, k, min_actions=k), args.repeats,
                                      sync),
           'chunk_captured_tokens_equal': first == expected
           and engine_chunk_batched(engine, prompt, k, min_actions=k).tokens == expected,
           'capture_error': engine.capture_error}
    engine.release_capture()
    return out


def random_7b(device: torch.device, dtype: torch.dtype) -> ChameleonForConditionalGeneration:
    cfg = RELEASE_7B.to_hf_dict()
    cfg['vocabulary_map'] = build_vocab(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        lm = ChameleonForConditionalGeneration._from_config(ChameleonConfig.from_dict(cfg),
                                                            attn_implementation='sdpa')
        torch.set_default_dtype(torch.float32)
    del lm.model.vqmodel
    return lm.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', choices=['tiny', 'bundled', '7b'], default='tiny')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='auto')
    parser.add_argument('--resolution', type=int, default=256)
    parser.add_argument('--chunk-size', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--skip-world-model', action='store_true')
    parser.add_argument('--peak-gbs', type=float, default=None,
                        help="the GPU's memory bandwidth, GB/s, for the chunk's floor (default: known devices)")
    parser.add_argument('--capture', choices=['auto', 'cuda_graph', 'compile', 'off'], default='auto',
                        help='also time the chunk on a captured decode step (auto: CUDA graphs on a GPU, off on CPU)')
    args = parser.parse_args()

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    if args.config == 'bundled':
        from worldvla_ros.sim.bundled import bundled_checkpoint
        from worldvla_ros.sim.tabletop import TabletopSim

        policy = load_policy(bundled_checkpoint(), device=args.device, dtype=args.dtype)
        args.resolution, args.chunk_size = policy.resolution, policy.chunk_size
        frames = [policy.model_frame(TabletopSim().reset(seed=100500 + i)) for i in range(2)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            settings = WorldVLAConfig(resolution=args.resolution, chunk_size=args.chunk_size)
            ckpt = make_tiny_checkpoint(Path(tmp) / 'tiny', settings=settings)
            policy = load_policy(ckpt, device=args.device, dtype=args.dtype)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8) for _ in range(2)]
    lm = random_7b(device, policy.dtype if args.dtype != 'auto' else torch.bfloat16) if args.config == '7b' \
        else policy.lm
    prompt = action_prompt(policy.text, policy.images.encode(frames), 'put the bowl on the plate',
                           policy.config.action_prompt)
    k = args.chunk_size
    dtype = lm.lm_head.weight.dtype
    ids = torch.tensor([prompt], device=device)

    def prefill() -> None:
        mask = additive_mask(torch.ones((1, len(prompt), len(prompt)), dtype=torch.bool,
                                        device=device).tril(), dtype)
        forward_logits(lm, ids, torch.arange(len(prompt), device=device)[None], mask, DynamicCache(config=lm.config))

    def hf_generate() -> None:
        with torch.inference_mode():
            lm.generate(ids, max_new_tokens=9 * k, min_new_tokens=9 * k, do_sample=False, eos_token_id=None,
                        pad_token_id=T.PAD)

    engine = policy.engine if lm is policy.lm else DecodeEngine(lm)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    result = {
        'config': args.config, 'device': str(device), 'dtype': str(dtype).replace('torch.', ''),
        'resolution': args.resolution, 'chunk_size': k, 'prompt_tokens': len(prompt),
        'prefill_ms': timed(prefill, args.repeats, sync),
        'chunk_sequential_ms': timed(lambda: generate_chunk_sequential(lm, prompt, k, min_actions=k), args.repeats,
                                     sync),
        'chunk_batched_ms': timed(lambda: generate_chunk_batched(lm, prompt, k, min_actions=k), args.repeats, sync),
        'chunk_engine_ms': timed(lambda: engine_chunk_batched(engine, prompt, k, min_actions=k), args.repeats, sync),
        'chunk_transformers_generate_ms': timed(hf_generate, args.repeats, sync),
        **captured_chunk(engine, prompt, k, args, sync),
        'vq_encode_2_frames_ms': timed(lambda: policy.images.encode(frames), args.repeats, sync),
    }
    if not args.skip_world_model:
        frame_block = prompt[prompt.index(T.IMAGE_START): prompt.index(T.IMAGE_END) + 1]
        action = np.array([[0.2, -0.1, 0.0, 0.0, 0.0, 0.0, -1.0]])
        wm_prompt = world_model_prompt(policy.text, frame_block, policy.actions.encode(action),
                                       policy.config.world_model_prompt)
        image_ids = torch.as_tensor(policy.images.image_token_ids, device=device)
        grid, grid_token, repeats = policy.images.grid, T.grid_token(args.resolution), max(1, args.repeats // 2)
        result['world_model_frame_reference_ms'] = timed(
            lambda: generate_image_block(lm, wm_prompt, grid, grid_token, image_ids), repeats, sync)
        result['world_model_frame_engine_ms'] = timed(
            lambda: engine_image_block(engine, wm_prompt, grid, grid_token, image_ids), repeats, sync)
        result['world_model_frame_drafted_ms'] = timed(
            lambda: engine_image_block_drafted(engine, wm_prompt, frame_block, image_ids, policy.draft_window),
            repeats, sync)
        result['world_model_drafted_passes'] = engine_image_block_drafted(
            engine, wm_prompt, frame_block, image_ids, policy.draft_window)[1]
        result['world_model_image_tokens'] = grid * grid
        result['world_model_frame_ms'] = result['world_model_frame_drafted_ms']
        guided = ImageSampling(cfg_scale=3.0)

        @torch.inference_mode()
        def guided_two_sessions() -> None:
            header = [T.IMAGE_START, grid_token, grid_token]
            streams = SessionPair(*(EngineSession(engine, p, grid * (grid + 1), action_attention_mask_rows, image_ids)
                                    for p in ([*wm_prompt, *header], [T.BOS, *header])))
            image_block_loop(streams, header, grid, image_ids, guided, None)

        result['world_model_frame_cfg_two_sessions_ms'] = timed(guided_two_sessions, repeats, sync)
        sampled = ImageSampling(temperature=1.0, seed=0)
        result['world_model_frame_sampled_engine_ms'] = timed(
            lambda: engine_image_block(engine, wm_prompt, grid, grid_token, image_ids, sampled), repeats, sync)
        result['world_model_frame_sampled_drafted_ms'] = timed(
            lambda: engine_image_block_drafted(engine, wm_prompt, frame_block, image_ids, policy.draft_window,
                                               sampling=sampled), repeats, sync)
        result['world_model_sampled_drafted_passes'] = engine_image_block_drafted(
            engine, wm_prompt, frame_block, image_ids, policy.draft_window, sampling=sampled)[1]
        result['world_model_frame_cfg_ms'] = timed(
            lambda: engine_image_block(engine, wm_prompt, grid, grid_token, image_ids, guided), repeats, sync)
    if device.type == 'cuda':
        result['peak_gpu_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
        result.update(bandwidth_floor(lm, result, args.peak_gbs or PEAK_GBS.get(torch.cuda.get_device_name(device))))
    result['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == '__main__':
    main()
