"""Action node: camera + instruction in → ActionChunk and 7-DoF end-effector commands out.

Subscriptions only validate and store (newest frame wins); inference runs in a worker thread;
a control timer publishes the chunk's commands at ``control_rate_hz`` and a hold command when
no fresh chunk is there (watchdog) or the e-stop is latched. Every limit (clamp, step limit,
dry run) is applied to each command as it goes out, with the values in force at that moment.

A task can also come as a goal of the ``worldvla/run_instruction`` action (RunInstruction): it
runs until the success signal (a ``std_msgs/Bool`` on ``success_topic``), its step or time
limit, a cancel, a newer goal (preempted, or the newer one rejected: ``goal_policy``), an e-stop
or a model error; whatever ends it, the robot holds. While a goal runs, ``instruction`` messages
are counted and ignored.

What a command consumer sees: one command per control period while the node runs (motion or
hold), a hold as the last command when it shuts down or fails, and silence only if the process
is killed outright. The command publisher offers a deadline of two control periods, so a
consumer that requests a deadline gets a "deadline missed" event when commands stop; it must
then stop the robot (each command is a displacement for one period, never a standing order).
"""
from __future__ import annotations

import gc
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point, PoseStamped, TwistStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time
from std_msgs.msg import Bool, Float64MultiArray, Header, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
from visualization_msgs.msg import Marker, MarkerArray
from worldvla.action import RunInstruction
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.chunk_merge import merge_chunk
from worldvla_ros.image_conversion import ImageRejected
from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN, LIBERO_ACTION_SCALE
from worldvla_ros.model.prompts import MAX_INSTRUCTION_CHARS, check_instruction, normalize_instruction
from worldvla_ros.nodes.common import (
    CAMERA_PARAMETERS,
    MODEL_PARAMETERS,
    CameraInput,
    GuardedLifecycleNode,
    Param,
    StartupError,
    declare_all,
    diagnostics_msg,
    load_node_policy,
    reject_changes_of,
    release_memory,
    reliable_qos,
    spin_node,
)
from worldvla_ros.robot_outputs import (
    DriverOutputs,
    action_scale_problem,
    gripper_positions,
    output_problem,
    pose_target,
    twist_from_action,
)
from worldvla_ros.safety import SafetyFilter, SafetyLimits, UnsafeChunk, at_rest, changed_values

if TYPE_CHECKING:  # torch and transformers load with the model (configure), not at import: a refused start is quick
    from worldvla_ros.model.policy import WorldVLAPolicy

PARAMETERS: dict[str, Param] = {
    **MODEL_PARAMETERS,
    **CAMERA_PARAMETERS,
    'chunk_size': Param(0, 'actions per chunk; 0 = the checkpoint’s (5, or 10 for LIBERO-10)', 0, 64,
                        read_only=True),
    'history_frames': Param(0, 'camera frames per prompt; 0 = the checkpoint’s (2)', 0, 2, read_only=True),
    'batched_decoding': Param(True, 'decode the K actions together over the shared prompt (same tokens, faster)'),
    'control_rate_hz': Param(10.0, 'rate at which chunk commands are published', 0.5, 500.0, read_only=True),
    'max_obs_age': Param(0.5, 'seconds; older camera frames (by header stamp) are rejected', 0.0, 600.0),
    'watchdog_timeout': Param(1.0, 'seconds without a fresh chunk before hold commands are sent', 0.01, 600.0),
    'enabled': Param(False, 'false: commands carry dry_run=true and must not be executed'),
    'command_frame_id': Param('ee_delta', 'frame_id of published commands and the planned path'),
    'action_min': Param(list(LIBERO_ACTION_MIN), 'per-dimension lower clamp of commands (7 values)'),
    'action_max': Param(list(LIBERO_ACTION_MAX), 'per-dimension upper clamp of commands (7 values)'),
    'max_step': Param([0.0] * 7, 'largest change of each dimension between consecutive commands sent '
                      '(holds included, so motion ramps up again after one); 0 = none, never negative'),
    'action_scale': Param(list(LIBERO_ACTION_SCALE), 'metres (Δxyz, at most 1) and radians (Δrotation, at most π) one '
                          'action unit moves, gripper 1, all ≥ 0: driver outputs and the planned path are converted '
                          'with it; evaluate_bag reports errors with it (default: LIBERO OSC_POSE, 0.05 m and '
                          '0.5 rad)'),
    'warmup': Param(True, 'run one inference when configuring, before going active', read_only=True),
    'decode_capture': Param('auto', 'the chunk decode step recorded once per shape: cuda_graph (CUDA graphs), '
                            'compile (torch.compile), off, or auto (cuda_graph on a CUDA device, off on a CPU); '
                            'recorded and checked against the uncaptured step by the warm-up', read_only=True,
                            choices=('auto', 'cuda_graph', 'compile', 'off')),
    'autostart': Param(True, 'configure and activate at start-up; false: stay unconfigured for a lifecycle manager '
                       '(the change_state service, or launch with autostart:=false)', read_only=True),
    'replan_threshold': Param(-1, 'next inference only once at most this many commands are queued; '
                              '-1 = on every new frame (the new chunk replaces the queue)', -1, 64),
    'chunk_merge': Param('replace', 'a new chunk and the actions still queued: replace (the newest wins) or '
                         'ensemble (ACT temporal ensembling: each step runs the weighted mean of all its '
                         'predictions, weights exp(-ensemble_decay·i), i = 0 the oldest)',
                         choices=('replace', 'ensemble')),
    'ensemble_decay': Param(0.01, 'chunk_merge ensemble: larger = older predictions count more', 0.0, 10.0),
    'success_topic': Param('', 'std_msgs/Bool topic whose true ends a running goal as succeeded '
                           '(the tabletop sim: sim/success); empty: goals end on their limits', read_only=True),
    'min_goal_interval': Param(0.1, 'seconds; a goal arriving sooner than this after the last accepted one is '
                               'rejected (counted rejected_goal_rate): no task runs for less than a control '
                               'period, and a flood of goals cannot starve the control loop', 0.0, 60.0),
    'goal_policy': Param('preempt', 'a goal arriving while one runs: preempt (the running one ends as PREEMPTED) '
                         'or reject (the new one is refused)', choices=('preempt', 'reject')),
    # the same commands in forms drivers take (worldvla_ros/robot_outputs.py has the conventions)
    'twist_topic': Param('', 'geometry_msgs/TwistStamped out, m/s and rad/s (MoveIt Servo: '
                         '/servo_node/delta_twist_cmds); empty: off', read_only=True),
    'twist_frame_id': Param('base_link', 'frame_id of the twists: the frame the actions are expressed in'),
    'pose_topic': Param('', 'geometry_msgs/PoseStamped absolute end-effector targets out (pose-tracking '
                        'controllers); empty: off', read_only=True),
    'pose_feedback_topic': Param('', 'geometry_msgs/PoseStamped in: the measured end-effector pose targets start '
                                 'from (needed with pose_topic); targets are in its frame', read_only=True),
    'pose_feedback_timeout': Param(0.5, 'seconds; a measured pose stamped longer ago gives no target (counted)',
                                   0.0, 600.0),
    'gripper_output': Param('none', 'none, forward_command (std_msgs/Float64MultiArray for ros2_control’s forward '
                            'command controller) or joint_trajectory (trajectory_msgs/JointTrajectory)',
                            read_only=True, choices=('none', 'forward_command', 'joint_trajectory')),
    'gripper_topic': Param('gripper_controller/commands', 'topic of gripper_output', read_only=True),
    'gripper_joints': Param(['gripper_joint'], 'gripper joint names (joint_trajectory)', read_only=True),
    'gripper_open': Param([0.04], 'gripper joint positions when open (action −1), one per joint'),
    'gripper_closed': Param([0.0], 'gripper joint positions when closed (action +1), one per joint'),
}

