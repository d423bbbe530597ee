"""Chunk merging in the real action node: the commands on the topic are the controller's blend.

A 2 Hz node of its own: a chunk of five commands lasts 2.5 s, so even a starved CI machine's inference lands
while commands of the previous chunk are still queued (at 10 Hz, 0.5 s, it sometimes did not).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import task_action_graph
from worldvla.action import RunInstruction

from worldvla_ros.chunk_merge import merge_chunk
from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN

pytestmark = pytest.mark.ros
ACTION = 'worldvla_action'
TASK = 'put the red block in the bowl'
Outcome = RunInstruction.Result


@pytest.fixture(scope='module')
def slow_task_graph(fixed_chunk_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with task_action_graph(fixed_chunk_checkpoint, tmp_path_factory.mktemp('logs'),
                           {'control_rate_hz': '2.0', 'watchdog_timeout': '5.0', 'replan_threshold': '-1'}) as g:
        yield g


def test_ensemble_merge_blends_the_queued_actions_into_the_new_chunk(slow_task_graph) -> None:
    """chunk_merge ensemble in the node, replanning on every new frame: every chunk's commands are
    ``merge_chunk`` of the previous chunk's commands not yet sent (counted on the command topic) and the new
    prediction, with the blend counts carried from chunk to chunk."""
    h, goals, _node = slow_task_graph
    decay = 0.5
    assert h.set_parameters(ACTION, {'chunk_merge': 'ensemble', 'ensemble_decay': decay, 'replan_threshold': -1}
                            ).successful
    assert not h.set_parameter(ACTION, 'chunk_merge', 'average').successful
    try:
        with h.lock:
            first = len(h.chunks)
        handle, _ = goals.send(TASK)  # the goal empties the queue: its first chunk blends nothing
        checked: set[int] = set()
        seen: dict[str, object] = {}
        rng = np.random.default_rng(0)

        def check() -> bool:
            h.camera.gripper = rng.uniform(0.1, 0.9, 3)  # a moving scene: predictions differ from chunk to chunk
            chunks = [c for c in h.chunks[first:] if c.instruction == TASK]
            sent: dict[int, int] = {}
            for _, m in h.commands:
                if not m.hold:
                    sent[m.chunk_sequence] = sent.get(m.chunk_sequence, 0) + 1
            counts = np.ones(len(chunks[0].commands), dtype=np.int64) if chunks else None
            # the last pair is left out: while a newer chunk is awaited, commands of its predecessor may be in flight
            seen.update(chunks=len(chunks), sequences=[c.sequence for c in chunks][-12:],
                        sent=list(sent.items())[-12:])
            for prev, new, _later in zip(chunks, chunks[1:], chunks[2:], strict=False):
                if new.sequence != prev.sequence + 1:
                    return False
                left = sent.get(prev.sequence, 0)
                queued = np.array([c.action for c in prev.commands[left:]]).reshape(-1, 7)
                safe = np.clip(np.asarray(new.raw_actions).reshape(-1, 7), LIBERO_ACTION_MIN, LIBERO_ACTION_MAX)
                expected, counts = merge_chunk(queued, counts[left:], safe, 'ensemble', decay)
                got = np.array([c.action for c in new.commands])
                assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-6), (left, got, expected)
                if len(queued) and not np.allclose(got[: len(queued)], safe[: len(queued)]):
                    checked.add(new.sequence)  # a blend that changed the new chunk
            return len(checked) >= 3

        assert h.wait_for(check, 120), f'fewer than 3 chunks arrived while commands were queued: {seen}'
        goals.cancel(handle)
        assert goals.result(handle)[0].outcome == Outcome.CANCELED
    finally:
        assert h.set_parameters(ACTION, {'chunk_merge': 'replace', 'ensemble_decay': 0.01}).successful
