"""The user's bags as fine-tuning data: read as ``evaluate_bag`` reads them, checked, action
statistics for the new tokenizer ranges, and frames encoded once by the checkpoint's frozen VQGAN
into a token cache that later runs reuse.

Cache entries are keyed by the bag's files (names, sizes, modification times), the reading
options, the image tokenizer (VQGAN weights, resolution, rotation) and the text vocabulary: any
change there makes a new entry; an unchanged bag is never decoded or encoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from worldvla_ros.evaluation.bag_io import BagError
from worldvla_ros.evaluation.episode import TopicMap, read_episode
from worldvla_ros.model import tokens as T
from worldvla_ros.model.action_tokenizer import MAX_ACTION_UNITS
from worldvla_ros.model.prompts import check_instruction


class DataError(ValueError):
    """Training data that cannot be used as given (exit status 2)."""


@dataclass
class TokenizedEpisode:
    name: str
    instruction: str
    blocks: np.ndarray  # (N, block_length) image token blocks, one per frame
    actions: np.ndarray  # (N, 7) recorded action per frame (leading/trailing frames without one dropped)
    trimmed: int = 0  # frames dropped at the ends for having no recorded action


def bag_paths(given: Sequence[str | Path]) -> list[Path]:
    """Bags named directly, or every bag (a directory with metadata.yaml) inside a named directory."""
    out: list[Path] = []
    for g in map(Path, given):
        if (g / 'metadata.yaml').is_file() or g.suffix == '.mcap':
            out.append(g)
        elif g.is_dir():
            found = sorted(p for p in g.iterdir() if (p / 'metadata.yaml').is_file())
            if not found:
                raise DataError(f'{g}: neither a rosbag2 bag nor a directory of bags')
            out += found
        else:
            raise DataError(f'{g}: no such bag or directory')
    names = [p.resolve() for p in out]
    if len(set(names)) != len(names):
        raise DataError('a bag is named twice')
    return out


def world_only_bag_paths(given: Sequence[str | Path], training: Sequence[Path], named_as: str) -> list[Path]:
    """The ``--world-only-data`` bags (``bag_paths``); one that is also a training bag (``named_as``) is an error."""
    bags = bag_paths(given) if given else []
    overlap = {p.resolve() for p in bags} & {p.resolve() for p in training}
    if overlap:
        raise DataError(f'bags given both as --world-only-data and as {named_as}: {sorted(map(str, overlap))}')
    return bags


def _fingerprint(bag: Path) -> list[tuple[str, int, int]]:
    files = [bag] if bag.is_file() else sorted(p for p in bag.rglob('*') if p.is_file())
    return [(str(p.relative_to(bag.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def inputs_digest(files: object, bags: Sequence[Path]) -> dict[str, str]:
    """What a run starts from, named by digests: the initial checkpoint (its config, weight and tokenizer files by
    name, size and modification time) and the data (every bag's files alike). A resume compares them."""
    ckpt = [files.config, *files.weights, files.text_tokenizer, files.vqgan_yaml, files.vqgan_ckpt]
    described = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt]
    data = [(str(b.resolve()), _fingerprint(b)) for b in bags]
    digest = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]  # noqa: E731
    return {'initial checkpoint': digest(described), 'data': digest(data)}


