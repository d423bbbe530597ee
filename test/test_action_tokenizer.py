"""Action tokenizer: ids of worked examples (spec §4) and the round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest

from worldvla_ros.model import ActionTokenizer
from worldvla_ros.model import tokens as T


@pytest.fixture
def tok() -> ActionTokenizer:
    return ActionTokenizer()


def test_worked_examples(tok: ActionTokenizer) -> None:
    # zero motion: x = 2(0 - min)/(max - min + 1e-8) - 1; position dims sit at x ≈ 0 → bin 128;
    # roll: x = 2·0.32571429/0.70071429 - 1 = -0.0703 → bin 119; gripper -1 → bin 1.
    # Gripper +1: the 1e-8 of the release's formula leaves x = 1 - 5e-9 < 1 → bin 255, not 256.
    ids = tok.encode(np.array([[0, 0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0, 1]]))
    assert ids.tolist() == [
        10004, 10133, 10133, 10133, 10124, 10133, 10133, 10006, 15004,
        10004, 10133, 10133, 10133, 10124, 10133, 10133, 10260, 15004,
    ]
    # the range's minimum maps to the first bin, its maximum (by the 1e-8) to the one before last
    assert tok.encode_values(np.array([tok.action_min])).tolist() == [[10006] * 7]
    assert tok.encode_values(np.array([tok.action_max])).tolist() == [[10260] * 7]
    # out-of-range actions are clipped to ±1 (max → last bin 10261), not wrapped
    assert tok.encode_values(np.array([[5, -5, 5, 5, -5, 5, 5]])).tolist() == [
        [10261, 10006, 10261, 10261, 10006, 10261, 10261]
    ]


def test_decode_worked_examples(tok: ActionTokenizer) -> None:
    # token 10006 → first of 255 bin centers of linspace(-1, 1, 256): -1 + 1/255
    first = tok.decode_values(np.full((1, 7), 10006))[0]
    x = -1 + 1 / 255
    np.testing.assert_allclose(first, (x + 1) / 2 * (tok.action_max - tok.action_min + 1e-8) + tok.action_min)
    # 10261 is clipped to the last center, +1 - 1/255, like 10260
    np.testing.assert_allclose(tok.decode_values(np.full((1, 7), 10261)), tok.decode_values(np.full((1, 7), 10260)))
    assert tok.decode_values(np.full((1, 7), 10260))[0, 6] == pytest.approx(1 - 1 / 255)


def test_round_trip_within_half_a_bin(tok: ActionTokenizer) -> None:
    rng = np.random.default_rng(0)
    actions = rng.uniform(tok.action_min, tok.action_max, size=(500, 7))
    back = tok.decode(tok.encode(actions))
    half_bin = (tok.action_max - tok.action_min) / 255 / 2
    assert back.shape == (500, 7)
    assert np.all(np.abs(back - actions) <= half_bin + 1e-9)
    # decode(encode(decode(ids))) is a fixed point
    ids = tok.encode(back)
    np.testing.assert_array_equal(tok.encode(tok.decode(ids)), ids)


def test_block_layout(tok: ActionTokenizer) -> None:
    ids = tok.encode(np.zeros((10, 7)))
    assert len(ids) == 10 * T.TOKENS_PER_ACTION
    blocks = ids.reshape(10, 9)
    assert np.all(blocks[:, 0] == T.ACTION_START) and np.all(blocks[:, -1] == T.ACTION_END)
    assert np.all((blocks[:, 1:-1] >= T.ACTION_BIN_FIRST) & (blocks[:, 1:-1] <= T.ACTION_BIN_LAST))


def test_decode_skips_incomplete_blocks(tok: ActionTokenizer) -> None:
    ids = [*tok.encode(np.zeros((2, 7))), T.ACTION_START, 10100, 10100]  # third block unfinished
    assert tok.decode(ids).shape == (2, 7)
    assert tok.decode([T.END_OF_TURN]).shape == (0, 7)


def test_bad_input(tok: ActionTokenizer) -> None:
    with pytest.raises(ValueError, match=r'\(K, 7\)'):
        tok.encode(np.zeros((2, 6)))
    with pytest.raises(ValueError, match='NaN'):
        tok.encode(np.array([[np.nan] * 7]))
    with pytest.raises(ValueError):
        ActionTokenizer(action_min=[0] * 7, action_max=[0] * 7)


@pytest.mark.parametrize('bound', [1.3e308, math.inf, 101.0])
def test_action_ranges_beyond_any_physical_motion_are_refused(bound: float) -> None:
    """A checkpoint's (or a fine-tune's) action ranges stay finite and within ±100 units: a range of ±1e308
    decodes every bin to a non-physical command."""
    from worldvla_ros.model.config import WorldVLAConfig

    lo, hi = [-0.9375] * 6 + [-1.0], [0.9375] * 6 + [1.0]
    lo[0], hi[0] = -bound, bound
    with pytest.raises(ValueError, match='action'):
        ActionTokenizer(lo, hi)
    with pytest.raises(ValueError, match='within'):
        WorldVLAConfig(action_min=tuple(lo), action_max=tuple(hi))
    hi[0] = lo[0] = 0.5  # an empty range
    with pytest.raises(ValueError, match='exceed'):
        WorldVLAConfig(action_min=tuple(lo), action_max=tuple(hi))
