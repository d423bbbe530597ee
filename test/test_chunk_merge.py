"""Merging overlapping chunks: newest wins, and ACT temporal ensembling, by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from worldvla_ros.chunk_merge import ensemble_steps, merge_chunk
from worldvla_ros.evaluation.scoring import ChunkRecord, RunRecord, action_scores, executed_from_chunks


def col(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)[:, None]


def test_replace_keeps_only_the_new_chunk() -> None:
    out, counts = merge_chunk(col(1, 2), np.array([1, 1]), col(5, 6, 7), 'replace', 0.01)
    assert out[:, 0].tolist() == [5, 6, 7] and counts.tolist() == [1, 1, 1]


def test_ensemble_by_hand() -> None:
    # equal weights (decay 0): the mean of the overlapping predictions; the rest as they are
    out, counts = merge_chunk(col(1, 2, 3), np.array([1, 1, 1]), col(4, 5, 6, 7), 'ensemble', 0.0)
    assert out[:, 0].tolist() == [2.5, 3.5, 4.5, 7.0] and counts.tolist() == [2, 2, 2, 1]
    # decay ln 2: the second prediction of a step weighs 1/2, the third 1/4
    d = math.log(2)
    out, counts = merge_chunk(col(1, 8), np.array([1, 1]), col(4, 2), 'ensemble', d)
    assert out[:, 0] == pytest.approx([(1 * 1 + 0.5 * 4) / 1.5, (8 + 0.5 * 2) / 1.5])
    out, counts = merge_chunk(out, counts, col(10), 'ensemble', d)
    assert out[0, 0] == pytest.approx((1 * 1 + 0.5 * 4 + 0.25 * 10) / 1.75) and counts.tolist() == [3, 2]
    # a longer queue than the new chunk keeps its tail
    out, _ = merge_chunk(col(1, 2, 3), np.array([1, 1, 1]), col(3), 'ensemble', 0.0)
    assert out[:, 0].tolist() == [2.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        merge_chunk(col(1), np.array([1]), col(2), 'average', 0.0)


def test_the_node_merge_step_by_step_equals_the_offline_ensemble() -> None:
    rng = np.random.default_rng(0)
    chunks = [(s, rng.uniform(-1, 1, (5, 7))) for s in (0, 2, 3, 6)]  # chunk start steps, overlapping
    decay = 0.3
    offline = {t: a for t, a, _ in ensemble_steps(chunks, 12, decay)}
    queue, counts, executed, step = np.zeros((0, 7)), np.zeros(0, int), {}, 0
    for start, actions in chunks:
        while step < start:  # execute the queue up to the new chunk's first step
            executed[step], queue, counts = queue[0], queue[1:], counts[1:]
            step += 1
        queue, counts = merge_chunk(queue, counts, actions, 'ensemble', decay)
    for a in queue:
        executed[step] = a
        step += 1
    assert executed.keys() == offline.keys()
    for t in offline:
        assert executed[t] == pytest.approx(offline[t])


def test_lockstep_execution_and_seam_jerk_for_each_merge() -> None:
    # a chunk every 2 frames, 4 actions each: replace runs 2 of each, ensemble averages the overlap
    chunks = [ChunkRecord(f, np.full((4, 7), float(f)), np.zeros((4, 7)), 0.0) for f in (0, 2, 4)]
    replaced = executed_from_chunks(chunks, 8, 'replace')
    assert [(e.gt_index, e.action[0], e.seam) for e in replaced] == [
        (0, 0, False), (1, 0, False), (2, 2, True), (3, 2, False), (4, 4, True), (5, 4, False), (6, 4, False),
        (7, 4, False)]
    ensembled = executed_from_chunks(chunks, 8, 'ensemble', decay=0.0)
    assert [e.action[0] for e in ensembled] == [0, 0, 1, 1, 3, 3, 4, 4]
    assert [e.seam for e in ensembled] == [False, False, True, False, True, False, False, False]
    gt = np.zeros((8, 7))
    jerk = {}
    for merge, executed in (('replace', replaced), ('ensemble', ensembled)):
        run = RunRecord('x', 'lockstep', gt, chunks=chunks, executed=executed)
        phys = action_scores([run], action_scale=[1.0] * 7, control_rate_hz=1.0)['physical']
        jerk[merge] = phys['jerk_at_seams']['dx']
    # second differences of the windows touching a seam: replace 0,0,2,2,4,4 → |2|, |−2|, |2|, |−2|;
    # ensemble 0,0,1,1,3,3 → |1|, |−1|, |2|, |−2|
    assert jerk == {'replace': pytest.approx(2.0), 'ensemble': pytest.approx(1.5)}
