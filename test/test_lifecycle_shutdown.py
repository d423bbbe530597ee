"""Lifecycle shutdown: from any state the node holds if it commanded anything, ends its goal, refuses more and
its process ends (so a launch waiting on it ends too). Each test ends its node's process."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import Harness, action_node_graph, wait_until
from lifecycle_msgs.msg import Transition
from test_lifecycle import TASK, Lifecycle
from worldvla.action import RunInstruction

pytestmark = pytest.mark.ros


@pytest.fixture
def shut_graph(fixed_chunk_checkpoint: Path, tmp_path: Path):
    """A fresh enabled node (autostart) with a twist output, a harness that records the twists, a lifecycle
    client and a goal client: every test here ends the node's process."""
    from geometry_msgs.msg import TwistStamped
    from harness import GoalClient

    from worldvla_ros.nodes.common import reliable_qos

    def ready(h: Harness):
        h.twists = []
        h.node.create_subscription(TwistStamped, 'servo/twist', lambda m: h._add(h.twists, (time.monotonic(), m)),
                                   reliable_qos(100))
        return Lifecycle(h), GoalClient(h)

    with action_node_graph(fixed_chunk_checkpoint, tmp_path, {'twist_topic': 'servo/twist'}, ready,
                           'no lifecycle services') as (h, node, (life, goals)):
        yield h, node, life, goals


def test_shutdown_from_active_holds_ends_the_goal_and_the_process(shut_graph) -> None:
    from action_msgs.msg import GoalStatus

    h, node, life, goals = shut_graph
    handle, accepted = goals.send(TASK)
    assert handle.accepted
    assert h.wait_for(lambda: sum(not m.hold for t, m in h.commands if t > accepted) >= 3, 60), node.log()[-2000:]
    pending = handle.get_result_async()  # asked for before the shutdown, as `ros2 action send_goal` does
    assert life.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN, timeout=20)
    answered = time.monotonic()
    assert wait_until(pending.done, 10), 'no goal result'
    result, status = pending.result().result, pending.result().status
    assert status == GoalStatus.STATUS_ABORTED and result.outcome == RunInstruction.Result.SHUTDOWN, result
    assert wait_until(lambda: not node.alive(), 10), 'a finalized node keeps its process alive'
    assert node.wait() == 0, node.log()[-2000:]
    h.wait_for(lambda: False, 0.5)
    with h.lock:
        last = h.commands[-1][1]
        after = [m for t, m in h.commands if t > answered]
        twists_after = [m for t, m in h.twists if t > answered]
        last_twist = h.twists[-1][1].twist
    assert last.hold, 'the last command before finalized is not a hold'
    assert all(m.hold for m in after) and len(after) <= 1, f'{len(after)} commands after finalized'
    assert len(twists_after) <= 1, 'driver output after finalized'
    assert (last_twist.linear.x, last_twist.linear.y, last_twist.linear.z) == (0.0, 0.0, 0.0)


def test_shutdown_from_inactive_ends_the_process_without_a_command(shut_graph) -> None:
    h, node, life, _goals = shut_graph
    assert life.transition(Transition.TRANSITION_DEACTIVATE) and life.state() == 'inactive'
    deactivated = time.monotonic()
    assert life.transition(Transition.TRANSITION_INACTIVE_SHUTDOWN, timeout=20)
    assert wait_until(lambda: not node.alive(), 10), 'a finalized node keeps its process alive'
    assert node.wait() == 0, node.log()[-2000:]
    with h.lock:
        after = [m for t, m in h.commands if t > deactivated + 0.3]
    assert not after, 'commands after deactivate and shutdown'
    assert 'finalized' in node.log()


def test_the_sim_starts_its_episodes_when_the_action_node_is_active(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With wait_for_active the sim publishes nothing and times nothing out while the model loads (the first
    episode used to time out and count as a failure); once the action node is active the episodes start."""
    import rclpy
    from harness import NodeProcess
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from worldvla_ros.nodes.common import reliable_qos

    sim = NodeProcess('sim_node', tmp_path, {'wait_for_active': 'worldvla_action', 'episode_timeout': '1.0'})
    action = None
    rclpy.init()
    h = Harness()
    frames: list[float] = []
    results: list[str] = []
    h.node.create_subscription(Image, 'camera/image_raw', lambda _m: h._add(frames, time.monotonic()),
                               qos_profile_sensor_data)
    h.node.create_subscription(String, 'sim/episode_result', lambda m: h._add(results, m.data), reliable_qos(10))
    try:
        time.sleep(6.0)  # far beyond episode_timeout: nothing may have started
        assert not frames and not results, sim.log()[-1500:]
        assert 'waiting for worldvla_action to be active' in sim.log()
        action = NodeProcess('action_node', tmp_path, {'checkpoint': str(tiny_checkpoint), 'device': 'cpu',
                                                       'autostart': 'false'})
        life = Lifecycle(h)
        assert life.transition(Transition.TRANSITION_CONFIGURE)
        time.sleep(1.5)
        assert not frames, 'the sim started before the action node was active'
        assert life.transition(Transition.TRANSITION_ACTIVATE)
        assert wait_until(lambda: len(frames) > 5, 20), sim.log()[-1500:]
        assert 'episode 0' in sim.log()
    finally:
        h.close()
        rclpy.shutdown()
        sim.stop()
        if action is not None:
            action.stop()