Outcome = RunInstruction.Result
OUTCOME_NAMES = {getattr(Outcome, n): n.lower() for n in (
    'SUCCEEDED', 'STEP_LIMIT', 'TIME_LIMIT', 'CANCELED', 'PREEMPTED', 'ESTOPPED', 'MODEL_ERROR', 'SHUTDOWN',
    'DEACTIVATED')}


@dataclass
class Goal:
    """A RunInstruction goal as the control loop sees it; ``outcome`` is set once, under the node's lock."""

    handle: ServerGoalHandle
    instruction: str
    max_steps: int
    time_limit: float
    start: float = field(default_factory=time.monotonic)
    chunks: int = 0
    steps: int = 0
    outcome: int | None = None
    message: str = ''
    end: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


LIMIT_PARAMETERS = ('action_min', 'action_max', 'max_step')  # SafetyLimits' fields, in order


def _check_seven(name: str, non_negative: bool = False):
    def check(value: Any) -> str | None:
        if len(value) != 7 or not all(np.isfinite(value)):
            return f'{name} needs 7 finite values'
        if non_negative and min(value) < 0:
            return f'{name} must be ≥ 0 in every dimension, got {list(value)}'
        return None

    return check


def _check_frame_id(value: Any) -> str | None:
    return None if str(value).strip() else 'must name a frame (commands and the planned path are stamped with it)'


