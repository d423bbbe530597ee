"""Sim node: the tabletop simulator as a robot — camera out, EndEffectorCommands in, task success.

Publishes ``camera/image_raw`` at ``rate_hz``, the episode's ``instruction`` (transient local),
applies every ``worldvla/ee_command`` it receives (one sim step each; ``dry_run`` commands only
with ``execute_dry_run``), and ends an episode on success, after ``max_steps`` commands or after
``episode_timeout`` seconds. Each result goes out on ``sim/episode_result`` (JSON), as
``sim/success`` (``std_msgs/Bool``: the success signal of the action node's RunInstruction goals)
and into the log; ``/diagnostics`` carries the running success rate.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State
from lifecycle_msgs.srv import GetState
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, String
from worldvla.msg import EndEffectorCommand

from worldvla_ros.image_conversion import fill_image_msg
from worldvla_ros.nodes.common import (
    GuardedNode,
    Param,
    StartupError,
    declare_all,
    diagnostics_msg,
    image_qos,
    latched_qos,
    reject_changes_of,
    reliable_qos,
    spin_node,
)
from worldvla_ros.sim.tabletop import TASKS, SimConfig, TabletopSim

PARAMETERS: dict[str, Param] = {
    'rate_hz': Param(10.0, 'camera frame rate', 0.5, 100.0, read_only=True),
    'image_size': Param(128, 'camera image side in pixels (multiple of 32)', 32, 1024, read_only=True),
    'camera_tilt_deg': Param(SimConfig.camera_tilt_deg, 'camera tilt from straight down (an oblique view shows '
                             'height); the view the checkpoint was trained on: the bundled model 0', 0.0, 80.0,
                             read_only=True),
    'light_slant_deg': Param(SimConfig.light_slant_deg, "the lamp's angle from vertical: the gripper's shadow falls "
                             'away from it by its height × tan(slant); the lighting the checkpoint was trained with '
                             '(bundled: 60)', 0.0, 75.0, read_only=True),
    'seed': Param(100000, 'layout seed of the first episode; +1 per episode', 0, 2**31 - 1, read_only=True),
    'task': Param(-1, f'task index 0 … {len(TASKS) - 1}; -1 = drawn per episode', -1, len(TASKS) - 1),
    'max_steps': Param(100, 'commands per episode before it counts as failed', 1, 100000),
    'episode_timeout': Param(30.0, 'seconds per episode before it counts as failed', 1.0, 3600.0),
    'episodes': Param(0, 'stop after this many episodes (0 = run forever)', 0, 1000000),
    'execute_dry_run': Param(False, 'also execute commands marked dry_run'),
    'frame_id': Param('camera', 'frame_id of the camera images'),
    'wait_for_active': Param('', 'a lifecycle node (its name, relative to this namespace) whose active state starts '
                             'the episodes: nothing is published and no episode times out while it loads its model; '
                             'empty: start at once', read_only=True),
    'start_holding_near': Param(0.0, 'metres; > 0: every episode starts with the named block in the closed gripper '
                                     'within this distance of its target (only the release remains)', 0.0, 0.3),
}


class SimNode(GuardedNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('worldvla_sim', **kwargs)
        p = declare_all(self, PARAMETERS)
        self.add_on_set_parameters_callback(reject_changes_of({n for n, q in PARAMETERS.items() if q.read_only}, {}))
        if p['image_size'] % 32:
            raise StartupError('image_size must be a multiple of 32')
        self.sim = TabletopSim(SimConfig(image_size=int(p['image_size']), max_steps=int(p['max_steps']),
                                         camera_tilt_deg=float(p['camera_tilt_deg']),
                                         light_slant_deg=float(p['light_slant_deg'])))
        self._lock = threading.Lock()
        self._seed = int(p['seed'])
        self._episode = 0
        self._results: list[bool] = []
        self._finished = False
        self.image_pub = self.create_publisher(Image, 'camera/image_raw', image_qos(5))
        self.instruction_pub = self.create_publisher(String, 'instruction', latched_qos())
        self.result_pub = self.create_publisher(String, 'sim/episode_result', reliable_qos(50))
        self.success_pub = self.create_publisher(Bool, 'sim/success', reliable_qos(10))
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', reliable_qos())
        self.create_subscription(EndEffectorCommand, 'worldvla/ee_command', self._on_command, reliable_qos(50))
        self._started = False
        self._state_client = None
        self._asking = None
        if p['wait_for_active']:
            self._state_client = self.create_client(GetState, f'{p["wait_for_active"].strip("/")}/get_state')
            self._watch_timer = self.create_timer(0.5, self._ask_state)
            self.get_logger().info(f'waiting for {p["wait_for_active"]} to be active before the first episode')
        else:
            self._start()
        self.create_timer(1.0 / float(p['rate_hz']), self._publish_frame)
        self.create_timer(1.0, self._publish_diagnostics)

    def _start(self) -> None:
        with self._lock:
            self._started = True
            self._start_episode()

    def _ask_state(self) -> None:
        """Poll the lifecycle state (its service answers as soon as the process runs, the model still loading)."""
        if self._started:
            return
        if self._asking is not None:
            if not self._asking.done():
                return
            state = self._asking.result()
            self._asking = None
            if state is not None and state.current_state.id == State.PRIMARY_STATE_ACTIVE:
                self.destroy_timer(self._watch_timer)
                self._start()
                return
        if self._state_client.service_is_ready():
            self._asking = self._state_client.call_async(GetState.Request())

    def _start_episode(self) -> None:
        task = self.get_parameter('task').value
        self.sim.reset(self._seed + self._episode, None if task < 0 else task,
                       holding_near=self.get_parameter('start_holding_near').value)
        self.sim.config = SimConfig(**{**self.sim.config.__dict__, 'max_steps': self.get_parameter('max_steps').value})
        self._episode_start = self.get_clock().now()
        self.instruction_pub.publish(String(data=self.sim.instruction))
        self.get_logger().info(f'episode {self._episode} (seed {self._seed + self._episode}): "{self.sim.instruction}"')

    def _on_command(self, msg: EndEffectorCommand) -> None:
        if msg.dry_run and not self.get_parameter('execute_dry_run').value:
            self.stats.count('dry_run_ignored')
            return
        action = np.asarray(msg.action, dtype=np.float64)
        if action.shape != (7,) or not np.all(np.isfinite(action)):
            self.stats.count('rejected_commands')
            self.get_logger().warning('rejected a non-finite command', throttle_duration_sec=2.0)
            return
        with self._lock:
            if self._finished or not self._started:
                return
            self.sim.step(action)
            self.stats.count('commands_executed')
            if self.sim.done:
                self._end_episode()

    def _end_episode(self) -> None:
        success = self.sim.success
        self._results.append(success)
        result = {'episode': self._episode, 'seed': self._seed + self._episode, 'instruction': self.sim.instruction,
                  'success': success, 'steps': self.sim.state.steps,
                  'success_rate': float(np.mean(self._results)), 'episodes_done': len(self._results)}
        self.result_pub.publish(String(data=json.dumps(result)))
        self.success_pub.publish(Bool(data=bool(success)))
        self.get_logger().info(
            f'episode {self._episode}: {"SUCCESS" if success else "failed"} after {self.sim.state.steps} steps; '
            f'success rate {np.mean(self._results):.0%} over {len(self._results)}')
        self._episode += 1
        limit = self.get_parameter('episodes').value
        if limit and self._episode >= limit:
            self._finished = True
            return
        self._start_episode()

    def _publish_frame(self) -> None:
        with self._lock:
            if not self._started:
                return
            if not self._finished:
                elapsed = (self.get_clock().now() - self._episode_start).nanoseconds * 1e-9
                if elapsed > self.get_parameter('episode_timeout').value:
                    self._end_episode()
            frame = self.sim.render()
        msg = fill_image_msg(Image(), frame)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.get_parameter('frame_id').value
        self.image_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        if not self._started:
            return
        values = {'episodes_done': str(len(self._results)),
                  'successes': str(int(np.sum(self._results))),
                  'success_rate': f'{np.mean(self._results):.3f}' if self._results else 'n/a',
                  'instruction': self.sim.instruction, **self.stats.snapshot()}
        self.diag_pub.publish(diagnostics_msg(self, 'worldvla: tabletop sim', 0, 'running', values))


def main(args: list[str] | None = None) -> int:
    return spin_node(SimNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
