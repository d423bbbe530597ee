"""The action attention mask against the rule of spec §6, on hand-built and random sequences."""
from __future__ import annotations

import numpy as np
import torch

from worldvla_ros.model import action_attention_mask
from worldvla_ros.model import tokens as T

IMG = [T.IMAGE_START, 8812, 8812, 100, 101, T.IMAGE_NEWLINE, T.IMAGE_END]


def act(v: int) -> list[int]:
    return [T.ACTION_START, *([v] * 7), T.ACTION_END]


def reference_mask(ids: list[int]) -> np.ndarray:
    """The rule written plainly, one position at a time."""
    n = len(ids)
    block = [0] * n  # action block number, 0 outside blocks
    start_of = [-1] * n
    current, open_block, start = 0, False, -1
    for i, t in enumerate(ids):
        if t == T.ACTION_START:
            current += 1
            open_block, start = True, i
        if open_block:
            block[i], start_of[i] = current, start
        if t == T.ACTION_END:
            open_block = False
    image_ends = [i for i, t in enumerate(ids) if t == T.IMAGE_END]
    last_image_end = image_ends[-1] if image_ends else -1
    allowed = np.zeros((n, n), dtype=bool)
    for q in range(n):
        for k in range(q + 1):
            blocked = block[q] and start_of[q] > last_image_end and block[k] and block[k] != block[q]
            allowed[q, k] = not blocked
    return allowed


def test_action_chunk_sequence() -> None:
    prompt = [T.BOS, 500, 501, *IMG, T.END_OF_TURN]
    p = len(prompt)
    ids = prompt + act(10100) + act(10200) + [T.ACTION_START, 10150]  # third block unfinished
    m = action_attention_mask(torch.tensor([ids]))[0].numpy()
    assert m.shape == (len(ids), len(ids))
    a0, a1, a2 = range(p, p + 9), range(p + 9, p + 18), range(p + 18, p + 20)
    for q in [*a0, *a1, *a2]:
        assert m[q, :p].all()  # BOS, text, image, end of turn
        assert not m[q, q + 1 :].any()  # still causal
    for q in a1:
        assert not m[q, a0.start : a0.stop].any()
        assert m[q, a1.start : q + 1].all()
    for q in a2:
        assert not m[q, a0.start : a1.stop].any()
        assert m[q, a2.start : q + 1].all()
    # the prompt itself is plainly causal
    assert np.array_equal(m[:p, :p], np.tril(np.ones((p, p), dtype=bool)))


def test_world_model_sequence_is_causal() -> None:
    ids = [T.BOS, 600, *IMG, *act(10100), T.END_OF_TURN, *IMG, T.END_OF_TURN]
    m = action_attention_mask(torch.tensor([ids]))[0].numpy()
    assert np.array_equal(m, np.tril(np.ones((len(ids), len(ids)), dtype=bool)))


def test_actions_before_the_last_image_are_still_hidden_from_chunk_actions() -> None:
    ids = [T.BOS, *IMG, *act(10100), *IMG, T.END_OF_TURN, *act(10120), *act(10130)]
    m = action_attention_mask(torch.tensor([ids]))[0].numpy()
    first = ids.index(T.ACTION_START)
    chunk = len(ids) - 18
    assert not m[chunk : chunk + 9, first : first + 9].any()
    assert not m[chunk + 9 :, first : first + 9].any()
    # the first action (before the last image) is not restricted
    assert m[first + 8, first : first + 9].all()
    np.testing.assert_array_equal(m, reference_mask(ids))


def test_matches_reference_on_random_sequences() -> None:
    rng = np.random.default_rng(0)
    pieces = [IMG, act(10101), act(10202), [T.ACTION_START, 10111], [T.END_OF_TURN], [700, 701]]
    batch = []
    for _ in range(8):
        ids = [T.BOS]
        while len(ids) < 60:
            ids += pieces[rng.integers(len(pieces))]
        batch.append(ids[:60])
    m = action_attention_mask(torch.tensor(batch)).numpy()
    for row, ids in enumerate(batch):
        np.testing.assert_array_equal(m[row], reference_mask(ids))
