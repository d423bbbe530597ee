"""Model core on the tiny checkpoint: layout, batched == sequential, world model, no ROS needed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldvla_ros.model import (
    VQGANConfig,
    generate_chunk_batched,
    generate_chunk_sequential,
    image_block_length,
)
from worldvla_ros.model import (
    tokens as T,
)
from worldvla_ros.model.generate import DecodeSession, ImageSampling
from worldvla_ros.model.image_tokenizer import ImageTokenizer
from worldvla_ros.model.prompts import action_prompt
from worldvla_ros.model.tiny import build_vocab
from worldvla_ros.model.vqgan import VQGAN


def test_model_package_imports_without_rclpy() -> None:
    code = (
        "import sys; sys.modules['rclpy'] = None\n"  # any `import rclpy` now raises ImportError
        'import worldvla_ros.model\n'
        "assert not any(m.startswith(('rclpy', 'sensor_msgs', 'std_msgs')) for m in sys.modules if sys.modules[m])"
    )
    subprocess.run([sys.executable, '-c', code], check=True)


def test_the_gpu_benchmarks_need_neither_ros_nor_rosbags() -> None:
    """``benchmarks/gpu.sh`` runs on a GPU machine that has the model's dependencies only."""
    code = (
        'import importlib.util, sys\n'
        "for m in ('rclpy', 'rosbags', 'cv_bridge'): sys.modules[m] = None\n"
        "for name in ('model_core', 'fleet', 'monitor_anomalies'):\n"
        "    spec = importlib.util.spec_from_file_location(name, f'benchmarks/{name}.py')\n"
        '    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n'
        'import worldvla_ros.model.batching, worldvla_ros.sim.bundled, worldvla_ros.sim.record\n'  # imported in calls
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_image_block_lengths() -> None:
    assert image_block_length(256) == 276
    assert image_block_length(512) == 1060


@pytest.mark.parametrize(('side', 'grid_tok', 'length'), [(256, 8812, 276), (512, 8820, 1060)])
def test_image_block_layout(side: int, grid_tok: int, length: int) -> None:
    vq = VQGANConfig(embed_dim=32, z_channels=32, resolution=side, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
    images = ImageTokenizer(VQGAN(vq), build_vocab(0), side, rotate_180=True)
    n = side // 16
    codes = np.random.default_rng(0).integers(0, T.NUM_IMAGE_CODES, (n, n))
    block = images.codes_to_block(codes)
    assert len(block) == length == images.block_length
    assert block[:3] == [T.IMAGE_START, grid_tok, grid_tok] and block[-1] == T.IMAGE_END
    rows = np.array(block[3:-1]).reshape(n, n + 1)
    assert np.all(rows[:, -1] == T.IMAGE_NEWLINE)
    assert np.all((rows[:, :-1] >= T.IMAGE_CODE_FIRST) & (rows[:, :-1] <= T.IMAGE_CODE_LAST))
    # the vocabulary maps codes by name, not by a constant offset, and inverts exactly
    assert not np.array_equal(rows[:, :-1], codes + T.IMAGE_CODE_FIRST)
    np.testing.assert_array_equal(images.block_to_codes(block), codes)
    broken = list(block)
    broken[3 + n] = 5000
    with pytest.raises(ValueError, match='newline'):
        images.block_to_codes(broken)


def test_frames_encode_to_blocks_and_decode_to_images(tiny_policy, frames) -> None:
    images = tiny_policy.images
    blocks = images.encode(frames)
    assert [len(b) for b in blocks] == [276, 276]
    codes = images.encode_codes(frames)
    assert codes.shape == (2, 16, 16) and codes.min() >= 0 and codes.max() < T.NUM_IMAGE_CODES
    out = images.decode_codes(codes)
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.uint8


def test_prompt_layout(tiny_policy, frames) -> None:
    blocks = tiny_policy.images.encode(frames)
    ids = action_prompt(tiny_policy.text, blocks, 'open the drawer', tiny_policy.config.action_prompt)
    text = tiny_policy.text.decode(ids[1 : ids.index(T.IMAGE_START)])
    assert ids[0] == T.BOS and ids[-1] == T.END_OF_TURN
    assert text == 'What action should the robot take to open the drawer?'
    assert ids.count(T.IMAGE_START) == 2 and ids.count(T.IMAGE_END) == 2


def test_qk_norm_rows_expanded_on_load(tiny_checkpoint, tiny_policy) -> None:
    from safetensors import safe_open

    attn = tiny_policy.lm.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (4, 16) and attn.k_norm.bias.shape == (4, 16)
    stored = None
    for shard in sorted(tiny_checkpoint.glob('*.safetensors')):
        with safe_open(str(shard), 'pt') as f:
            if 'model.layers.0.self_attn.q_norm.weight' in f.keys():
                stored = f.get_tensor('model.layers.0.self_attn.q_norm.weight')
    assert stored is not None and stored.shape == (1, 16)
    assert torch.equal(attn.q_norm.weight, stored.expand(4, -1))


def _prompt(policy, frames, instruction='put the bowl on the plate'):
    return action_prompt(policy.text, policy.images.encode(frames), instruction, policy.config.action_prompt)


@pytest.mark.parametrize('k', [5, 10])
def test_batched_chunk_equals_sequential(tiny_policy, frames, k: int) -> None:
    prompt = _prompt(tiny_policy, frames)
    seq = generate_chunk_sequential(tiny_policy.lm, prompt, k, constrain=True, min_actions=k)
    bat = generate_chunk_batched(tiny_policy.lm, prompt, k, min_actions=k)
    assert len(seq.tokens) == k * 9 + 1 and seq.tokens[-1] == T.END_OF_TURN
    assert bat.tokens == seq.tokens
    assert bat.forward_passes == 1 + 9 and seq.forward_passes == 1 + 9 * k


@pytest.mark.parametrize('seed', range(6))
def test_batched_equals_sequential_when_the_model_decides_the_length(tiny_policy, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)]
    prompt = _prompt(tiny_policy, frames, f'task number {seed}')
    seq = generate_chunk_sequential(tiny_policy.lm, prompt, 10, constrain=True, min_actions=1)
    bat = generate_chunk_batched(tiny_policy.lm, prompt, 10, min_actions=1)
    assert bat.tokens == seq.tokens


def test_release_decoding_is_masked_greedy(tiny_policy, frames) -> None:
    """Unconstrained sequential decoding = argmax of the full-sequence forward with the action mask."""
    from worldvla_ros.model import action_attention_mask
    from worldvla_ros.model.attention_mask import additive_mask

    prompt = _prompt(tiny_policy, frames)
    res = generate_chunk_sequential(tiny_policy.lm, prompt, 2, max_tokens_per_action=12, constrain=False)
    ids = torch.tensor([prompt + res.tokens[:-1]])
    mask = additive_mask(action_attention_mask(ids), torch.float32)
    with torch.inference_mode():
        hidden = tiny_policy.lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = tiny_policy.lm.lm_head(hidden[0, len(prompt) - 1 :])
    assert torch.argmax(logits, dim=-1).tolist() == res.tokens


def test_image_logits_are_not_blocked(tiny_policy, frames) -> None:
    session = DecodeSession(tiny_policy.lm, _prompt(tiny_policy, frames))
    image_ids = torch.as_tensor(tiny_policy.images.image_token_ids)
    logits = session.last_logits[image_ids]
    assert torch.isfinite(logits).all() and logits.abs().max() < 1e3


def test_predict_actions_shape_and_range(tiny_policy, frames) -> None:
    pred = tiny_policy.predict(frames, 'pick up the black bowl')
    assert pred.actions.ndim == 2 and pred.actions.shape[1] == 7 and 1 <= len(pred.actions) <= 5
    tok = tiny_policy.actions
    assert np.all(pred.actions >= tok.action_min - 1e-6) and np.all(pred.actions <= tok.action_max + 1e-6)
    assert pred.timing.total_s > 0 and pred.timing.prompt_tokens > 552
    assert tiny_policy.predict_actions(frames[-1:], 'pick up the black bowl').shape[1] == 7


def test_predict_rejects_bad_instruction(tiny_policy, frames) -> None:
    with pytest.raises(ValueError, match='empty'):
        tiny_policy.predict(frames, '   ')
    with pytest.raises(ValueError, match='characters'):
        tiny_policy.predict(frames, 'x' * 10_000)
    with pytest.raises(ValueError, match='frame'):
        tiny_policy.predict([], 'go')
    with pytest.raises(ValueError, match='uint8'):
        tiny_policy.predict([np.zeros((64, 64), dtype=np.uint8)], 'go')


def test_world_model_block_and_image(tiny_policy, frames) -> None:
    action = np.array([0.1, 0.0, -0.1, 0.0, 0.0, 0.05, -1.0])
    block = tiny_policy.imagine_block(frames[-1], action)
    assert len(block) == 276
    codes = tiny_policy.images.block_to_codes(block)  # raises unless well formed
    assert codes.shape == (16, 16)
    image = tiny_policy.imagine(frames[-1], action)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    # greedy is deterministic; seeded sampling is reproducible and differs from greedy
    assert tiny_policy.imagine_block(frames[-1], action) == block
    s = ImageSampling(temperature=1.0, top_k=100, seed=3)
    sampled = tiny_policy.imagine_block(frames[-1], action, s)
    assert sampled == tiny_policy.imagine_block(frames[-1], action, s)
    assert sampled != block
    guided = tiny_policy.imagine_block(frames[-1], action, ImageSampling(cfg_scale=3.0))
    tiny_policy.images.block_to_codes(guided)


def test_rollout(tiny_policy, frames) -> None:
    out = tiny_policy.imagine_rollout(frames[-1], np.zeros((2, 7)))
    assert len(out) == 2 and all(o.shape == (256, 256, 3) for o in out)


def test_history_frames_are_encoded_once_with_the_same_tokens(tiny_policy) -> None:
    """A frame's image block is reused by the next call that has it in its history (found by content), and the
    chunk is the one a fresh encoding of every frame gives."""
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    encoded: list[int] = []
    real = tiny_policy.images.encode

    def counting(batch):
        encoded.append(len(batch))
        return real(batch)

    tiny_policy._blocks.clear()
    tiny_policy.images.encode = counting
    try:
        first = tiny_policy.predict(frames[0:2], 'put the red block in the bowl')
        second = tiny_policy.predict(frames[1:3], 'put the red block in the bowl')
        assert encoded == [1, 1, 1]  # f0, f1, then only f2
        tiny_policy._blocks.clear()
        fresh = tiny_policy.predict(frames[1:3], 'put the red block in the bowl')
        assert fresh.tokens == second.tokens and first.tokens is not None
        frames[2][0, 0] ^= 255  # the same array, changed in place: encoded again
        tiny_policy.predict(frames[1:3], 'put the red block in the bowl')
        assert encoded[-1] == 1 and len(encoded) == 6
    finally:
        tiny_policy.images.encode = real
        tiny_policy._blocks.clear()
