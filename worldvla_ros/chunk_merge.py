"""Combining a new action chunk with the actions still queued from earlier ones.

``replace``: the newest chunk wins (the queue is dropped). ``ensemble``: ACT's temporal
ensembling (Zhao et al. 2023): every time step executes the weighted mean of all predictions made
for it, weights exp(−decay·i) with i = 0 the oldest prediction, so older predictions weigh more
and a new chunk bends the motion gradually instead of jumping to it.
"""
from __future__ import annotations

import numpy as np

MERGES = ('replace', 'ensemble')


def merge_chunk(queued: np.ndarray, counts: np.ndarray, new: np.ndarray, mode: str,
                decay: float) -> tuple[np.ndarray, np.ndarray]:
    """(actions to execute from the next period on, predictions blended into each).

    ``queued`` (m, D) are the actions not yet executed, ``counts`` (m,) how many predictions each
    already averages; ``new`` (k, D) the new chunk, its first action for the next period.
    """
    if mode not in MERGES:
        raise ValueError(f'chunk merge must be one of {MERGES}, got {mode!r}')
    new = np.asarray(new, dtype=np.float64)
    m, k = len(queued), len(new)
    if mode == 'replace' or m == 0:
        return new.copy(), np.ones(k, dtype=np.int64)
    queued = np.asarray(queued, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    both = min(m, k)
    # the older predictions' weights sum to Σ_{i<n} exp(−decay·i); the new one is the n-th
    older = np.array([np.exp(-decay * np.arange(n)).sum() for n in counts[:both]])
    w_new = np.exp(-decay * counts[:both])
    blended = (older[:, None] * queued[:both] + w_new[:, None] * new[:both]) / (older + w_new)[:, None]
    out = np.concatenate([blended, queued[both:], new[both:]])
    out_counts = np.concatenate([counts[:both] + 1, counts[both:], np.ones(k - both, dtype=np.int64)])
    return out, out_counts


def ensemble_steps(chunks: list[tuple[int, np.ndarray]], n_steps: int,
                   decay: float) -> list[tuple[int, np.ndarray, bool]]:
    """Offline: (step, executed action, seam) for chunks given as (first step, actions), oldest first;
    a seam is the first step of every chunk after the first."""
    starts = {start for start, _ in chunks[1:]}
    out = []
    for t in range(n_steps):
        preds = [a[t - s] for s, a in chunks if s <= t < s + len(a)]
        if preds:
            w = np.exp(-decay * np.arange(len(preds)))
            out.append((t, (w[:, None] * np.asarray(preds)).sum(0) / w.sum(), t in starts))
    return out
