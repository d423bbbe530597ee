"""worldvla_train's cache of VQ codes: the same codes as encoding, never a stale or damaged entry."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from worldvla_ros.train.code_cache import CodeCache


@pytest.fixture
def images(tiny_policy):
    return tiny_policy.images


@pytest.fixture
def clip() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)]


def test_a_second_run_reads_the_codes_it_would_have_encoded(images, clip, tmp_path: Path) -> None:
    first, second = CodeCache(images, tmp_path), CodeCache(images, tmp_path)
    encoded = first.codes(clip)
    assert (first.hits, first.misses) == (0, 1) and len(list(first.dir.glob('*.npy'))) == 1
    read = second.codes(clip)
    assert (second.hits, second.misses) == (1, 0)
    assert np.array_equal(read, encoded) and np.array_equal(encoded, images.encode_codes(clip))
    assert CodeCache(images, tmp_path).codes([]).shape == (0, images.grid, images.grid)


def test_other_pixels_or_another_tokenizer_never_read_an_entry(images, clip, tmp_path: Path) -> None:
    cache = CodeCache(images, tmp_path)
    cache.codes(clip)
    changed = [f.copy() for f in clip]
    changed[2][0, 0, 0] ^= 1  # one bit of one pixel
    cache.codes(changed)
    cache.codes(clip[:4])  # a prefix of the same frames
    assert (cache.hits, cache.misses) == (0, 3)
    other = CodeCache(images, tmp_path)
    with torch.no_grad():
        images.vqgan.quant_conv.bias.add_(1e-3)
    try:
        moved = CodeCache(images, tmp_path)
    finally:
        with torch.no_grad():
            images.vqgan.quant_conv.bias.sub_(1e-3)
    assert moved.dir != other.dir == cache.dir


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'wrong shape', 'out of range', 'wrong dtype'])
def test_a_damaged_entry_is_encoded_again_and_replaced(images, clip, tmp_path: Path, damage: str) -> None:
    truth = CodeCache(images, tmp_path).codes(clip)
    (entry,) = CodeCache(images, tmp_path).dir.glob('*.npy')
    g = images.grid
    if damage == 'garbage':
        entry.write_bytes(os.urandom(100))
    elif damage == 'truncated':
        entry.write_bytes(entry.read_bytes()[:-7])
    elif damage == 'wrong shape':
        np.save(entry, np.zeros((len(clip) + 1, g, g), np.uint16))
    elif damage == 'out of range':
        np.save(entry, np.full((len(clip), g, g), 60000, np.uint16))
    else:
        np.save(entry, truth.astype(np.float64))
    cache = CodeCache(images, tmp_path)
    assert np.array_equal(cache.codes(clip), truth) and cache.misses == 1
    again = CodeCache(images, tmp_path)
    assert np.array_equal(again.codes(clip), truth) and again.hits == 1  # the entry was replaced


def test_no_cache_or_an_unwritable_one_still_gives_the_codes(images, clip, tmp_path: Path) -> None:
    off = CodeCache(images, None)
    assert np.array_equal(off.codes(clip), images.encode_codes(clip)) and off.dir is None
    root = tmp_path / 'cache'
    root.write_text('a file where the cache directory should be')  # mkdir fails, as on a read-only disk
    blocked = CodeCache(images, root)
    assert np.array_equal(blocked.codes(clip), images.encode_codes(clip))
    assert blocked.write_errors == 1 and root.read_text().startswith('a file')
