"""VQ codes of training frames kept on disk between runs, so a run that reuses an image tokenizer skips encoding.

Each entry is named by a digest of the tokenizer (its weights and settings) and of the frames' pixels, so a
changed bag, another tokenizer or another model resolution never reads a stale entry. Entries are written to a
temporary file and renamed into place (two runs may share the cache); one that does not read back as a code
grid of the expected shape and range is encoded again and replaced.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from worldvla_ros.model.image_tokenizer import ImageTokenizer

ENCODE_BATCH = 64


def default_cache_dir() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'worldvla' / 'codes'


def tokenizer_digest(images: ImageTokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f'{images.resolution}:{images.rotate_180}:{images.grid};'.encode())
    for name, tensor in sorted(images.vqgan.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class CodeCache:
    """``codes(frames)`` → (N, grid, grid) VQ codes, from ``root`` when these frames were encoded before by this
    tokenizer. ``root`` None: no cache, every call encodes. ``hits`` / ``misses`` count the calls, ``write_errors``
    the entries that could not be stored."""

    def __init__(self, images: ImageTokenizer, root: Path | None) -> None:
        self.images = images
        self.dir = None if root is None else Path(root) / tokenizer_digest(images)
        self.hits = self.misses = self.write_errors = 0

    def codes(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        if self.dir is None:
            self.misses += 1
            return self._encode(frames)
        h = hashlib.blake2b(digest_size=16)
        for f in frames:
            f = np.ascontiguousarray(f)
            h.update(f'{f.shape}{f.dtype};'.encode())
            h.update(f.data)
        path = self.dir / f'{h.hexdigest()}.npy'
        codes = self._read(path, len(frames))
        if codes is not None:
            self.hits += 1
            return codes
        self.misses += 1
        codes = self._encode(frames)
        self._write(path, codes)
        return codes

    def _encode(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        g = self.images.grid
        parts = [self.images.encode_codes(frames[i : i + ENCODE_BATCH]) for i in range(0, len(frames), ENCODE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, g, g), np.int64)

    def _read(self, path: Path, n: int) -> np.ndarray | None:
        g, codes_in_use = self.images.grid, self.images.vqgan.cfg.n_embed
        try:
            codes = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if codes.shape != (n, g, g) or codes.dtype != np.uint16 or (codes.size and codes.max() >= codes_in_use):
            return None
        return codes.astype(np.int64)

    def _write(self, path: Path, codes: np.ndarray) -> None:
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix='.tmp')
            with os.fdopen(fd, 'wb') as f:
                np.save(f, codes.astype(np.uint16), allow_pickle=False)
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk costs the next run an encode, not this run its training
            self.write_errors += 1
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