class ActionNode(GuardedLifecycleNode):
    """A managed node: configure loads the model and warms it up, activate starts commanding, deactivate
    holds and stops, cleanup releases the model. ``autostart`` (default) goes to active by itself."""

    def __init__(self, policy_loader: Callable[..., Any] = load_node_policy, **kwargs: Any) -> None:
        """``policy_loader(parameters, **overrides)``: how configure gets its model (default: load the
        checkpoint; the fleet node passes one shared, batching policy)."""
        super().__init__('worldvla_action', **kwargs)
        self._policy_loader = policy_loader
        p = declare_all(self, PARAMETERS)
        self._start_params = p
        for name, check in (('action_scale', action_scale_problem), ('command_frame_id', _check_frame_id)):
            problem = check(p[name])
            if problem:
                raise StartupError(f'invalid {name}: {problem}')
        try:
            self.safety = SafetyFilter(SafetyLimits(*(tuple(p[n]) for n in LIMIT_PARAMETERS)))
        except ValueError as exc:
            raise StartupError(f'invalid safety limits: {exc}') from exc
        self._check_outputs(p)
        self.policy: WorldVLAPolicy | None = None  # loaded by configure, released by cleanup
        self._commanding = False  # lifecycle state active
        self._finalized = False  # lifecycle state finalized: nothing is accepted any more
        self._configure_error = ''
        self.rate = float(p['control_rate_hz'])
        self._guard_params = reject_changes_of(
            {n for n, q in PARAMETERS.items() if q.read_only},
            {'action_min': _check_seven('action_min'), 'action_max': _check_seven('action_max'),
             'max_step': _check_seven('max_step', non_negative=True),
             'action_scale': action_scale_problem, 'command_frame_id': _check_frame_id,
             'goal_policy': PARAMETERS['goal_policy'].check_choice,
             'chunk_merge': PARAMETERS['chunk_merge'].check_choice,
             'gripper_open': self._check_gripper, 'gripper_closed': self._check_gripper},
        )
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._lock = threading.Lock()
        # model-resolution crops, not camera frames: bounded memory whatever the camera sends
        self._history: deque[tuple[np.ndarray, TimeMsg]] = deque(maxlen=1)  # the model's length at configure
        self._fresh = False  # a frame arrived that no inference has used yet
        self._newest_frame_times = (0.0, time.perf_counter())  # (intake s, perf_counter when stored)
        self._chunk_intake = 0.0
        self._frame_event = threading.Event()
        self._instruction: str | None = None
        self._instruction_version = 0
        self._estop = False
        self._epoch = 0  # +1 at every e-stop and reset: an inference from an older epoch never moves the robot
        self._reset_stamp_ns = 0  # frames stamped before the last e-stop reset are never used
        self._queue: deque[EndEffectorCommand] = deque()
        self._blended: deque[int] = deque()  # per queued command: the predictions it averages (chunk_merge)
        self._queue_time = 0.0  # monotonic time the current chunk arrived
        self._last_sent = at_rest()  # the step limit applies from here, holds included
        self._active = False
        self._sequence = 0
        self._running = False  # the inference worker runs (configured)
        self._worker: threading.Thread | None = None
        self._closing = False
        self._inferring = False
        self._goal: Goal | None = None  # the running RunInstruction goal
        self._goal_end_hold = False  # a goal ended: the next tick holds, whatever is queued
        self._accepted: dict[bytes, Goal] = {}  # accepted goals whose execute callback has not picked them up
        self._last_goal_accepted = -math.inf  # monotonic time (min_goal_interval)
        self._last_send_time: float | None = None  # monotonic time of the last command sent (its interval)
        self._last_latency = math.nan
        self._surprise_psnr = math.nan

        sensors = MutuallyExclusiveCallbackGroup()
        control = MutuallyExclusiveCallbackGroup()
        self.chunk_pub = self.create_publisher(ActionChunk, 'worldvla/action_chunk', reliable_qos())
        command_qos = reliable_qos(50)
        command_qos.deadline = Duration(seconds=2.0 / self.rate)
        self.command_pub = self.create_publisher(EndEffectorCommand, 'worldvla/ee_command', command_qos)
        self.path_pub = self.create_publisher(MarkerArray, 'worldvla/planned_path', reliable_qos(1))
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', reliable_qos())
        self._measured_pose: PoseStamped | None = None
        self.twist_pub = self.create_publisher(TwistStamped, p['twist_topic'], command_qos) \
            if p['twist_topic'] else None
        self.pose_pub = self.create_publisher(PoseStamped, p['pose_topic'], command_qos) if p['pose_topic'] else None
        if p['pose_topic']:
            self.create_subscription(PoseStamped, p['pose_feedback_topic'], self._on_measured_pose,
                                     qos_profile_sensor_data, callback_group=sensors)
        gripper_type = {'forward_command': Float64MultiArray, 'joint_trajectory': JointTrajectory}.get(
            p['gripper_output'])
        self.gripper_pub = self.create_publisher(gripper_type, p['gripper_topic'], command_qos) \
            if gripper_type else None
        CameraInput(self, p['use_compressed'], self._store_frame, self._on_camera_reject, sensors)
        # its own group: a slow frame never delays a new instruction
        self.create_state_subscription(String, 'instruction', self._on_instruction,
                                       callback_group=MutuallyExclusiveCallbackGroup())
        self.create_state_subscription(Bool, 'worldvla/estop', self._on_estop, callback_group=control, once=False)
        self.create_service(Trigger, 'worldvla/reset_estop', self._on_reset_estop, callback_group=control)
        goals = ReentrantCallbackGroup()  # a running goal's execute callback waits; cancels and new goals must not
        requests = reliable_qos(1000)  # a burst of requests is queued and answered, not dropped (default: 10)
        self._action_server = ActionServer(
            self, RunInstruction, 'worldvla/run_instruction',
            goal_service_qos_profile=requests, cancel_service_qos_profile=requests,
            result_service_qos_profile=requests,
            execute_callback=self._execute_goal,
            goal_callback=self._guard(self._on_goal_request, 'goal request', lambda: GoalResponse.REJECT),
            handle_accepted_callback=self._guard(self._on_goal_accepted, 'goal start'),
            cancel_callback=self._guard(self._on_cancel_request, 'cancel request', lambda: CancelResponse.ACCEPT),
            callback_group=goals)
        if p['success_topic']:
            self.create_subscription(Bool, p['success_topic'], self._on_success, reliable_qos(10),
                                     callback_group=control)
        self.create_subscription(Float64MultiArray, 'worldvla/surprise', self._on_surprise, reliable_qos(10),
                                 callback_group=MutuallyExclusiveCallbackGroup())
        # the control tick has a group of its own: no input (e-stop, reset, success) ever waits it out
        self.create_timer(1.0 / self.rate, self._on_control_tick, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        if p['autostart']:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise StartupError(self._configure_error or 'configure failed')
            self.trigger_activate()
        else:
            self.get_logger().info('unconfigured: waiting for the lifecycle transitions configure and activate '
                                   '(from the launch file, or your lifecycle manager)')

    # -- lifecycle ----------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load and warm up the model; start the inference worker (nothing is commanded yet)."""
        try:
            policy = self._load_policy(self._start_params)
        except StartupError as exc:
            self._configure_error = str(exc)
            if not self._start_params['autostart']:  # with autostart the process ends with this as its FATAL line
                self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        with self._lock:
            self.policy = policy
            self._history = deque(maxlen=policy.config.history_frames)
            self._fresh = False
            if self._instruction is not None:  # received while unconfigured: now the model's own limits
                try:
                    self._instruction = policy.check_instruction(self._instruction)
                except ValueError as exc:
                    self._reject('instruction', str(exc))
                    self._instruction = None
            self._running = True
        self._worker = threading.Thread(target=self._inference_loop, name='worldvla-inference', daemon=True)
        self._worker.start()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            # frames are taken from now on (older ones by their age, max_obs_age); nothing computed before moves
            self._epoch += 1
            self._history.clear()
            self._fresh = False
            self._commanding = True
        self.get_logger().info(
            f'active: model {self.policy.model_id} on {self.policy.device}, K={self.policy.chunk_size}, '
            f'{self.rate:g} Hz, {"ENABLED" if self._param("enabled") else "dry run (enabled:=false)"}'
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Hold, then stop commanding: no command goes out until activated again."""
        with self._lock:
            self._end_goal(Outcome.DEACTIVATED, 'the node was deactivated')
            self._clear_queue()
            self._epoch += 1
            if self._active:
                self._last_sent = self._send(self._hold())
                self.stats.count('holds_deactivate')
            self._active = False
            self._last_send_time = None
            self._commanding = False
        self.get_logger().info('inactive: holding, no commands until activated')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and release the model (and its GPU memory)."""
        if not self._stop_worker():
            self.get_logger().error('cleanup: the inference worker did not stop')
            return TransitionCallbackReturn.FAILURE
        with self._lock:
            device = str(self.policy.device) if self.policy is not None else 'cpu'
            self.policy = None
            self._history.clear()
            self._fresh = False
        release_memory(device)
        self.get_logger().info('unconfigured: model released')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """From any state: as deactivate (a hold if anything was commanded, the running goal ended), then
        nothing more: goals and instructions are refused, the model released, and the process ends."""
        with self._lock:
            self._end_goal(Outcome.SHUTDOWN, 'the node was shut down (lifecycle)')
            self._clear_queue()
            self._epoch += 1
            commanded = self._active or (self._estop and self._commanding)
            if commanded:
                self._last_sent = self._send(self._hold())
                self.stats.count('holds_shutdown')
            self._active = False
            self._last_send_time = None
            self._commanding = False
            self._finalized = True
        if not self._stop_worker(timeout=2.0):
            self.get_logger().error('shutdown: the inference worker did not stop')
        with self._lock:
            self.policy = None
        self.get_logger().info('finalized: holding, no more commands; the process ends')
        self.finished.set()
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self, timeout: float = 5.0) -> bool:
        with self._lock:
            self._running = False
        self._frame_event.set()
        if self._worker is not None:
            self._worker.join(timeout=timeout)
            if self._worker.is_alive():
                return False
        self._worker = None
        return True

    # -- start-up ---------------------------------------------------------------------------
    def _check_outputs(self, p: dict[str, Any]) -> None:
        if p['pose_topic'] and not p['pose_feedback_topic']:
            raise StartupError('pose_topic needs pose_feedback_topic: targets start from the measured pose')
        if p['gripper_output'] != 'none':
            for name in ('gripper_open', 'gripper_closed'):
                problem = self._check_gripper(p[name])
                if problem:
                    raise StartupError(f'{name}: {problem}')

    def _check_gripper(self, value: Any) -> str | None:
        joints = len(self._param('gripper_joints'))
        if len(value) != joints or not all(np.isfinite(value)):
            return f'needs {joints} finite joint positions (one per gripper_joints entry), got {list(value)}'
        return None

    def _load_policy(self, p: dict[str, Any]):
        overrides = {k: p[k] for k in ('chunk_size', 'history_frames') if p[k]}
        t0 = time.perf_counter()
        policy = self._policy_loader(p, **overrides)
        try:
            policy.capture_decoding(p['decode_capture'])
        except ValueError as exc:  # e.g. cuda_graph asked for a CPU device
            raise StartupError(f'parameter decode_capture: {exc}') from exc
        if p['warmup']:
            try:
                policy.warmup()
            except Exception as exc:  # a model that cannot answer must not go active
                raise StartupError(f'warm-up inference failed: {exc}') from exc
        if policy.engine.capture_error:
            self.get_logger().warning(f'decode step not captured: {policy.engine.capture_error}')
        captured = f', decode step captured ({policy.engine.captured})' if policy.engine.captured else ''
        self.get_logger().info(f'loaded {policy.model_id} in {time.perf_counter() - t0:.1f} s{captured}')
        # the model's objects (modules, the tokenizer's vocabulary) live as long as it does: out of the collector's
        # full passes, which otherwise walk them all and stopped the control loop for up to 0.15 s
        gc.collect()
        gc.freeze()
        return policy

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        """Refuses read-only and malformed values; new limits take effect with the next command sent."""
        result = self._guard_params(params)
        changed = {p.name: p.value for p in params if p.name in LIMIT_PARAMETERS}
        if not result.successful or not changed:
            return result
        try:
            limits = SafetyLimits(*(tuple(changed.get(n, self._param(n))) for n in LIMIT_PARAMETERS))
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.safety = SafetyFilter(limits)
        self.get_logger().warning(f'safety limits changed: {", ".join(sorted(changed))}')
        return result

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    # -- inputs (fast: validate, store, return) ---------------------------------------------
    def _store_frame(self, rgb: np.ndarray, header: Header, received: float) -> None:
        policy = self.policy
        if policy is None or not self._commanding:
            self.stats.count('frames_ignored_inactive')  # read again after activation, never before
            return
        stamp_ns = Time.from_msg(header.stamp).nanoseconds
        frame = policy.model_frame(rgb)
        with self._lock:
            if stamp_ns < self._reset_stamp_ns:
                self._reject('before_reset', 'frame stamped before the last e-stop reset')
                return
            if self._fresh:
                self.stats.count('frames_dropped')  # the worker never saw the previous one
            self._history.append((frame, header.stamp))
            self._fresh = True
            now = time.perf_counter()
            # the newest frame's intake (conversion, checks, storing) and when it became available
            self._newest_frame_times = (now - received, now)
        self._frame_event.set()

    def _on_camera_reject(self, exc: ImageRejected) -> None:
        self._reject(exc.reason, str(exc))

    def _on_instruction(self, msg: String) -> None:
        self.stats.count('instructions_received')
        if self._finalized:
            self.stats.count('instructions_ignored_finalized')
            return
        policy = self.policy
        try:
            text = policy.check_instruction(msg.data) if policy is not None else check_instruction(
                msg.data, MAX_INSTRUCTION_CHARS)  # before a model says its own limit (checked again at configure)
        except ValueError as exc:
            self._reject('instruction', str(exc))
            return
        with self._lock:
            if self._goal is not None:
                self.stats.count('instructions_ignored_during_goal')
                return
            if text == self._instruction:
                return
            self._instruction = text
            self._instruction_version += 1
            self._clear_queue()  # commands of the old task must not run
        self.stats.count('instruction_changes')
        self.say('info', 'instruction', f'instruction: {text!r}', every=1.0)  # the newest is on /diagnostics
        self._frame_event.set()

    def _on_estop(self, msg: Bool) -> None:
        if not msg.data:
            return
        with self._lock:
            newly = not self._estop
            self._estop = True
            self._epoch += 1
            if self._goal is not None:
                self._end_goal(Outcome.ESTOPPED, 'e-stop')
            self._clear_queue()
            self._history.clear()
            self._fresh = False
        if newly:
            self.stats.count('estops')
            self.get_logger().warning('E-STOP latched: holding until /worldvla/reset_estop is called')

    def _on_reset_estop(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        with self._lock:
            was = self._estop
            if was:
                self._estop = False
                self._epoch += 1
                self._reset_stamp_ns = self.get_clock().now().nanoseconds
                self._history.clear()
                self._fresh = False
        resp.success = True
        resp.message = 'e-stop reset: moving again only on frames stamped after now' if was \
            else 'e-stop was not latched'
        self.get_logger().warning(resp.message)
        return resp

    # -- task action (RunInstruction) ---------------------------------------------------------
    def _on_goal_request(self, request: RunInstruction.Goal) -> GoalResponse:
        self.stats.count('goal_requests')
        if not self._commanding or self.policy is None:
            self._reject('goal', 'the node is not active (lifecycle)')
            return GoalResponse.REJECT
        try:
            self.policy.check_instruction(request.instruction)
            if not math.isfinite(request.time_limit) or request.time_limit < 0:
                raise ValueError(f'time_limit must be a finite number of seconds ≥ 0, got {request.time_limit}')
        except ValueError as exc:
            self._reject('goal', str(exc))
            return GoalResponse.REJECT
        with self._lock:
            if self._estop:
                self._reject('goal', 'e-stop latched: call worldvla/reset_estop first')
                return GoalResponse.REJECT
            if self._goal is not None and self._param('goal_policy') == 'reject':
                self._reject('goal', 'a goal is running (goal_policy reject)')
                return GoalResponse.REJECT
            now, interval = time.monotonic(), self._param('min_goal_interval')
            if now - self._last_goal_accepted < interval:
                self._reject('goal_rate', f'a goal {now - self._last_goal_accepted:.3f} s after the last accepted '
                                          f'one (min_goal_interval {interval:g} s)')
                return GoalResponse.REJECT
            self._last_goal_accepted = now
        return GoalResponse.ACCEPT

    def _on_goal_accepted(self, handle: ServerGoalHandle) -> None:
        request = handle.request  # checked once, by _on_goal_request: here only the text it checked
        goal = Goal(handle, normalize_instruction(request.instruction), int(request.max_steps),
                    float(request.time_limit))
        text = goal.instruction
        with self._lock:
            self._accepted[bytes(handle.goal_id.uuid)] = goal
            if self._estop or not self._commanding:  # latched, deactivated or shut down since the request
                goal.outcome, goal.message = (Outcome.ESTOPPED, 'e-stop') if self._estop else (
                    (Outcome.SHUTDOWN, 'the node was shut down') if self._finalized else (
                        Outcome.DEACTIVATED, 'the node was deactivated'))
                goal.end = goal.start
                goal.done.set()
            else:
                if self._goal is not None:
                    self._end_goal(Outcome.PREEMPTED, 'preempted by a newer goal')
                self._goal = goal
                self._instruction = text
                self._instruction_version += 1
                self._clear_queue()  # nothing computed for an earlier task runs
        self.stats.count('goals_accepted')
        self.say('info', 'goal', f'goal: {text!r} (max_steps {goal.max_steps}, time_limit {goal.time_limit:g} s)',
                 every=0.5)
        self._frame_event.set()
        handle.execute()

    def _on_cancel_request(self, handle: ServerGoalHandle) -> CancelResponse:
        with self._lock:  # the robot holds from the next control tick on, before the goal reports canceled
            if self._goal is not None and self._goal.handle is handle:
                self._end_goal(Outcome.CANCELED, 'canceled')
        return CancelResponse.ACCEPT

    def _on_success(self, msg: Bool) -> None:
        if msg.data:
            with self._lock:
                if self._goal is not None:
                    self._end_goal(Outcome.SUCCEEDED, f'success signal on {self._param("success_topic")}')

    def _on_surprise(self, msg: Float64MultiArray) -> None:
        if len(msg.data) >= 2 and math.isfinite(msg.data[1]):
            self._surprise_psnr = float(msg.data[1])

    def _end_goal(self, outcome: int, message: str) -> None:
        """Ends the running goal (lock held): no command of its task is sent after this."""
        goal = self._goal
        if goal is None:
            return
        goal.outcome, goal.message, goal.end = outcome, message, time.monotonic()
        self._goal = None
        self._instruction = None
        self._instruction_version += 1
        self._clear_queue()
        self._goal_end_hold = True
        goal.done.set()

    def _check_goal_limits(self) -> bool:
        """At each control tick (lock held): end the goal on its time limit or a cancel; True once after any end."""
        goal = self._goal
        if goal is not None:
            if goal.max_steps and goal.steps >= goal.max_steps:
                self._end_goal(Outcome.STEP_LIMIT, f'{goal.steps} steps sent (max_steps)')
            elif goal.time_limit and time.monotonic() - goal.start >= goal.time_limit:
                self._end_goal(Outcome.TIME_LIMIT, f'time limit {goal.time_limit:g} s')
            elif goal.handle.is_cancel_requested:
                self._end_goal(Outcome.CANCELED, 'canceled')
        ended, self._goal_end_hold = self._goal_end_hold, False
        return ended

    def _execute_goal(self, handle: ServerGoalHandle) -> RunInstruction.Result:
        with self._lock:
            goal = self._accepted.pop(bytes(handle.goal_id.uuid))
        result = RunInstruction.Result()
        feedback = RunInstruction.Feedback()
        sent = None
        while not goal.done.wait(0.1):
            now = (goal.chunks, goal.steps)
            if now != sent and handle.is_active:
                feedback.chunks, feedback.commands_sent = now
                feedback.last_inference_latency = self._last_latency
                feedback.surprise_psnr = self._surprise_psnr
                handle.publish_feedback(feedback)
                sent = now
        result.outcome, result.message = goal.outcome, goal.message
        result.steps, result.duration = goal.steps, goal.end - goal.start
        self.stats.count(f'goals_{OUTCOME_NAMES[goal.outcome]}')
        self.say('info', 'goal_end', f'goal {goal.instruction!r} ended: {OUTCOME_NAMES[goal.outcome]} '
                 f'({goal.message}), {goal.steps} steps in {result.duration:.1f} s', every=0.5)
        if goal.outcome == Outcome.SUCCEEDED:
            handle.succeed()
        elif goal.outcome == Outcome.CANCELED and handle.is_cancel_requested:
            handle.canceled()
        else:
            handle.abort()
        return result

    def _clear_queue(self) -> None:
        self._queue.clear()
        self._blended.clear()

    def _reject(self, reason: str, detail: str) -> None:
        self.stats.count(f'rejected_{reason}')
        self.say('warning', f'rejected_{reason}', f'rejected ({reason}): {detail}')

    # -- inference (worker thread) ----------------------------------------------------------
    def _inference_loop(self) -> None:
        if self.policy is not None:
            self.policy.use_cpu_threads(self._param('cpu_threads'))
        while self._running:
            if not self._frame_event.wait(timeout=0.1):
                continue
            self._frame_event.clear()
            threshold = self._param('replan_threshold')
            with self._lock:
                if not self._fresh or self._instruction is None or self._estop or not self._commanding:
                    continue
                policy = self.policy
                if threshold >= 0 and len(self._queue) > threshold:
                    continue  # the current chunk runs on; the control tick wakes us when it is short
                self._fresh = False
                self._inferring = True
                history = list(self._history)
                intake, stored_at = self._newest_frame_times
                self.stats.duration('frame_wait', time.perf_counter() - stored_at)  # its age at pick-up
                self._chunk_intake = intake
                instruction, version, epoch = self._instruction, self._instruction_version, self._epoch
            try:
                self._check_and_infer(policy, history, instruction, version, epoch)
            except Exception as exc:  # a defect here must not end the worker: counted, logged, the next frame runs
                self.stats.count('callback_errors')
                self.say('error', 'inference_loop', f'inference loop: {type(exc).__name__}: {exc}')
            finally:
                self._inferring = False

    def _check_and_infer(self, policy: WorldVLAPolicy, history: list[tuple[np.ndarray, TimeMsg]], instruction: str,
                         version: int, epoch: int) -> None:
        newest_stamp = history[-1][1]
        age = (self.get_clock().now() - Time.from_msg(newest_stamp)).nanoseconds * 1e-9
        if age > self._param('max_obs_age'):
            self._reject('stale', f'newest frame is {age:.3f} s old (max_obs_age {self._param("max_obs_age")})')
            return
        if -age > self._param('max_future_stamp'):  # the clock went back (sim time restarted)
            self._reject('future_stamp', f'newest frame is stamped {-age:.3f} s ahead of the clock')
            return
        self.stats.count('frames_used')
        try:
            self._infer(policy, history, instruction, version, epoch)
        except Exception as exc:  # never let one bad inference kill the worker
            if not self.context.ok() or not self._running:
                return  # shutting down
            from worldvla_ros.model import NonFiniteLogits

            if isinstance(exc, NonFiniteLogits):
                self._reject('non_finite_output', str(exc))
            else:
                self.stats.count('inference_errors')
                self.get_logger().error(f'inference failed: {exc!r}', throttle_duration_sec=2.0)
            with self._lock:
                if self._goal is not None and version == self._instruction_version:
                    self._end_goal(Outcome.MODEL_ERROR, f'inference failed: {exc}')

    def _infer(self, policy: WorldVLAPolicy, history: list[tuple[np.ndarray, TimeMsg]], instruction: str,
               version: int, epoch: int) -> None:
        t0 = time.perf_counter()
        pred = policy.predict([f for f, _ in history], instruction, batched=self._param('batched_decoding'))
        model_done = time.perf_counter()
        latency = model_done - t0
        self.stats.latency(latency)
        self._last_latency = latency
        with self._lock:
            previous = self._last_sent
        try:
            safe, changed = self.safety.apply(pred.actions, previous)
        except UnsafeChunk as exc:
            self._reject('unsafe_chunk', str(exc))
            with self._lock:
                if self._goal is not None and version == self._instruction_version:
                    self._end_goal(Outcome.MODEL_ERROR, f'unsafe chunk: {exc}')
            return
        if changed:
            self.stats.count('values_limited', changed)
        stamp = history[-1][1]
        chunk = ActionChunk()
        chunk.header.stamp = stamp
        chunk.header.frame_id = self._param('command_frame_id')
        chunk.observation_stamps = [s for _, s in history]
        chunk.instruction = instruction
        chunk.raw_actions = pred.actions.reshape(-1).astype(float).tolist()
        chunk.inference_latency = latency
        chunk.model_id = policy.model_id
        with self._lock:
            if version != self._instruction_version or epoch != self._epoch or self._estop or self._closing:
                self.stats.count('chunks_discarded')  # the task changed, or an e-stop came, while we thought
                return
            chunk.sequence = self._sequence
            self._sequence += 1
            queued = np.array([c.action for c in self._queue], dtype=np.float64).reshape(-1, 7)
            merged, blended = merge_chunk(queued, np.array(self._blended), safe, self._param('chunk_merge'),
                                          self._param('ensemble_decay'))
            chunk.commands = [self._command(a, i, len(merged), chunk) for i, a in enumerate(merged)]
            self._queue = deque(chunk.commands)
            self._blended = deque(int(b) for b in blended)
            self._queue_time = time.monotonic()
            self._active = True
            if self._goal is not None:
                self._goal.chunks += 1
        self.chunk_pub.publish(chunk)
        self.path_pub.publish(self._planned_path(chunk, merged))
        self.stats.count('chunks')
        # the node's own work for this chunk, the model and the wait for the worker excluded
        self.stats.duration('node_work', self._chunk_intake + time.perf_counter() - model_done)

    def _command(self, action: np.ndarray, index: int, size: int, chunk: ActionChunk) -> EndEffectorCommand:
        cmd = EndEffectorCommand(index=index, chunk_size=size, chunk_sequence=chunk.sequence,
                                 dry_run=not self._param('enabled'))
        cmd.header = chunk.header
        cmd.action = np.asarray(action, dtype=np.float64)
        return cmd

    def _planned_path(self, chunk: ActionChunk, actions: np.ndarray) -> MarkerArray:
        scale = np.asarray(self._param('action_scale')[:3], dtype=np.float64)
        points = np.vstack([np.zeros(3), np.cumsum(actions[:, :3] * scale, axis=0)])
        line = Marker(ns='worldvla_plan', id=0, type=Marker.LINE_STRIP, action=Marker.ADD)
        line.header = chunk.header
        line.scale.x = 0.01
        line.color.r, line.color.g, line.color.a = 0.1, 0.9, 1.0
        line.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in points]
        dots = Marker(ns='worldvla_plan', id=1, type=Marker.SPHERE_LIST, action=Marker.ADD)
        dots.header = chunk.header
        dots.scale.x = dots.scale.y = dots.scale.z = 0.03
        dots.color.r, dots.color.b, dots.color.a = 1.0, 0.2, 1.0
        dots.points = line.points[1:]
        return MarkerArray(markers=[line, dots])

    # -- control (timer) --------------------------------------------------------------------
    def _hold(self) -> EndEffectorCommand:
        cmd = EndEffectorCommand(hold=True, dry_run=not self._param('enabled'), chunk_sequence=self._sequence)
        cmd.header.stamp = self.get_clock().now().to_msg()
        cmd.header.frame_id = self._param('command_frame_id')
        cmd.action = self.safety.hold(self._last_sent)
        return cmd

    def _on_control_tick(self) -> None:
        with self._lock:
            if self._closing or not self._commanding:
                return  # close() sends the last command; inactive: nothing is commanded
            goal_ended = self._check_goal_limits()
            fresh = time.monotonic() - self._queue_time <= self._param('watchdog_timeout')
            if self._estop:
                cmd, reason = None, 'estop'
            elif goal_ended and self._active:
                cmd, reason = None, 'goal_end'
            elif self._queue and fresh:
                cmd, reason = self._queue.popleft(), ''
                self._blended.popleft()
                if self._goal is not None:
                    self._goal.steps += 1  # the limit ends the goal at the next tick: its last step is sent first
            elif self._active:
                self._clear_queue()
                cmd, reason = None, 'watchdog'
            else:
                return  # nothing commanded yet: stay silent
            limited = 0
            if cmd is None:  # stopping is never rate-limited
                cmd = self._hold()
            else:
                # every limit as it stands now, against the command actually sent last: limits changed
                # at runtime and holds sent since the chunk was computed count
                planned = np.asarray(cmd.action, dtype=np.float64)
                action = self.safety.limit(planned, self._last_sent)
                limited = changed_values(action, planned)
                cmd.action = action
                cmd.dry_run = not self._param('enabled')
                if len(self._queue) <= self._param('replan_threshold'):
                    self._frame_event.set()
            # sent under the lock: a cancel, e-stop or new goal is either before this command (then it is a
            # hold) or after it was published, never in between
            self._last_sent = self._send(cmd)
            now = time.monotonic()
            if self._last_send_time is not None:
                self.stats.duration('command_interval', now - self._last_send_time)
            self._last_send_time = now
        if reason:
            self.stats.count(f'holds_{reason}')
        if limited:
            self.stats.count('values_limited', limited)

    def _send(self, cmd: EndEffectorCommand) -> np.ndarray:
        """The command, and the same command in every configured driver form (none of them in a dry run), after
        the last gate: a command or form that is not finite or beyond the limits in force goes out as a hold.
        Returns the action sent."""
        outputs = self._driver_outputs(cmd)
        problem = self._output_problem(cmd, outputs)
        if problem:
            self.stats.count('rejected_output_gate')
            self.get_logger().error(f'not sent, holding instead: {problem}', throttle_duration_sec=2.0)
            cmd = self._hold()
            outputs = self._driver_outputs(cmd)
            if self._output_problem(cmd, outputs):  # never: a hold moves nothing and keeps the gripper
                return self._last_sent
        self.command_pub.publish(cmd)
        if outputs is None:
            return np.asarray(cmd.action, dtype=np.float64)
        stamp = self.get_clock().now().to_msg()
        if outputs.twist is not None:
            twist = TwistStamped()
            twist.header.stamp, twist.header.frame_id = stamp, self._param('twist_frame_id')
            t = twist.twist
            t.linear.x, t.linear.y, t.linear.z = map(float, outputs.twist[0])
            t.angular.x, t.angular.y, t.angular.z = map(float, outputs.twist[1])
            self.twist_pub.publish(twist)
        if outputs.pose is not None:
            target = PoseStamped()
            target.header.stamp, target.header.frame_id = stamp, self._measured_pose.header.frame_id
            target.pose.position.x, target.pose.position.y, target.pose.position.z = map(float, outputs.pose[0])
            o = target.pose.orientation
            o.x, o.y, o.z, o.w = map(float, outputs.pose[1])
            self.pose_pub.publish(target)
        if outputs.gripper is not None:
            q = outputs.gripper.tolist()
            if self._param('gripper_output') == 'forward_command':
                self.gripper_pub.publish(Float64MultiArray(data=q))
            else:  # a zero stamp: the controller starts the point on receipt
                point = JointTrajectoryPoint(positions=q, time_from_start=Duration(seconds=1.0 / self.rate).to_msg())
                self.gripper_pub.publish(JointTrajectory(joint_names=list(self._param('gripper_joints')),
                                                         points=[point]))
        return np.asarray(cmd.action, dtype=np.float64)

    def _driver_outputs(self, cmd: EndEffectorCommand) -> DriverOutputs | None:
        """Every configured driver form of ``cmd``; None when there are none to send (none configured, dry run)."""
        if not (self.twist_pub or self.pose_pub or self.gripper_pub):
            return None
        if cmd.dry_run:
            self.stats.count('driver_outputs_dry_run')
            return None
        action = np.asarray(cmd.action, dtype=np.float64)
        scale = np.asarray(self._param('action_scale'), dtype=np.float64)
        out = DriverOutputs()
        if self.twist_pub is not None:
            out.twist = twist_from_action(action, scale, 1.0 / self.rate)
        if self.pose_pub is not None:
            out.pose = self._pose_target(action, scale)
        if self.gripper_pub is not None:
            out.gripper = gripper_positions(action[EndEffectorCommand.GRIPPER], self._param('gripper_open'),
                                            self._param('gripper_closed'))
        return out

    def _output_problem(self, cmd: EndEffectorCommand, outputs: DriverOutputs | None) -> str | None:
        limits = self.safety.limits
        measured = self._measured_pose
        position = None if measured is None else np.array(
            [measured.pose.position.x, measured.pose.position.y, measured.pose.position.z])
        return output_problem(cmd.action, outputs or DriverOutputs(), limits.action_min, limits.action_max,
                              self._param('action_scale'), 1.0 / self.rate, position, self._param('gripper_open'),
                              self._param('gripper_closed'), hold=cmd.hold)

    def _on_measured_pose(self, msg: PoseStamped) -> None:
        self._measured_pose = msg

    def _pose_target(self, action: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        measured = self._measured_pose
        if measured is None:
            self.stats.count('pose_targets_skipped_no_pose')
            return None
        age = (self.get_clock().now() - Time.from_msg(measured.header.stamp)).nanoseconds * 1e-9
        if age > self._param('pose_feedback_timeout'):
            self.stats.count('pose_targets_skipped_stale_pose')
            self.get_logger().warning(f'no pose target: the measured pose is {age:.2f} s old',
                                      throttle_duration_sec=2.0)
            return None
        m = measured.pose
        try:
            return pose_target(np.array([m.position.x, m.position.y, m.position.z]),
                               np.array([m.orientation.x, m.orientation.y, m.orientation.z, m.orientation.w]),
                               action, scale)
        except ValueError as exc:
            self._reject('measured_pose', str(exc))
            return None

    def _publish_diagnostics(self) -> None:
        with self._lock:  # idle: no chunk left to run, no inference running or waiting for one
            idle = not self._queue and not self._inferring and not self._fresh
        policy = self.policy
        values = {'lifecycle': self._state_machine.current_state[1], 'model': policy.model_id if policy else '',
                  'device': str(policy.device) if policy else '',
                  'enabled': str(self._param('enabled')), 'estop': str(self._estop),
                  'instruction': self._instruction or '', 'idle': str(idle).lower(), **self.stats.snapshot()}
        level, message = (1, 'e-stop latched') if self._estop else (0, 'running')
        self.diag_pub.publish(diagnostics_msg(self, 'worldvla: action node', level, message, values))

    def close(self) -> bool:
        """Stop the worker and, if anything was commanded, send one last hold (delivery awaited briefly)."""
        with self._lock:
            self._closing = True
            self._running = False  # before the hold: no inference starts meanwhile
            self._end_goal(Outcome.SHUTDOWN, 'the node is shutting down')
            self._clear_queue()
            commanded = self._active or (self._estop and self._commanding)
            last = self._hold() if commanded else None
        self._frame_event.set()
        if last is not None and self.context.ok():
            self._send(last)
            self.stats.count('holds_shutdown')
            self.command_pub.wait_for_all_acked(Duration(seconds=0.5))
        return self._stop_worker(timeout=2.0)


def main(args: list[str] | None = None) -> int:
    return spin_node(ActionNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