def tokenizer_key(vqgan_ckpt: Path, resolution: int, rotate_180: bool, vocab: dict[str, int]) -> str:
    h = hashlib.sha256()
    with open(vqgan_ckpt, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    h.update(json.dumps([resolution, rotate_180, sorted(vocab.items())]).encode())
    return h.hexdigest()[:20]


def _frames(index: np.ndarray) -> str:
    return f'{index[:10].tolist()}{" …" if len(index) > 10 else ""}'


def check_actions(name: str, actions: np.ndarray, source: str = '',
                  max_units: float = MAX_ACTION_UNITS) -> tuple[np.ndarray, int, int]:
    """Drop frames at either end that have no recorded action; (actions, first kept, dropped). Any other
    missing or non-finite action, and any beyond ``max_units`` action units (no robot moves so far in one
    period: a broken recording), is an error naming the bag, the topic (``source``) and the frames."""
    where = f'{name}{f" ({source})" if source else ""}'
    have = np.isfinite(actions).all(1)
    if not have.any():
        raise DataError(f'{where}: no frame has a finite recorded action')
    first, last = int(np.argmax(have)), len(have) - int(np.argmax(have[::-1]))
    inner = actions[first:last]
    bad = np.flatnonzero(~np.isfinite(inner).all(1))
    if len(bad):
        raise DataError(f'{where}: NaN or infinite actions at frames {_frames(bad + first)} '
                        '(between frames that have actions)')
    huge = np.flatnonzero((np.abs(inner) > max_units).any(1))
    if len(huge):
        raise DataError(f'{where}: actions beyond ±{max_units:g} action units at frames {_frames(huge + first)} '
                        f'(e.g. {inner[huge[0]].tolist()}): not a physical motion in one control period')
    return inner, first, len(actions) - len(inner)


def load_episodes(bags: Sequence[Path], topics: TopicMap, action_scale: Sequence[float] | None,
                  encode: Callable[[list[np.ndarray]], list[list[int]]], tok_key: str, cache_dir: Path | None,
                  min_frames: int, progress: Callable[[str], None] | None = None,
                  frame_size: int | None = None, max_instruction_chars: int = 0) -> list[TokenizedEpisode]:
    """Every bag read, checked and encoded (or taken from the cache); ``frame_size``: frames are kept only as
    the model's crop at that resolution while a bag is read (``read_episode``)."""
    episodes = []
    options = json.dumps(asdict(topics), sort_keys=True) + json.dumps(list(action_scale or []))
    for bag in bags:
        key = hashlib.sha256(json.dumps([_fingerprint(bag), options, tok_key]).encode()).hexdigest()[:24]
        cached = cache_dir / f'{bag.name}-{key}.npz' if cache_dir else None
        if cached is not None and cached.is_file():
            with np.load(cached, allow_pickle=False) as z:
                ep = TokenizedEpisode(str(z['name']), str(z['instruction']), z['blocks'], z['actions'],
                                      int(z['trimmed']))
        else:
            try:
                raw = read_episode(bag, topics, action_scale, frame_size=frame_size)
            except BagError as exc:
                raise DataError(str(exc)) from exc
            actions, first, trimmed = check_actions(bag.name, raw.actions, raw.action_source)
            frames = raw.frames[first : first + len(actions)]
            if len(frames) < min_frames:
                raise DataError(f'{bag.name}: {len(frames)} frames with actions; the checkpoint needs at least '
                                f'{min_frames} (its history frames + 1)')
            blocks = np.asarray([b for i in range(0, len(frames), 32) for b in encode(frames[i : i + 32])],
                                dtype=np.int32)
            ep = TokenizedEpisode(bag.name, raw.instruction, blocks, actions, trimmed)
            if cached is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f'.{os.getpid()}.tmp.npz')
                np.savez(tmp, name=ep.name, instruction=ep.instruction, blocks=ep.blocks, actions=ep.actions,
                         trimmed=ep.trimmed)
                tmp.replace(cached)  # whole or not at all: a killed run leaves no half entry
        if max_instruction_chars:  # cached or not: the limit is the checkpoint's, not the cache's
            try:
                ep.instruction = check_instruction(ep.instruction, max_instruction_chars)
            except ValueError as exc:
                raise DataError(f'{bag.name}: the model refuses its instruction: {exc} (give another with '
                                '--instruction)') from exc
        if progress:
            progress(bag.name)
        episodes.append(ep)
    return episodes


def action_ranges(episodes: Sequence[TokenizedEpisode], method: str, gripper: tuple[float, float],
                  quantile: float = 0.01) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-dimension ranges of the six motion dimensions from the training data (``quantile``: the
    release's 1st/99th percentiles; ``minmax``: the extremes); the gripper keeps its ±1 range."""
    actions = np.concatenate([e.actions for e in episodes])[:, :6]
    if method == 'quantile':
        lo, hi = np.quantile(actions, quantile, axis=0), np.quantile(actions, 1 - quantile, axis=0)
    elif method == 'minmax':
        lo, hi = actions.min(0), actions.max(0)
    else:
        raise ValueError(f'action statistics {method!r}: quantile or minmax')
    flat = hi - lo < 1e-6  # a dimension the robot never moved: a small symmetric range around it
    lo, hi = np.where(flat, lo - 1e-3, lo), np.where(flat, hi + 1e-3, hi)
    lo, hi = np.clip(lo, -MAX_ACTION_UNITS, MAX_ACTION_UNITS), np.clip(hi, -MAX_ACTION_UNITS, MAX_ACTION_UNITS)
    return (*map(float, lo), gripper[0]), (*map(float, hi), gripper[1])


def ranges_table(old_min: Sequence[float], old_max: Sequence[float], new_min: Sequence[float],
                 new_max: Sequence[float]) -> str:
    dims = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
    rows = [f'{"":8}{"checkpoint":>24}{"your data":>24}']
    for d, a, b, c, e in zip(dims, old_min, old_max, new_min, new_max, strict=True):
        rows.append(f'{d:8}{f"[{a:+.4f}, {b:+.4f}]":>24}{f"[{c:+.4f}, {e:+.4f}]":>24}')
    return '\n'.join(rows)


def block_length_ok(episodes: Sequence[TokenizedEpisode]) -> None:
    lengths = {e.blocks.shape[1] for e in episodes if len(e.blocks)}
    if len(lengths) > 1:
        raise DataError(f'image blocks of different lengths {sorted(lengths)}: one tokenizer per run')
    if any(e.actions.shape[1] != T.ACTION_DIMS for e in episodes):
        raise DataError('actions must have 7 dimensions')
