"""The static-cache decode engine and drafted world-model decoding give the reference path's tokens."""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest
import torch

from worldvla_ros.model import DecodeCancelled, NonFiniteLogits, load_policy
from worldvla_ros.model import tokens as T
from worldvla_ros.model.attention_mask import action_attention_mask_rows
from worldvla_ros.model.engine import (
    CACHE_BUCKET,
    DecodeEngine,
    EngineRowsSession,
    EngineSession,
    RecordingGuard,
    engine_chunk_batched,
    engine_chunks_batched,
    engine_image_block,
    engine_image_block_drafted,
    prefill_prompt,
    shared_prefix_attention,
    speculative_pick,
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
    # a prompt that already holds two actions of the chunk: the mask is not causal, and a prefill must apply it
    two = [*prompt, 7, 9, T.ACTION_END, T.ACTION_START, 11, 12]
    assert tiny_policy.engine.prompt_mask(torch.tensor([prompt])) is None
    assert tiny_policy.engine.prompt_mask(torch.tensor([two])) is not None
    masked = EngineSession(tiny_policy.engine, two, 2, action_attention_mask_rows).last_logits
    assert torch.equal(DecodeSession(tiny_policy.lm, two).last_logits, masked)
    assert not torch.equal(DecodeSession(tiny_policy.lm, two, causal=True).last_logits, masked)


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


def test_the_unconditional_stream_is_the_image_block_alone_as_in_the_release(tiny_policy, frames) -> None:
    """Guidance at scale 0 decodes the unconditional stream alone: the greedy block after nothing but its own start
    token (the release's input_ids[:, image_start:]), not after BOS, on the engine and on the reference path."""
    prompt, _ = _wm_case(tiny_policy, frames[0], 0)
    grid, gt, ids = tiny_policy.images.grid, T.grid_token(tiny_policy.resolution), tiny_policy._image_ids
    alone = engine_image_block(tiny_policy.engine, [], grid, gt, ids)
    assert alone != engine_image_block(tiny_policy.engine, [T.BOS], grid, gt, ids)  # the two inputs differ
    unconditional = ImageSampling(cfg_scale=0.0)
    assert engine_image_block(tiny_policy.engine, prompt, grid, gt, ids, unconditional) == alone
    assert _reference(tiny_policy, prompt, unconditional) == alone


def test_rows_of_one_cache_give_each_sequence_its_own_logits(tiny_policy, frames) -> None:
    """Guidance's batch of rows: prompts of different lengths (the longest not first), fed the same tokens in
    steps of one and two; each row's logits are those of its sequence decoded alone."""
    prompt, _ = _wm_case(tiny_policy, frames[0], 1)
    header = [T.IMAGE_START, 8, 8]
    prompts = [[T.BOS, *header], [*prompt, *header], [*prompt[:40], T.ACTION_START, 7, 8, *header]]
    rows = EngineRowsSession(tiny_policy.engine, prompts, 8, tiny_policy._image_ids)
    alone = [EngineSession(tiny_policy.engine, p, 8, action_attention_mask_rows, tiny_policy._image_ids)
             for p in prompts]
    for feed in ([5], [6, T.IMAGE_NEWLINE], [9], None):
        for r, session in enumerate(alone):
            torch.testing.assert_close(rows.last_logits[r], session.last_logits, rtol=1e-5, atol=1e-5)
            assert int(torch.argmax(rows.last_logits[r])) == int(torch.argmax(session.last_logits))
        if feed is not None:
            rows.feed(feed)
            for session in alone:
                session.feed(feed)
    cond, uncond = rows.logits()
    assert torch.equal(cond, rows.last_logits[0]) and torch.equal(uncond, rows.last_logits[1])


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_shared_prefix_attention_is_attention_over_the_prompt_and_the_rows_own_tokens(kv_heads: int) -> None:
    """Three robots × K = 4 rows, prompts of different lengths (the rest of the prompt slots masked), suffixes
    partly decoded: the output equals transformers' eager attention of each row over its robot's prompt copied
    in front of its own tokens, also with grouped-query heads (2 key/value heads for 4 query heads)."""
    from transformers.models.chameleon.modeling_chameleon import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    n, k, heads, dim, p_slots, s_slots, step = 3, 4, 4, 8, 12, 9, 5
    lengths = [12, 7, 9]
    q = torch.randn(n * k, heads, 1, dim, generator=g)
    pk, pv = (torch.randn(n, kv_heads, p_slots, dim, generator=g) for _ in range(2))
    sk, sv = (torch.randn(n * k, kv_heads, s_slots, dim, generator=g) for _ in range(2))
    low = torch.finfo(torch.float32).min
    pmask = torch.where(torch.arange(p_slots)[None, :] >= torch.tensor(lengths)[:, None], low, 0.0)[:, None, None]
    smask = torch.where(torch.arange(s_slots) > step, low, 0.0).expand(n * k, 1, 1, -1)
    out = shared_prefix_attention(q, pk, pv, sk, sv, pmask, smask, 0.3)

    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    for row in range(n * k):
        r = row // k
        keys = torch.cat([pk[r : r + 1], sk[row : row + 1]], dim=2)
        values = torch.cat([pv[r : r + 1], sv[row : row + 1]], dim=2)
        mask = torch.cat([pmask[r : r + 1], smask[row : row + 1]], dim=-1)
        ref, _ = eager_attention_forward(module, q[row : row + 1], keys, values, mask, scaling=0.3, dropout=0.0)
        torch.testing.assert_close(out[row : row + 1], ref, rtol=1e-5, atol=1e-6)


def test_a_draft_token_is_kept_or_replaced_so_that_the_token_has_the_models_distribution() -> None:
    """Speculative sampling's rule, 20 000 draws per draft: the token at the place (the draft when kept, else the
    one drawn instead) is distributed as p, within four standard errors; a draft p cannot give is never kept."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 20_000
    for draft in (0, 3, 4, None):
        counts = torch.zeros(5)
        for _ in range(n):
            instead = speculative_pick(p, draft, generator)
            counts[draft if instead is None else instead] += 1
        error = (counts / n - p).abs()
        assert (error <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (draft, counts / n)


def test_drafted_sampling_is_greedy_at_top_1_and_keeps_the_draft_in_runs(bundled_policy) -> None:
    """With top_k = 1 sampling is greedy: every refused draft token is replaced by the argmax, so the block is the
    greedy one. At temperature 1 the draft still holds in runs (fewer passes than codes), a seed repeats the
    block, and guidance is refused (it decodes on the engine)."""
    engine, ids = bundled_policy.engine, bundled_policy._image_ids
    for seed, frame in enumerate(_sim_frames(2)):
        prompt, block = _wm_case(bundled_policy, frame, seed)
        greedy, _ = engine_image_block_drafted(engine, prompt, block, ids)
        top1, _ = engine_image_block_drafted(engine, prompt, block, ids,
                                             sampling=ImageSampling(temperature=1.0, top_k=1, seed=seed))
        assert top1 == greedy
        sampling = ImageSampling(temperature=1.0, seed=seed)
        sampled, passes = engine_image_block_drafted(engine, prompt, block, ids, sampling=sampling)
        assert engine_image_block_drafted(engine, prompt, block, ids, sampling=sampling)[0] == sampled
        codes = bundled_policy.images.grid ** 2
        assert len(sampled) == len(block) and passes < codes
        assert all(t in set(ids.tolist()) for t in sampled[3:-1] if t != T.IMAGE_NEWLINE)
    with pytest.raises(ValueError, match='guidance'):
        engine_image_block_drafted(engine, prompt, block, ids, sampling=ImageSampling(cfg_scale=2.0))


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


def test_prompts_prefilled_apart_give_the_chunks_of_prompts_prefilled_in_the_batch(tiny_policy, frames) -> None:
    """A fleet's robots prefill their prompts in their own threads (``prefill_prompt``); the batch copies
    them in: the same chunks, on a fresh cache and on a captured step's pooled one. A cache that does not
    hold its prompt is refused."""
    blocks = tiny_policy.images.encode(frames)
    prompts = [action_prompt(tiny_policy.text, blocks, task, tiny_policy.config.action_prompt)
               for task in ('put the bowl on the plate and then put the cup in the sink', 'stack', 'open it')]
    engine = tiny_policy.engine
    together = [c.tokens for c in engine_chunks_batched(engine, prompts, 10, min_actions=10)]
    caches = [prefill_prompt(engine, p) for p in prompts]
    apart = engine_chunks_batched(engine, prompts, 10, min_actions=10, prefilled=caches)
    assert [c.tokens for c in apart] == together
    captured = DecodeEngine(tiny_policy.lm)
    captured.capture('compile', backend='eager')
    for _ in range(2):  # the second call on the pooled cache the first one left
        out = engine_chunks_batched(captured, prompts[::-1], 10, min_actions=10, prefilled=caches[::-1])
        assert [c.tokens for c in out] == together[::-1]
    with pytest.raises(ValueError, match='its prompt has'):
        engine_chunks_batched(engine, prompts[:2], 10, prefilled=caches[1::-1])
    with pytest.raises(ValueError, match='2 prefilled caches for 3 prompts'):
        engine_chunks_batched(engine, prompts, 10, prefilled=caches[:2])


def test_a_recording_waits_for_shared_work_and_new_shared_work_waits_for_it() -> None:
    """The guard between a CUDA graph's recording and a fleet's robots' own device work: the recording starts
    only when the work in flight ends, and work asked for while the recording waits or runs starts after it."""
    guard = RecordingGuard()
    log: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def first() -> None:
        with guard.shared():
            log.append('first in')
            first_in.set()
            release_first.wait(10)
            log.append('first out')

    def record() -> None:
        with guard.exclusive():
            log.append('recording')

    def second() -> None:
        with guard.shared():
            log.append('second in')

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert first_in.wait(10)
    threads.append(threading.Thread(target=record))
    threads[1].start()
    while not guard._waiting:  # the recording is waiting for the first
        threading.Event().wait(0.001)
    threads.append(threading.Thread(target=second))
    threads[2].start()
    threading.Event().wait(0.2)
    assert log == ['first in']  # neither the recording nor the later work started
    release_first.set()
    for t in threads:
        t.join(10)
    assert log == ['first in', 'first out', 'recording', 'second in']


def test_a_robots_prepare_waits_while_a_graph_records(tiny_policy, frames) -> None:
    done = threading.Event()
    with tiny_policy.engine.recording.exclusive():
        worker = threading.Thread(target=lambda: (tiny_policy.prepare_chunk(frames, 'stack'), done.set()))
        worker.start()
        assert not done.wait(1.0)  # a prepare takes ~0.1 s here: it is held back
    assert done.wait(30)
    worker.join()


def test_a_captured_decode_step_gives_the_same_chunks_on_pooled_caches(tiny_policy, frames) -> None:
    """The captured step (dynamo's capture here; inductor and CUDA graphs are the benchmark's) over caches
    from the pool: K = 5 and 10, prompts of different lengths in one bucket (the longer one's slots are
    stale for the shorter), one past it, two robots in a batch; a NaN left in a pooled cache by a failed call
    does not reach the next."""
    engine = DecodeEngine(tiny_policy.lm)
    engine.capture('compile', backend='eager')
    blocks = tiny_policy.images.encode(frames)
    prompts = [action_prompt(tiny_policy.text, blocks, task, tiny_policy.config.action_prompt)
               for task in ('put the bowl on the plate and then put the cup in the sink', 'stack', 'open the drawer')]
    assert len(prompts[0]) // CACHE_BUCKET != len(prompts[1]) // CACHE_BUCKET  # the first is a bucket of its own
    for k in (5, 10):
        for prompt in prompts:  # the step uncaptured on fresh caches: the release's chunks (the test above)
            alone = engine_chunk_batched(tiny_policy.engine, prompt, k, min_actions=k)
            assert engine_chunk_batched(engine, prompt, k, min_actions=k).tokens == alone.tokens
    assert len(engine._pool) == 4  # (K = 5 or 10) × (two buckets): reused, not one per call
    both = engine_chunks_batched(engine, prompts[1:], 5, min_actions=5)
    assert [c.tokens for c in both] == [engine_chunk_batched(tiny_policy.engine, p, 5, min_actions=5).tokens
                                        for p in prompts[1:]]
    cache = engine.chunk_cache(1, 5, len(prompts[1]))
    with torch.inference_mode():  # a prompt slot the next call masks out, as a failed call leaves it
        cache.prefix.keys[..., -1, :] = float('nan')
        cache.prefix.values[..., -1, :] = float('nan')
    with pytest.raises(NonFiniteLogits):
        engine_chunk_batched(engine, prompts[1], 5, min_actions=5)
    assert engine_chunk_batched(engine, prompts[1], 5, min_actions=5).tokens == both[0].tokens
    assert engine.captured == 'compile' and engine.capture_error is None  # captured throughout, never released


def test_a_capture_that_fails_or_differs_falls_back_to_the_uncaptured_step(tiny_checkpoint, frames) -> None:
    """A compiler that fails on the first call: that call and later ones run uncaptured, the same chunk. A
    captured step that computes something else: the warm-up's check finds it and releases the capture.
    On this CPU 'auto' captures nothing; CUDA graphs are refused without CUDA."""
    policy = load_policy(tiny_checkpoint, device='cpu')
    assert policy.capture_decoding('auto') is None
    with pytest.raises(ValueError, match='CUDA device'):
        policy.capture_decoding('cuda_graph')
    with pytest.raises(ValueError, match="'auto', 'cuda_graph'"):
        policy.capture_decoding('graphs')
    expected = policy.predict(frames, 'stack the blocks').tokens

    def no_compiler(gm, example_inputs):
        raise RuntimeError('no compiler for this device')

    policy.engine.capture('compile', backend=no_compiler)
    assert policy.predict(frames, 'stack the blocks').tokens == expected
    assert policy.engine.captured is None and 'no compiler for this device' in policy.engine.capture_error

    def off_by_a_little(gm, example_inputs):
        def run(*args):
            return [out + 0.5 for out in gm(*args)]
        return run

    policy.engine.capture('compile', backend=off_by_a_little)
    policy.warmup(robots=2)
    assert policy.engine.captured is None and 'other tokens' in policy.engine.capture_error
    policy.engine.capture('compile', backend='eager')
    policy.warmup(robots=2)  # batches of one and two robots recorded, and equal to the uncaptured step
    assert policy.engine.captured == 'compile' and policy.engine.capture_error is None
    assert policy.predict(frames, 'stack the blocks').tokens == expected
    assert policy.capture_decoding('off') is None and not policy.engine._pool


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
