"""The RunInstruction task action: real action node process, real action client, real commands.

Each goal's end is checked where it matters, on the command topic: after a goal ends for any
reason the next command is a hold, and no command of an ended or preempted task goes out.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from harness import Harness, task_action_graph, wait_until
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from worldvla.action import RunInstruction
from worldvla.msg import EndEffectorCommand

from worldvla_ros.nodes.common import latched_qos

pytestmark = pytest.mark.ros
ACTION = 'worldvla_action'
RATE = 10.0
PERIOD = 1.0 / RATE
TASK = 'put the red block in the bowl'
Outcome = RunInstruction.Result


@pytest.fixture(scope='module')
def task_graph(fixed_chunk_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with task_action_graph(fixed_chunk_checkpoint, tmp_path_factory.mktemp('logs'), {'replan_threshold': '1'}) as g:
        yield g


def _commands(h: Harness, after: float, before: float = math.inf) -> list[tuple[float, EndEffectorCommand]]:
    with h.lock:
        return [(t, m) for t, m in h.commands if after < t < before]


def _motion(h: Harness, after: float, before: float = math.inf) -> list[EndEffectorCommand]:
    return [m for _, m in _commands(h, after, before) if not m.hold]


def _first_command_after(h: Harness, t: float, timeout: float = 5.0) -> tuple[float, EndEffectorCommand]:
    assert wait_until(lambda: bool(_commands(h, t)), timeout), 'no command after the goal ended'
    return _commands(h, t)[0]


def test_a_goal_runs_to_its_step_limit_with_feedback_then_holds(task_graph) -> None:
    h, goals, _node = task_graph
    handle, accepted = goals.send(TASK, max_steps=7)
    assert handle.accepted
    result, status, ended = goals.result(handle)
    assert status == GoalStatus.STATUS_ABORTED and result.outcome == Outcome.STEP_LIMIT, result
    assert result.steps == 7 and result.duration > 0
    h.wait_for(lambda: False, 1.0)
    sent = [m for _, m in _commands(h, accepted)]
    moving = [i for i, m in enumerate(sent) if not m.hold]
    assert len(moving) == 7, [m.hold for m in sent]
    assert moving[-1] + 1 < len(sent) and sent[moving[-1] + 1].hold  # the seventh motion is followed by a hold
    assert not _motion(h, ended), 'motion after the goal ended'
    with h.lock:
        fb = list(goals.feedback)
    assert fb and fb[-1].chunks >= 2 and 0 < fb[-1].commands_sent <= 7, fb[-1:]
    assert math.isfinite(fb[-1].last_inference_latency) and fb[-1].last_inference_latency > 0
    assert math.isnan(fb[-1].surprise_psnr)  # no world-model node in this graph
    assert h.wait_for(lambda: h.counter(ACTION, 'goals_step_limit') == 1, 5, frames=False)


def test_cancel_holds_on_the_next_command_within_one_period(task_graph) -> None:
    h, goals, node = task_graph
    handle, accepted = goals.send(TASK)
    assert handle.accepted
    assert h.wait_for(lambda: len(_motion(h, accepted)) >= 3, 60), node.log()[-2000:]
    requested = time.monotonic()
    canceled = goals.cancel(handle)
    result, status, _ = goals.result(handle)
    assert status == GoalStatus.STATUS_CANCELED and result.outcome == Outcome.CANCELED, result
    # the hold may even arrive before the answer does (Jazzy answers a cancel later than Kilted)
    assert wait_until(lambda: any(m.hold for _, m in _commands(h, requested)), 5), 'no hold after the cancel'
    when = next(t for t, m in _commands(h, requested) if m.hold)
    assert when - canceled <= PERIOD + 0.05, when - canceled
    h.wait_for(lambda: False, 1.0)
    assert not _motion(h, min(when, canceled)), 'a motion command went out after the cancel'


def test_a_new_goal_preempts_the_running_one_and_only_its_task_moves(task_graph) -> None:
    h, goals, _node = task_graph
    first, accepted = goals.send(TASK)
    assert h.wait_for(lambda: len(_motion(h, accepted)) >= 2, 60)
    other = 'stack the blocks'
    second, preempted = goals.send(other)
    assert second.accepted
    result, status, _ = goals.result(first)
    assert status == GoalStatus.STATUS_ABORTED and result.outcome == Outcome.PREEMPTED, result
    assert h.wait_for(lambda: len(_motion(h, preempted)) >= 3, 60)
    with h.lock:
        task_of = {c.sequence: c.instruction for c in h.chunks}
    assert {task_of[m.chunk_sequence] for m in _motion(h, preempted)} == {other}
    canceled = goals.cancel(second)
    assert goals.result(second)[0].outcome == Outcome.CANCELED
    assert _first_command_after(h, canceled)[1].hold


def test_goal_policy_reject_refuses_a_second_goal(task_graph) -> None:
    h, goals, _node = task_graph
    assert h.set_parameter(ACTION, 'goal_policy', 'reject').successful
    assert not h.set_parameter(ACTION, 'goal_policy', 'sometimes').successful
    try:
        first, accepted = goals.send(TASK)
        assert first.accepted
        second, _ = goals.send('stack the blocks')
        assert not second.accepted
        assert h.wait_for(lambda: len(_motion(h, accepted)) >= 2, 60)  # the first one runs on
        with h.lock:
            task_of = {c.sequence: c.instruction for c in h.chunks}
        assert {task_of[m.chunk_sequence] for m in _motion(h, accepted)} == {TASK}
        goals.cancel(first)
        assert goals.result(first)[0].outcome == Outcome.CANCELED
    finally:
        assert h.set_parameter(ACTION, 'goal_policy', 'preempt').successful


def test_the_success_signal_ends_a_goal_as_succeeded(task_graph) -> None:
    h, goals, _node = task_graph
    handle, accepted = goals.send(TASK, time_limit=120.0)
    assert h.wait_for(lambda: len(_motion(h, accepted)) >= 1, 60)
    h.success_pub.publish(Bool(data=False))  # false is no success
    h.wait_for(lambda: False, 0.3)
    h.success_pub.publish(Bool(data=True))
    result, status, ended = goals.result(handle)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.outcome == Outcome.SUCCEEDED, result
    assert 'test/success' in result.message and result.steps >= 1
    assert _first_command_after(h, ended)[1].hold
    h.wait_for(lambda: False, 1.0)
    assert not _motion(h, ended)


def test_time_limit(task_graph) -> None:
    h, goals, _node = task_graph
    handle, _accepted = goals.send(TASK, time_limit=1.5)
    result, status, ended = goals.result(handle)
    assert status == GoalStatus.STATUS_ABORTED and result.outcome == Outcome.TIME_LIMIT, result
    assert 1.5 <= result.duration <= 1.5 + 2 * PERIOD + 0.3, result.duration
    h.wait_for(lambda: False, 1.0)
    assert not _motion(h, ended)


def test_estop_ends_the_goal_and_refuses_new_ones_until_reset(task_graph) -> None:
    h, goals, _node = task_graph
    handle, accepted = goals.send(TASK)
    assert h.wait_for(lambda: len(_motion(h, accepted)) >= 1, 60)
    h.estop_pub.publish(Bool(data=True))
    try:
        result, status, stopped = goals.result(handle)
        assert status == GoalStatus.STATUS_ABORTED and result.outcome == Outcome.ESTOPPED, result
        assert _first_command_after(h, stopped)[1].hold
        refused, _ = goals.send(TASK)
        assert not refused.accepted
        h.wait_for(lambda: False, 0.5)
        assert not _motion(h, stopped)
    finally:
        h.estop_pub.publish(Bool(data=False))
        assert h.reset_client.wait_for_service(timeout_sec=10)
        assert h.reset_client.call(Trigger.Request(), timeout_sec=10).success
    again, resumed = goals.send(TASK, max_steps=2)
    assert again.accepted
    assert goals.result(again)[0].outcome == Outcome.STEP_LIMIT
    assert not _motion(h, stopped, resumed)


def test_instruction_topic_is_ignored_while_a_goal_runs(task_graph) -> None:
    h, goals, _node = task_graph
    before = h.counter(ACTION, 'instructions_ignored_during_goal')
    handle, accepted = goals.send(TASK)
    pub = h.node.create_publisher(String, 'instruction', latched_qos())
    pub.publish(String(data='knock everything over'))
    assert h.wait_for(lambda: h.counter(ACTION, 'instructions_ignored_during_goal') > before, 20)
    assert h.wait_for(lambda: len(_motion(h, accepted)) >= 3, 60)
    with h.lock:
        task_of = {c.sequence: c.instruction for c in h.chunks}
    assert {task_of[m.chunk_sequence] for m in _motion(h, accepted)} == {TASK}
    goals.cancel(handle)
    assert goals.result(handle)[0].outcome == Outcome.CANCELED
    h.node.destroy_publisher(pub)


@pytest.mark.parametrize('goal', [
    dict(instruction=''), dict(instruction='open\x1b[2J the drawer'), dict(instruction='x' * 100000),
    dict(instruction='x' * 513), dict(instruction=TASK, time_limit=-1.0), dict(instruction=TASK, time_limit=math.nan),
], ids=['empty', 'ansi', 'huge', 'one-over-the-models-limit', 'negative-time', 'nan-time'])
def test_malformed_goals_are_rejected_and_counted(task_graph, goal: dict) -> None:
    h, goals, node = task_graph
    before = h.counter(ACTION, 'rejected_goal')
    handle, _ = goals.send(**goal)
    assert not handle.accepted
    assert h.wait_for(lambda: h.counter(ACTION, 'rejected_goal') > before, 5, frames=False)
    assert node.alive()


def test_a_goal_at_the_models_instruction_limit_is_accepted_and_runs(task_graph) -> None:
    """The limit is checked once, before acceptance (the model's 512 characters, after whitespace is collapsed):
    a goal that passes it runs and is answered."""
    _h, goals, _node = task_graph
    text = (TASK + ' ') * 20
    text = text[:512].rstrip() + 'x' * (512 - len(text[:512].rstrip()))
    handle, _ = goals.send('  ' + text.replace(' ', '   ') + '\n', max_steps=3)
    assert handle.accepted
    result, _status, _ = goals.result(handle)
    assert result.outcome == Outcome.STEP_LIMIT and result.steps == 3, result


def test_a_flood_of_goals_is_answered_and_never_stalls_control(task_graph) -> None:
    """300 goal requests in a burst (a misbehaving planner): every one is answered, accepted at most once per
    min_goal_interval (the rest rejected, counted), and the node keeps sending a command every period."""
    h, goals, node = task_graph
    answers: list = []  # goal handles
    burst = 300
    before = h.settled_counter(ACTION, 'goal_requests')  # the previous test's goal counted

    def send_burst() -> None:  # in the harness's executor thread: no rclpy client race
        timer.cancel()
        for i in range(burst):
            goals.client.send_goal_async(RunInstruction.Goal(instruction=f'{TASK} {i}')).add_done_callback(
                lambda f: h._add(answers, f.result()))

    start = time.monotonic()
    timer = h.node.create_timer(0.01, send_burst)
    h.wait_for(lambda: len(answers) == burst, 60)
    h.node.destroy_timer(timer)
    assert h.wait_for(lambda: h.counter(ACTION, 'goal_requests') - before == burst, 10, frames=False), \
        f'{h.counter(ACTION, "goal_requests") - before} of {burst} requests reached the node'
    assert len(answers) == burst, f'{len(answers)} of {burst} requests answered'
    accepted = sum(a.accepted for a in answers)
    assert 1 <= accepted <= 30, accepted  # the burst lasts well under 3 s: min_goal_interval 0.1 s
    h.wait_for(lambda: False, 2.5)
    with h.lock:  # when the node sent each command from the burst's start on (its diagnostics' window is longer)
        sent = np.array([s for t, s in h.command_sent if t > start])
    assert len(sent) >= 20 and np.diff(sent).max() < 2 * PERIOD, np.round(np.diff(sent), 3)
    assert h.counter(ACTION, 'rejected_goal_rate') >= burst - accepted
    last = [a for a in answers if a.accepted][-1]
    goals.cancel(last)
    assert goals.result(last)[0].outcome in (Outcome.CANCELED, Outcome.PREEMPTED) and node.alive()
