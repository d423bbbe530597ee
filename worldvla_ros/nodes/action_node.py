"""Action node: camera + instruction in → ActionChunk and 7-DoF end-effector commands out.

A thin adapter over ``worldvla_ros.control.Controller``, which makes every decision between a chunk and a
command going out (when to ask for a chunk, merging, limits at send time, holds, e-stop, goals). Here:
parameters, subscriptions (validate, convert, hand over: the newest frame wins), an inference worker thread,
a control timer whose command goes out through the driver outputs' last gate, the RunInstruction action
server, the lifecycle callbacks and /diagnostics.

What a command consumer sees: from the first chunk on, one command per control period while the node runs
(motion or hold), a hold as the last command when it stops, and silence only if the process is killed
outright. The command publisher offers a deadline of two control periods, so a consumer that requests a
deadline gets a "deadline missed" event when commands stop; it must then stop the robot.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from std_msgs.msg import Bool, Float64MultiArray, Header, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.control import Command, Controller, ControlSettings
from worldvla_ros.image_conversion import ImageRejected
from worldvla_ros.model.prompts import MAX_INSTRUCTION_CHARS, check_instruction
from worldvla_ros.nodes.action_parameters import (
    LIMIT_PARAMETERS,
    PARAMETERS,
    SETTING_PARAMETERS,
    runtime_checks,
    safety_limits,
    startup_problems,
)
from worldvla_ros.nodes.common import (
    CameraInput,
    GuardedLifecycleNode,
    StartupError,
    declare_all,
    diagnostics_msg,
    load_node_policy,
    prepare_policy,
    reject_changes_of,
    release_memory,
    reliable_qos,
    spin_node,
)
from worldvla_ros.nodes.driver_outputs import DriverPublishers, chunk_msg, planned_path
from worldvla_ros.nodes.task_action import TaskActionServer

if TYPE_CHECKING:  # torch and transformers load with the model (configure), not at import: a refused start is quick
    from worldvla_ros.model.policy import WorldVLAPolicy


class ActionNode(GuardedLifecycleNode):
    """A managed node: configure loads the model and warms it up, activate starts commanding, deactivate
    holds and stops, cleanup releases the model, shutdown holds and ends the process. ``autostart`` (default)
    goes to active by itself."""

    def __init__(self, policy_loader: Callable[..., Any] = load_node_policy, **kwargs: Any) -> None:
        """``policy_loader(parameters, **overrides)``: how configure gets its model (default: load the
        checkpoint; the fleet node passes one shared, batching policy)."""
        super().__init__('worldvla_action', **kwargs)
        self._policy_loader = policy_loader
        self.sim_time = bool(self.get_parameter('use_sim_time').value)  # fixed at start-up
        p = declare_all(self, PARAMETERS)
        self._start_params = p
        problems = startup_problems(p)
        if problems:
            raise StartupError(problems[0])
        self.policy: WorldVLAPolicy | None = None  # loaded by configure, released by cleanup
        self._frame_event = threading.Event()
        self.controller = Controller(ControlSettings.from_parameters(p), safety_limits(p), self.stats,
                                     lambda reason, detail: self.say('warning', f'rejected_{reason}',
                                                                     f'rejected ({reason}): {detail}'))
        self._guard_params = reject_changes_of({n for n, q in PARAMETERS.items() if q.read_only},
                                               runtime_checks(len(p['gripper_joints'])))
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._configure_error = ''
        self._worker: threading.Thread | None = None
        self._running = False  # the inference worker runs (configured)

        sensors, control = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        rate = float(p['control_rate_hz'])
        command_qos = reliable_qos(50)
        command_qos.deadline = Duration(seconds=2.0 / rate)
        self.command_pub = self.create_publisher(EndEffectorCommand, 'worldvla/ee_command', command_qos)
        self.chunk_pub = self.create_publisher(ActionChunk, 'worldvla/action_chunk', reliable_qos())
        self.path_pub = self.create_publisher(MarkerArray, 'worldvla/planned_path', reliable_qos(1))
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', reliable_qos())
        self.drivers = DriverPublishers(self, p, command_qos, sensors)
        CameraInput(self, p['use_compressed'], self._on_frame, self._on_camera_reject, sensors)
        # its own group: a slow frame never delays a new instruction
        self.create_state_subscription(String, 'instruction', self._on_instruction,
                                       callback_group=MutuallyExclusiveCallbackGroup())
        self.create_state_subscription(Bool, 'worldvla/estop', self._on_estop, callback_group=control, once=False)
        self.create_service(Trigger, 'worldvla/reset_estop', self._on_reset_estop, callback_group=control)
        self.tasks = TaskActionServer(self)
        if p['success_topic']:
            self.create_subscription(Bool, p['success_topic'], self._on_success, reliable_qos(10),
                                     callback_group=control)
        self.create_subscription(Float64MultiArray, 'worldvla/surprise', self._on_surprise, reliable_qos(10),
                                 callback_group=MutuallyExclusiveCallbackGroup())
        # the control tick has a group of its own: no input (e-stop, reset, success) ever waits it out
        self.create_timer(1.0 / rate, self._on_control_tick, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        if p['autostart']:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise StartupError(self._configure_error or 'configure failed')
            self.trigger_activate()
        else:
            self.get_logger().info('unconfigured: waiting for the lifecycle transitions configure and activate '
                                   '(from the launch file, or your lifecycle manager)')

    # -- lifecycle ------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load and warm up the model; start the inference worker (nothing is commanded yet)."""
        try:
            policy = self._load_policy(self._start_params)
        except StartupError as exc:
            self._configure_error = str(exc)
            if not self._start_params['autostart']:  # with autostart the process ends with this as its FATAL line
                self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        ctrl = self.controller
        with ctrl.lock:
            self.policy = policy
            ctrl.update(history_frames=policy.config.history_frames)
            if ctrl.instruction is not None:  # received while unconfigured: now the model's own limits
                try:
                    ctrl.instruction = policy.check_instruction(ctrl.instruction)
                except ValueError as exc:
                    self.stats.count('rejected_instruction')
                    self.say('warning', 'rejected_instruction', f'rejected (instruction): {exc}')
                    ctrl.instruction = None
        self._running = True
        self._worker = threading.Thread(target=self._inference_loop, name='worldvla-inference', daemon=True)
        self._worker.start()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.controller.activate()
        self.get_logger().info(
            f'active: model {self.policy.model_id} on {self.policy.device}, K={self.policy.chunk_size}, '
            f'{self.controller.settings.rate_hz:g} Hz, '
            f'{"ENABLED" if self.controller.settings.enabled else "dry run (enabled:=false)"}')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Hold, then stop commanding: no command goes out until activated again."""
        self.controller.deactivate(self.clock_s(), self._now_ns(), self._send)
        self.get_logger().info('inactive: holding, no commands until activated')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and release the model (and its GPU memory)."""
        if not self._stop_worker():
            self.get_logger().error('cleanup: the inference worker did not stop')
            return TransitionCallbackReturn.FAILURE
        device = str(self.policy.device) if self.policy is not None else 'cpu'
        self.policy = None
        release_memory(device)
        self.get_logger().info('unconfigured: model released')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """From any state: as deactivate (a hold if anything was commanded, the running goal ended), then
        nothing more: goals and instructions are refused, the model released, and the process ends."""
        self.controller.shutdown(self.clock_s(), self._now_ns(), self._send)
        if not self._stop_worker(timeout=2.0):
            self.get_logger().error('shutdown: the inference worker did not stop')
        self.policy = None
        self.get_logger().info('finalized: holding, no more commands; the process ends')
        self.finished.set()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> bool:
        """Stop the worker and, if anything was commanded, send one last hold (delivery awaited briefly)."""
        self._running = False  # before the hold: no inference starts meanwhile
        last = self.controller.close(self.clock_s(), self._now_ns(), self._send if self.context.ok() else None)
        self._frame_event.set()
        if last is not None and self.context.ok():
            self.command_pub.wait_for_all_acked(Duration(seconds=0.5))
        return self._stop_worker(timeout=2.0)

    def _stop_worker(self, timeout: float = 5.0) -> bool:
        self._running = False
        self._frame_event.set()
        if self._worker is not None:
            self._worker.join(timeout=timeout)
            if self._worker.is_alive():
                return False
        self._worker = None
        return True

    def _load_policy(self, p: dict[str, Any]):
        overrides = {k: p[k] for k in ('chunk_size', 'history_frames') if p[k]}
        t0 = time.perf_counter()
        return prepare_policy(self._policy_loader(p, **overrides), p['decode_capture'], p['warmup'],
                              self.get_logger(), t0)

    # -- parameters -----------------------------------------------------------------------------------
    def _check_parameters(self, params: list) -> SetParametersResult:
        """Refuses read-only and malformed values, limits that do not fit together, settings out of range."""
        result = self._guard_params(params)
        new = {q.name: q.value for q in params}
        if not result.successful:
            return result
        try:
            if set(new) & set(LIMIT_PARAMETERS):
                safety_limits({n: new.get(n, self.get_parameter(n).value) for n in LIMIT_PARAMETERS})
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return result

    def _apply_parameters(self, params: list) -> None:
        """In force from the next decision: limits with the next command sent."""
        new = {q.name: q.value for q in params}
        settings = {SETTING_PARAMETERS[n]: v for n, v in new.items() if n in SETTING_PARAMETERS}
        if settings:
            self.controller.update(**settings)
        if set(new) & set(LIMIT_PARAMETERS):
            self.controller.set_limits(safety_limits({n: self.get_parameter(n).value for n in LIMIT_PARAMETERS}))
            self.get_logger().warning(f'safety limits changed: {", ".join(sorted(set(new) & set(LIMIT_PARAMETERS)))}')

    # -- inputs (fast: validate, convert, hand over) --------------------------------------------------
    def _on_frame(self, rgb: np.ndarray, header: Header, received: float) -> None:
        policy = self.policy
        if policy is None or not self.controller.commanding:
            self.stats.count('frames_ignored_inactive')  # read again after activation, never before
            return
        frame = policy.model_frame(rgb)  # all the model reads of it: bounded memory whatever the camera sends
        now = time.perf_counter()
        stamp = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        if self.controller.on_frame(frame, stamp, self.clock_s(), now - received):
            self._frame_event.set()

    def _on_camera_reject(self, exc: ImageRejected) -> None:
        self.stats.count(f'rejected_{exc.reason}')
        self.say('warning', f'rejected_{exc.reason}', f'rejected ({exc.reason}): {exc}')

    def _on_instruction(self, msg: String) -> None:
        self.stats.count('instructions_received')
        policy = self.policy
        try:  # before configure, the largest any checkpoint allows (checked again at configure)
            text = policy.check_instruction(msg.data) if policy is not None else check_instruction(
                msg.data, MAX_INSTRUCTION_CHARS)
        except ValueError as exc:
            self.stats.count('rejected_instruction')
            self.say('warning', 'rejected_instruction', f'rejected (instruction): {exc}')
            return
        if self.controller.set_instruction(text) == 'changed':
            self.say('info', 'instruction', f'instruction: {text!r}', every=1.0)  # the newest is on /diagnostics
            self._frame_event.set()

    def _on_estop(self, msg: Bool) -> None:
        if msg.data and self.controller.on_estop(self.clock_s()):
            self.get_logger().warning('E-STOP latched: holding until /worldvla/reset_estop is called')

    def _on_reset_estop(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        was = self.controller.reset_estop(self._now_ns())
        resp.success = True
        resp.message = 'e-stop reset: moving again only on frames stamped after now' if was \
            else 'e-stop was not latched'
        self.get_logger().warning(resp.message)
        return resp

    def _on_success(self, msg: Bool) -> None:
        if msg.data:
            self.controller.on_success(f'success signal on {self.get_parameter("success_topic").value}',
                                       self.clock_s())

    def _on_surprise(self, msg: Float64MultiArray) -> None:
        if len(msg.data) >= 2 and math.isfinite(msg.data[1]):
            self.tasks.surprise_psnr = float(msg.data[1])

    def wake(self) -> None:
        """The worker looks for a request now (a new task, a new frame)."""
        self._frame_event.set()

    # -- inference (worker thread) ----------------------------------------------------------------------
    def _inference_loop(self) -> None:
        if self.policy is not None:
            self.policy.use_cpu_threads(self.get_parameter('cpu_threads').value)
        while self._running:
            if not self._frame_event.wait(timeout=0.1):
                continue
            self._frame_event.clear()
            policy = self.policy
            request = self.controller.next_request(self._now_ns(), self.clock_s()) if policy else None
            if request is None:
                continue
            try:
                self._infer(policy, request)
            except Exception as exc:  # never let one bad inference end the worker
                if not self.context.ok() or not self._running:
                    return  # shutting down
                self.controller.inference_failed(request, str(exc), self.clock_s(),
                                                 non_finite=getattr(exc, 'non_finite', False))
                if not getattr(exc, 'non_finite', False):
                    self.say('error', 'inference', f'inference failed: {exc!r}')

    def _infer(self, policy: WorldVLAPolicy, request: Any) -> None:
        t0 = time.perf_counter()
        pred = policy.predict(request.frames, request.instruction,
                              batched=self.get_parameter('batched_decoding').value)
        model_done = time.perf_counter()
        self.tasks.latency = latency = model_done - t0
        self.stats.latency(latency)
        chunk = self.controller.on_chunk(request, pred.actions, self.clock_s(), latency)
        if chunk is None:
            return
        msg = chunk_msg(chunk, self.get_parameter('command_frame_id').value, policy.model_id)
        self.chunk_pub.publish(msg)
        self.path_pub.publish(planned_path(chunk, np.asarray(self.get_parameter('action_scale').value), msg))
        # the node's own work for this chunk, the model and the wait for the worker excluded
        self.stats.duration('node_work', request.intake_s + time.perf_counter() - model_done)

    # -- control (timer) ------------------------------------------------------------------------------
    def _on_control_tick(self) -> None:
        self.controller.tick(self.clock_s(), self._now_ns(), self._send)

    def _send(self, cmd: Command) -> Command:
        """The command in every form, under the controller's lock; the one sent (a hold, if the gate refused)."""
        return self.drivers.send(cmd, self.command_pub, lambda reason: self.controller.make_hold(cmd.stamp_ns, reason))

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def clock_s(self) -> float:
        """The controller's clock (watchdog, goal time limits): the ROS clock under use_sim_time, as the control
        timer runs on it (a sim slower than real time is not a stalled model), else monotonic time."""
        return self._now_ns() * 1e-9 if self.sim_time else time.monotonic()

    def _publish_diagnostics(self) -> None:
        ctrl, policy = self.controller, self.policy
        values = {'lifecycle': self._state_machine.current_state[1], 'model': policy.model_id if policy else '',
                  'device': str(policy.device) if policy else '', 'enabled': str(ctrl.settings.enabled),
                  'estop': str(ctrl.estop), 'instruction': ctrl.instruction or '', 'idle': str(ctrl.idle()).lower(),
                  **self.stats.snapshot()}
        level, message = (1, 'e-stop latched') if ctrl.estop else (0, 'running')
        self.diag_pub.publish(diagnostics_msg(self, 'worldvla: action node', level, message, values))


def main(args: list[str] | None = None) -> int:
    return spin_node(ActionNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
