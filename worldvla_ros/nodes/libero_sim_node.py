"""LIBERO sim node: a LIBERO task (MuJoCo, robosuite's Franka with OSC_POSE) as a robot on the ROS graph.

The simulator runs in LIBERO's own interpreter (``worldvla_ros.sim.libero``) and owns the time: it publishes
``/clock`` and the other nodes run with ``use_sim_time``, so a step that takes 0.2 s of CPU is still one 50 ms
period of LIBERO's 20 Hz. Per period: the agentview camera goes out on ``camera/image_raw`` stamped with the
period's time (upright, as a ROS camera would publish it: the render turned by 180°, which is the frame the
release's model sees; ``camera_wrist/image_raw`` too with ``wrist_camera``); when the action node will ask for
a chunk from that frame (its queue has run out: ``action_replan_threshold`` mirrors its setting) the clock waits
for that chunk on ``worldvla/action_chunk``; then the clock moves on one period, the node's control tick sends
its command on ``worldvla/ee_command``, and that command is executed as one ``env.step`` (a hold: no motion,
gripper kept; nothing within ``command_timeout``: the same). The commands are the release's unnormalised
OSC_POSE actions already (the action tokenizer's ranges).

Each episode, by the release's protocol: ``reset()``, initial state ``first_trial + k``, ten wait steps, then at
most the suite's step limit; it runs as a ``RunInstruction`` goal with the task's language sent to the action
node (``goal_action``; the goal starts once that node is active, and is canceled when the episode fails).
Results go out on ``sim/episode_result`` (JSON) and ``sim/success``.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

import numpy as np
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient
from rclpy.callback_groups import ReentrantCallbackGroup
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, String
from worldvla.action import RunInstruction
from worldvla.msg import ActionChunk, EndEffectorCommand

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
from worldvla_ros.sim.libero import RATE_HZ, SUITES, ActionDigest, LiberoEnv, LiberoMissing, model_view

START_S = 1000  # sim time of the first period (0 means "no clock yet" to a ROS node)
MAX_QUEUED = 256  # commands or chunk stamps waiting for the episode loop; the oldest go first

PARAMETERS: dict[str, Param] = {
    'suite': Param('libero_object', 'LIBERO suite', read_only=True, choices=tuple(SUITES)),
    'task': Param(0, 'task index in the suite', 0, 1000, read_only=True),
    'first_trial': Param(0, 'initial state of the first episode; +1 per episode', 0, 100000, read_only=True),
    'episodes': Param(1, 'episodes to run, then stay idle (0: run on forever)', 0, 100000, read_only=True),
    'max_steps': Param(0, "steps per episode after the wait steps; 0: the suite's (the release's)", 0, 100000),
    'resolution': Param(256, 'camera image side in pixels', 64, 1024, read_only=True),
    'wrist_camera': Param(False, 'also publish the wrist camera on camera_wrist/image_raw', read_only=True),
    'frame_id': Param('agentview', 'frame_id of the camera images'),
    'prompt_source': Param('language', "the goal's text: language (the release's evaluation) or name (the task's "
                           "name with spaces: libero_10's training prompts)", read_only=True,
                           choices=('language', 'name')),
    'goal_action': Param('worldvla/run_instruction', "the action node's RunInstruction server: each episode runs "
                         'as a goal there; empty: no goals, and no chunks awaited (a plain command publisher)',
                         read_only=True),
    'action_replan_threshold': Param(0, "the action node's replan_threshold: when it asks for a chunk, the clock "
                                     'waits for it', -1, 1000, read_only=True),
    'chunk_timeout': Param(300.0, 'wall seconds to wait for an awaited chunk before the clock moves on', 0.1, 3600.0),
    'command_timeout': Param(10.0, "wall seconds to wait for a period's command before a hold step", 0.1, 3600.0),
    'execute_dry_run': Param(False, 'also execute commands marked dry_run'),
    'publish_expert': Param(False, "with each frame, the scripted expert's action (libero_object) on "
                            'sim/expert_command: relayed to worldvla/ee_command it drives the robot', read_only=True),
}


class LiberoSimNode(GuardedNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('worldvla_libero_sim', **kwargs)
        p = declare_all(self, PARAMETERS)
        if self.get_parameter('use_sim_time').value:
            raise StartupError('the LIBERO sim publishes /clock itself: start it without use_sim_time')
        self.add_on_set_parameters_callback(reject_changes_of({n for n, q in PARAMETERS.items() if q.read_only}, {}))
        self.p = p
        try:
            self.env = LiberoEnv(p['suite'], int(p['task']), int(p['resolution']), bool(p['wrist_camera']))
        except LiberoMissing as exc:
            raise StartupError(str(exc)) from None
        self.instruction = self.env.name.replace('_', ' ') if p['prompt_source'] == 'name' else self.env.language
        self.period_ns = round(1e9 / RATE_HZ)
        # bounded: a flood of commands or chunks (another publisher on the topic) drops the oldest, counted
        self.commands: queue.Queue[EndEffectorCommand] = queue.Queue(maxsize=MAX_QUEUED)
        self.chunks: queue.Queue[int] = queue.Queue(maxsize=MAX_QUEUED)  # stamps (ns) of the chunks' newest frames
        self.results: list[dict[str, Any]] = []
        self.stop = threading.Event()
        group = ReentrantCallbackGroup()
        self.clock_pub = self.create_publisher(Clock, '/clock', reliable_qos(10))
        self.image_pub = self.create_publisher(Image, 'camera/image_raw', image_qos(5))
        self.wrist_pub = (self.create_publisher(Image, 'camera_wrist/image_raw', image_qos(5))
                          if p['wrist_camera'] else None)
        self.instruction_pub = self.create_publisher(String, 'instruction', latched_qos())
        self.result_pub = self.create_publisher(String, 'sim/episode_result', reliable_qos(50))
        self.success_pub = self.create_publisher(Bool, 'sim/success', reliable_qos(10))
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', reliable_qos())
        if p['publish_expert'] and not self.env.has_expert:
            raise StartupError(f'{p["suite"]} has no scripted expert (libero_object has one)')
        self.expert_pub = (self.create_publisher(EndEffectorCommand, 'sim/expert_command', reliable_qos(10))
                           if p['publish_expert'] else None)
        self.create_subscription(EndEffectorCommand, 'worldvla/ee_command',
                                 lambda m: self._put(self.commands, m, 'commands_dropped'), reliable_qos(100),
                                 callback_group=group)
        self.create_subscription(ActionChunk, 'worldvla/action_chunk', self._on_chunk, reliable_qos(50),
                                 callback_group=group)
        self.goals = (ActionClient(self, RunInstruction, p['goal_action'], callback_group=group)
                      if p['goal_action'] else None)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=group)
        self.sim_ns = START_S * 10**9 + self.period_ns // 2  # frames half a period away from the ticks
        self.publish_clock()
        self.runner = threading.Thread(target=self._run, name='libero-episodes', daemon=True)
        self.runner.start()

    # -- the episode loop (its own thread: the executor keeps delivering commands and chunks) ------------------
    def _run(self) -> None:
        try:
            k = 0
            while not self.stop.is_set() and (not self.p['episodes'] or k < self.p['episodes']):
                self._episode(int(self.p['first_trial']) + k)
                k += 1
            self.get_logger().info(f'{k} episodes done: {sum(r["success"] for r in self.results)} succeeded')
        except Exception as exc:  # the simulator failed: say so once; the node stays up, idle
            if not self.stop.is_set():
                self.get_logger().error(f'LIBERO stopped: {type(exc).__name__}: {exc}')

    def _episode(self, trial: int) -> None:
        frame = self.env.reset(trial)
        self.instruction_pub.publish(String(data=self.instruction))
        handle = self._start_goal()
        if self.stop.is_set():
            return
        limit = self.get_parameter('max_steps').value or SUITES[self.p['suite']]
        steps = holds = 0
        last: EndEffectorCommand | None = None
        success = False
        error = ''
        digest = ActionDigest()
        t0 = time.monotonic()
        while steps < limit and not self.stop.is_set():
            self._drain(self.commands)
            self._publish_frame(frame)
            if self.expert_pub is not None:
                expert = EndEffectorCommand(action=self.env.expert_action().tolist(), index=0, chunk_size=1)
                expert.header.stamp.sec, expert.header.stamp.nanosec = divmod(self.sim_ns, 10**9)
                self.expert_pub.publish(expert)
            if self._chunk_expected(last):
                self._await_chunk(self.sim_ns)
            self.sim_ns += self.period_ns
            self.publish_clock()
            cmd = self._command()
            if cmd is None or cmd.hold:  # no motion, the gripper where the hold (or the last command) has it
                holds += 1
                source = cmd if cmd is not None else last
                action = np.array([0.0] * 6 + [float(source.action[6]) if source is not None else -1.0])
            else:
                action = np.asarray(cmd.action, dtype=np.float64)
            if cmd is not None:
                last = cmd
            digest.update(action)
            try:
                frame = self.env.step(action)
            except (RuntimeError, ValueError) as exc:  # the release: an exception ends the episode as a failure
                error = str(exc)
                break
            steps += 1
            self.stats.count('steps')
            if frame.done:
                success = True
                break
        self._publish_frame(frame)
        result = {'suite': self.p['suite'], 'task': int(self.p['task']), 'trial': trial, 'success': success,
                  'steps': steps, 'holds': holds, 'instruction': self.instruction, 'actions_sha': digest.hexdigest(),
                  'wall_s': round(time.monotonic() - t0, 2), **({'error': error[:300]} if error else {})}
        self.results.append(result)
        self.result_pub.publish(String(data=json.dumps(result)))
        self.success_pub.publish(Bool(data=success))  # the action node's success_topic ends the goal as succeeded
        if handle is not None and not success:
            self._wait(handle.cancel_goal_async(), 10.0)
        self.get_logger().info(f'trial {trial}: {"SUCCESS" if success else "failed"} after {steps} steps '
                               f'({holds} holds); {sum(r["success"] for r in self.results)} of {len(self.results)}')

    def _start_goal(self) -> Any:
        """The episode's goal, accepted by the action node (retried until that node is active)."""
        if self.goals is None:
            return None
        while not self.stop.is_set():
            if self.goals.wait_for_server(timeout_sec=1.0):
                goal = RunInstruction.Goal(instruction=self.instruction, max_steps=0, time_limit=0.0)
                handle = self._wait(self.goals.send_goal_async(goal), 30.0)
                if handle is not None and handle.accepted:
                    # executing: the node has taken the task (acceptance is answered before that), so the
                    # episode's first frame is the first of its history
                    deadline = time.monotonic() + 10.0
                    while handle.status != GoalStatus.STATUS_EXECUTING and time.monotonic() < deadline:
                        time.sleep(0.01)
                    return handle
            self.publish_clock()
            time.sleep(1.0)  # not active yet (its model loading): ask again
        return None

    def _chunk_expected(self, last: EndEffectorCommand | None) -> bool:
        """Whether the action node asks for a chunk from the next frame: its queue has run down to its
        replan threshold (or it replans on every frame, or nothing ran yet)."""
        threshold = self.p['action_replan_threshold']
        if self.goals is None:
            return False
        if threshold < 0 or last is None or last.hold:
            return True
        return int(last.chunk_size) - int(last.index) - 1 <= threshold

    def _await_chunk(self, stamp_ns: int) -> None:
        deadline = time.monotonic() + self.get_parameter('chunk_timeout').value
        while not self.stop.is_set():
            try:
                if self.chunks.get(timeout=max(deadline - time.monotonic(), 0.0)) >= stamp_ns:
                    return
            except queue.Empty:
                self.stats.count('chunk_timeouts')
                return

    def _command(self) -> EndEffectorCommand | None:
        deadline = time.monotonic() + self.get_parameter('command_timeout').value
        while not self.stop.is_set():
            try:
                cmd = self.commands.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.stats.count('command_timeouts')
                return None
            action = np.asarray(cmd.action, dtype=np.float64)
            if cmd.dry_run and not self.get_parameter('execute_dry_run').value:
                self.stats.count('dry_run_ignored')
            elif action.shape != (7,) or not np.all(np.isfinite(action)):
                self.stats.count('rejected_commands')
            else:
                return cmd
        return None

    def _on_chunk(self, msg: ActionChunk) -> None:
        self._put(self.chunks, msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec, 'chunks_dropped')

    def _put(self, q: queue.Queue, item: Any, dropped: str) -> None:
        while True:
            try:
                q.put_nowait(item)
                return
            except queue.Full:
                try:
                    q.get_nowait()
                    self.stats.count(dropped)
                except queue.Empty:
                    pass

    @staticmethod
    def _drain(q: queue.Queue) -> None:
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                return

    def _wait(self, future: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.01)
        return future.result() if future.done() else None

    # -- messages -----------------------------------------------------------------------------------------
    def publish_clock(self) -> None:
        clock = Clock()
        clock.clock.sec, clock.clock.nanosec = divmod(self.sim_ns, 10**9)
        self.clock_pub.publish(clock)

    def _publish_frame(self, frame: Any) -> None:
        for pub, image in ((self.image_pub, frame.image), (self.wrist_pub, frame.wrist)):
            if pub is None or image is None:
                continue
            msg = fill_image_msg(Image(), model_view(image))  # upright: the release's view of the render
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(self.sim_ns, 10**9)
            msg.header.frame_id = self.get_parameter('frame_id').value
            pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        n = len(self.results)
        values = {'suite': self.p['suite'], 'task': str(self.p['task']), 'instruction': self.instruction,
                  'episodes_done': str(n), 'successes': str(sum(r['success'] for r in self.results)),
                  **self.stats.snapshot()}
        self.diag_pub.publish(diagnostics_msg(self, 'worldvla: LIBERO sim', 0, 'running', values))

    def close(self) -> bool:
        self.stop.set()
        self.runner.join(timeout=5.0)
        self.env.close()
        return super().close()


def main(args: list[str] | None = None) -> int:
    return spin_node(LiberoSimNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
