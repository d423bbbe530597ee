"""The static-cache decode engine and drafted world-model decoding give the reference path's tokens."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from worldvla_ros.model import DecodeCancelled, load_policy
from worldvla_ros.model import tokens as T
from worldvla_ros.model.attention_mask import action_attention_mask_rows
from worldvla_ros.model.engine import (
    DecodeEngine,
    EngineSession,
    engine_chunk_batched,
    engine_image_block,
    engine_image_block_drafted,
)
from worldvla_ros.model.generate import (
    DecodeSession,
    ImageSampling,
    generate_chunk_batched,
    generate_chunk_sequential,
    generate_image_block,
)
from worldvla_ros.model.prompts import action_prompt, world_model_prompt
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.tabletop import TabletopSim


@pytest.fixture(scope='module')
def bundled_policy():
    return load_policy(bundled_checkpoint(), device='cpu')


def _wm_case(policy, frame: np.ndarray, seed: int) -> tuple[list[int], list[int]]:
    block = policy.encode_frames([policy.model_frame(frame)])[0]
    action = np.random.default_rng(seed).uniform(-0.8, 0.8, (1, 7))
    prompt = world_model_prompt(policy.text, block, policy.actions.encode(action), policy.config.world_model_prompt)
    return prompt, block


def _reference(policy, prompt: list[int], sampling: ImageSampling | None = None) -> list[int]:
    return generate_image_block(policy.lm, prompt, policy.images.grid, T.grid_token(policy.resolution),
                                policy._image_ids, sampling)


def _sim_frames(n: int) -> list[np.ndarray]:
    return [TabletopSim().reset(seed=100600 + i) for i in range(n)]


def test_engine_logits_equal_the_transformers_forward(tiny_policy, frames) -> None:
    """Prefill under the action mask and a few decode steps: the same float32 logits as DecodeSession."""
    blocks = tiny_policy.encode_frames(frames)
    prompt = action_prompt(tiny_policy.text, blocks, 'put the bowl on the plate', tiny_policy.config.action_prompt)
    prompt = [*prompt, T.ACTION_START, 4, 5]  # inside an action block: the mask matters here
    ref = DecodeSession(tiny_policy.lm, prompt)
    new = EngineSession(tiny_policy.engine, prompt, 8, action_attention_mask_rows)
    assert torch.equal(ref.last_logits, new.last_logits)
    for step in ([7], [9, T.ACTION_END], [T.ACTION_START]):
        assert torch.equal(ref.feed(step), new.feed(step))


@pytest.mark.parametrize('decoding', ['engine', 'drafted'])
def test_world_model_blocks_equal_the_reference_on_the_tiny_model(tiny_policy, frames, decoding: str) -> None:
    prompt, block = _wm_case(tiny_policy, frames[0], 0)  # random weights: the draft fails at nearly every token
    ref = _reference(tiny_policy, prompt)
    if decoding == 'engine':
        out = engine_image_block(tiny_policy.engine, prompt, tiny_policy.images.grid,
                                 T.grid_token(tiny_policy.resolution), tiny_policy._image_ids)
    else:
        out, passes = engine_image_block_drafted(tiny_policy.engine, prompt, block, tiny_policy._image_ids)
        assert passes <= tiny_policy.images.grid ** 2 + 1  # the prompt's pass, then at most one a token
    assert out == ref


def test_drafted_decoding_equals_the_reference_and_uses_the_draft_on_the_bundled_model(bundled_policy) -> None:
    """On sim frames most of the next frame repeats the current one: far fewer passes than tokens."""
    grid = bundled_policy.images.grid
    for seed, frame in enumerate(_sim_frames(3)):
        prompt, block = _wm_case(bundled_policy, frame, seed)
        ref = _reference(bundled_policy, prompt)
        for window in (1, 32):
            out, passes = engine_image_block_drafted(bundled_policy.engine, prompt, block,
                                                     bundled_policy._image_ids, window)
            assert out == ref, (seed, window)
        assert passes < 0.75 * grid * grid, passes  # the draft was accepted in long runs


def test_policy_imagine_is_the_same_for_every_decoding(bundled_policy) -> None:
    frame = _sim_frames(1)[0]
    action = np.array([0.3, -0.2, 0.1, 0.0, 0.0, 0.0, -1.0])
    blocks = {}
    for decoding in ('reference', 'engine', 'drafted'):
        bundled_policy.image_decoding = decoding
        blocks[decoding] = bundled_policy.imagine_block(frame, action)
    bundled_policy.image_decoding = 'drafted'
    assert blocks['engine'] == blocks['reference'] and blocks['drafted'] == blocks['reference']


def test_sampling_and_guidance_on_the_engine_draw_what_the_reference_draws(tiny_policy, frames) -> None:
    prompt, _ = _wm_case(tiny_policy, frames[0], 0)
    for sampling in (ImageSampling(temperature=1.0, top_k=50, seed=3), ImageSampling(cfg_scale=3.0),
                     ImageSampling(temperature=0.7, cfg_scale=2.0, seed=5)):
        ref = _reference(tiny_policy, prompt, sampling)
        out = engine_image_block(tiny_policy.engine, prompt, tiny_policy.images.grid,
                                 T.grid_token(tiny_policy.resolution), tiny_policy._image_ids, sampling)
        assert out == ref, sampling


def test_cancel_stops_drafted_decoding_and_a_full_cache_is_an_error(tiny_policy, frames) -> None:
    prompt, block = _wm_case(tiny_policy, frames[0], 0)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(DecodeCancelled):
        engine_image_block_drafted(tiny_policy.engine, prompt, block, tiny_policy._image_ids, should_stop=stop)
    with pytest.raises(ValueError, match='whole image block'):
        engine_image_block_drafted(tiny_policy.engine, prompt, block[:-1], tiny_policy._image_ids)
    session = EngineSession(tiny_policy.engine, [T.BOS, 5, 6], 1, action_attention_mask_rows)
    session.feed([7])
    with pytest.raises(ValueError, match='static cache'):
        session.feed([8])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DecodeCancelled):
        tiny_policy.imagine_block(frames[0], np.zeros(7), cancel=cancel)


def test_engine_keeps_one_copy_of_the_weights(tiny_checkpoint) -> None:
    policy = load_policy(tiny_checkpoint, device='cpu')
    attn = policy.lm.model.layers[0].self_attn
    before = attn.q_proj.weight.detach().clone()
    engine = DecodeEngine(policy.lm)
    fused = engine.weights[0].qkv
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()  # a view into the fused matrix
    assert torch.equal(attn.q_proj.weight, before)


@pytest.mark.parametrize('k', [5, 10])
def test_engine_chunks_equal_the_release_decoding(tiny_policy, frames, k: int) -> None:
    """K = 5 and 10 under the action mask: the engine's batched chunk is the sequential (release) chunk."""
    prompt = action_prompt(tiny_policy.text, tiny_policy.images.encode(frames), 'put the bowl on the plate',
                           tiny_policy.config.action_prompt)
    seq = generate_chunk_sequential(tiny_policy.lm, prompt, k, constrain=True, min_actions=k)
    out = engine_chunk_batched(tiny_policy.engine, prompt, k, min_actions=k)
    assert out.tokens == seq.tokens and out.forward_passes == 1 + 9


@pytest.mark.parametrize('seed', range(4))
def test_engine_chunks_equal_when_the_model_decides_the_length(tiny_policy, bundled_policy, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for policy in (tiny_policy, bundled_policy):
        frames = [rng.integers(0, 256, (policy.resolution,) * 2 + (3,), dtype=np.uint8)]
        prompt = action_prompt(policy.text, policy.images.encode(frames), f'task number {seed}',
                               policy.config.action_prompt)
        ref = generate_chunk_batched(policy.lm, prompt, 10, min_actions=1)
        assert engine_chunk_batched(policy.engine, prompt, 10, min_actions=1).tokens == ref.tokens
        assert ref.tokens == generate_chunk_sequential(policy.lm, prompt, 10, constrain=True, min_actions=1).tokens
