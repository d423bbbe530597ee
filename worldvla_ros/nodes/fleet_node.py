"""Many robots, one model: a process with one action node per robot namespace and one shared model.

Each robot keeps everything the action node does in its namespace — its camera, instruction, task
action, lifecycle, e-stop, watchdog, safety limits and outputs, set per robot through the usual
parameters (``/<robot>/worldvla_action``) — but every chunk comes from one model on one device,
the robots' requests decoded together (``BatchingPolicy``: N×K rows a pass). A slow or silent robot
delays the others by at most ``max_batch_wait_ms``. More robots than one device serves: more fleet
processes, on more machines, over the ROS 2 middleware.

    ros2 run worldvla fleet_node --ros-args -p robots:="['arm1', 'arm2', 'arm3']" \\
        --params-file fleet.yaml   # /arm1/worldvla_action: ros__parameters: checkpoint: … (each robot)
"""
from __future__ import annotations

import re
import threading
from typing import Any

from worldvla_ros.launch_plan import normalize_namespace
from worldvla_ros.nodes.action_node import ActionNode
from worldvla_ros.nodes.common import (
    GuardedNode,
    Param,
    StartupError,
    declare_all,
    load_node_policy,
    reject_changes_of,
    spin_node,
)

PARAMETERS: dict[str, Param] = {
    'robots': Param(['robot1'], 'robot namespaces: one action node in each, all sharing one model', read_only=True),
    'max_batch_wait_ms': Param(5.0, 'after a robot asks for a chunk, how long to wait for the others '
                               'before decoding', 0.0, 1000.0, read_only=True),
}


class SharedPolicy:
    """Loads the model once, for the first robot that configures, and hands every robot the batching
    wrapper; a robot whose model parameters differ from the first one's cannot share it."""

    MODEL_KEYS = ('checkpoint', 'tokenizer_dir', 'device', 'dtype', 'cpu_threads', 'chunk_size', 'history_frames',
                  'decode_capture')

    def __init__(self, robots: int, max_wait_s: float) -> None:
        self.robots = robots
        self.max_wait_s = max_wait_s
        self.batching: Any = None
        self._model: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def __call__(self, p: dict[str, Any], **overrides: Any) -> Any:
        from worldvla_ros.model.batching import BatchingPolicy

        model = {k: p[k] for k in self.MODEL_KEYS}
        with self._lock:
            if self.batching is None:
                self.batching = BatchingPolicy(load_node_policy(p, **overrides), self.robots, self.max_wait_s,
                                               cpu_threads=p['cpu_threads'])
                self._model = model
            elif model != self._model:
                differ = ', '.join(k for k in self.MODEL_KEYS if model[k] != self._model[k])
                raise StartupError(f'the robots of one fleet share one model; this one differs in: {differ}')
            return self.batching


class FleetNode(GuardedNode):
    """Reads the robot list and reports the batches on /diagnostics of its own (the robots' nodes report
    theirs)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('worldvla_fleet', **kwargs)
        p = declare_all(self, PARAMETERS)
        self.add_on_set_parameters_callback(reject_changes_of(set(PARAMETERS), {}))
        robots = [normalize_namespace(r) for r in p['robots']]
        names_ok = all(re.fullmatch(r'[A-Za-z][A-Za-z0-9_]*', part) for r in robots for part in r.strip('/').split('/'))
        if not robots or any(not r for r in robots) or len(set(robots)) != len(robots) or not names_ok:
            raise StartupError(f'parameter robots: distinct ROS namespaces needed (letters, digits and _, not starting '
                               f'with a digit), got {p["robots"]}')
        self.robots = robots
        self.shared = SharedPolicy(len(robots), p['max_batch_wait_ms'] / 1000.0)

    def close(self) -> bool:
        if self.shared.batching is not None:
            self.shared.batching.close()
        return True


def build_fleet(**kwargs: Any) -> list[GuardedNode]:
    fleet = FleetNode(**kwargs)
    nodes: list[GuardedNode] = []
    try:
        for namespace in fleet.robots:
            nodes.append(ActionNode(policy_loader=fleet.shared, namespace=namespace, **kwargs))
    except BaseException:
        for node in nodes:
            node.close()
            node.destroy_node()
        fleet.close()
        fleet.destroy_node()
        raise
    return [*nodes, fleet]  # the fleet closes last: the robots' last holds come first


def main(args: list[str] | None = None) -> int:
    return spin_node(build_fleet, args)


if __name__ == '__main__':
    raise SystemExit(main())
