"""The action node as a managed (lifecycle) node, driven through its real lifecycle services."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from harness import Harness, NodeProcess, SpinningSafeActionClient, action_node_graph, wait_until
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from std_msgs.msg import String
from worldvla.action import RunInstruction

pytestmark = pytest.mark.ros
ACTION = 'worldvla_action'
TASK = 'put the red block in the bowl'


class Lifecycle:
    def __init__(self, h: Harness) -> None:
        self.h = h
        self.change = h.node.create_client(ChangeState, f'{ACTION}/change_state')
        self.get = h.node.create_client(GetState, f'{ACTION}/get_state')
        assert self.change.wait_for_service(timeout_sec=60) and self.get.wait_for_service(timeout_sec=10)

    def state(self) -> str:
        return self.get.call(GetState.Request(), timeout_sec=10).current_state.label

    def transition(self, transition: int, timeout: float = 120.0) -> bool:
        future = self.change.call_async(ChangeState.Request(transition=Transition(id=transition)))
        assert wait_until(future.done, timeout), 'no answer from change_state'
        return future.result().success


def _rss_mb(node: NodeProcess) -> float:
    return psutil.Process(node.proc.pid).memory_info().rss / 2**20


@pytest.fixture(scope='module')
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wider random checkpoint (≈ 140 MB of float32 weights, fixed 5-action chunks): what cleanup gives back
    stands well clear of the tens of MB the allocator keeps or gives back on its own."""
    from worldvla_ros.model import make_tiny_checkpoint
    from worldvla_ros.model.config import TINY_BACKBONE, TINY_VQGAN, WorldVLAConfig

    return make_tiny_checkpoint(tmp_path_factory.mktemp('wide') / 'wide',
                                backbone=replace(TINY_BACKBONE, hidden_size=256, intermediate_size=512),
                                settings=WorldVLAConfig(resolution=TINY_VQGAN.resolution, min_actions=5))


@pytest.fixture(scope='module')
def managed(wide_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with action_node_graph(wide_checkpoint, tmp_path_factory.mktemp('logs'), {'autostart': 'false'},
                           Lifecycle, 'no lifecycle services') as (h, node, life):
        yield h, life, node


def test_configure_activate_deactivate_cleanup_through_the_services(managed) -> None:
    h, life, node = managed
    assert life.state() == 'unconfigured'
    h.instruction_pub.publish(String(data=TASK))  # latched: kept until the model is there
    h.wait_for(lambda: False, 2.0)
    assert not h.commands and not h.chunks, 'commands from an unconfigured node'

    assert life.transition(Transition.TRANSITION_CONFIGURE) and life.state() == 'inactive'
    goals = SpinningSafeActionClient(h.node, RunInstruction, 'worldvla/run_instruction')
    assert goals.wait_for_server(timeout_sec=10)
    future = goals.send_goal_async(RunInstruction.Goal(instruction=TASK))
    assert wait_until(future.done, 10) and not future.result().accepted  # inactive: no tasks
    h.wait_for(lambda: False, 2.0)
    assert not h.commands and not h.chunks, 'commands from an inactive node'

    assert life.transition(Transition.TRANSITION_ACTIVATE) and life.state() == 'active'
    assert h.wait_for(lambda: any(not m.hold for _, m in h.commands), 60), node.log()[-2000:]

    assert life.transition(Transition.TRANSITION_DEACTIVATE) and life.state() == 'inactive'
    answered = time.monotonic()
    h.wait_for(lambda: False, 1.5)
    with h.lock:
        after = [m for t, m in h.commands if t > answered]
        last = h.commands[-1][1]
    assert last.hold, 'the last command before going inactive is not a hold'
    assert len(after) <= 1 and all(m.hold for m in after), f'{len(after)} commands while inactive'

    # what cleanup gives back, measured from inactive (after inference, as every later round is) to unconfigured
    rounds = [_cleanup_round(life, node)]
    assert life.state() == 'unconfigured'
    # two more rounds: each configure loads the model again and each cleanup gives it back. RSS after cleanup
    # wanders by tens of MB between rounds (allocator arenas, also in-process without ROS), so the check is that
    # it does not grow by a model per round: keeping every old model would add two between rounds 1 and 3
    for _ in range(2):
        assert life.transition(Transition.TRANSITION_CONFIGURE) and life.transition(Transition.TRANSITION_ACTIVATE)
        n = len(h.commands)
        assert h.wait_for(lambda n=n: len(h.commands) > n + 3, 60)
        assert life.transition(Transition.TRANSITION_DEACTIVATE)
        rounds.append(_cleanup_round(life, node))
    print(f'action node RSS (MiB), (inactive, unconfigured) per round: {rounds}')
    released = [before - after for before, after in rounds]
    assert min(released) > 50, rounds  # the weights (≈ 140 MB of float32 on disk) are given back every time
    assert rounds[2][1] - rounds[0][1] < min(released), rounds
    assert life.state() == 'unconfigured' and node.alive()


def _cleanup_round(life: Lifecycle, node: NodeProcess) -> tuple[float, float]:
    """RSS while inactive, then after cleanup."""
    inactive = _rss_mb(node)
    assert life.transition(Transition.TRANSITION_CLEANUP)
    time.sleep(0.5)
    return round(inactive, 1), round(_rss_mb(node), 1)

