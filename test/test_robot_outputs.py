"""Driver outputs: TwistStamped (MoveIt Servo), PoseStamped targets, gripper for ros2_control.

Conversions by hand first; then real action-node processes, whose every driver message must be
the conversion of the EndEffectorCommand sent in the same control period, limits, holds, e-stop
and dry run included.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import PoseStamped, TwistStamped
from harness import Harness, NodeProcess
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time
from scipy.spatial.transform import Rotation
from std_msgs.msg import Bool, Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from worldvla_ros.bringup import default_config
from worldvla_ros.nodes.common import reliable_qos
from worldvla_ros.robot_outputs import (
    DriverOutputs,
    action_scale_problem,
    gripper_positions,
    output_problem,
    pose_target,
    twist_from_action,
)

RATE = 10.0
SCALE = [0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 1.0]
OPEN, CLOSED = [0.04, 0.04], [0.0, 0.01]
MEASURED_P = np.array([0.3, -0.1, 0.5])
MEASURED_Q = Rotation.from_euler('z', 30, degrees=True).as_quat()  # x y z w


def test_twist_is_the_displacement_per_period_in_m_per_s_and_rad_per_s() -> None:
    linear, angular = twist_from_action(np.array([0.5, -1.0, 0.0, 0.2, 0.0, -0.4, 1.0]), np.array(SCALE), 0.1)
    assert linear == pytest.approx([0.25, -0.5, 0.0])  # 0.5 × 0.05 m in 0.1 s
    assert angular == pytest.approx([1.0, 0.0, -2.0])  # 0.2 × 0.5 rad in 0.1 s


def test_pose_target_adds_the_delta_in_the_measured_frame() -> None:
    # a quarter turn about z, applied in the base frame to a pose already turned 90° about x
    start = Rotation.from_euler('x', 90, degrees=True).as_quat()
    action = np.array([1.0, 0.0, -0.5, 0.0, 0.0, math.pi / 2 / 0.5, -1.0])
    position, quat = pose_target(np.array([0.3, 0.0, 0.5]), start, action, np.array(SCALE))
    assert position == pytest.approx([0.35, 0.0, 0.475])
    expected = Rotation.from_euler('xz', [90, 90], degrees=True)  # extrinsic: x first, then the base z
    assert (Rotation.from_quat(quat) * expected.inv()).magnitude() == pytest.approx(0.0, abs=1e-9)
    position, quat = pose_target(np.array([0.3, 0.0, 0.5]), start, np.zeros(7), np.array(SCALE))
    assert position == pytest.approx([0.3, 0.0, 0.5]) and abs(np.dot(quat, start)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pose_target(np.zeros(3), np.zeros(4), action, np.array(SCALE))


def test_gripper_positions_between_open_and_closed() -> None:
    assert gripper_positions(-1.0, OPEN, CLOSED) == pytest.approx(OPEN)
    assert gripper_positions(1.0, OPEN, CLOSED) == pytest.approx(CLOSED)
    assert gripper_positions(0.0, OPEN, CLOSED) == pytest.approx([0.02, 0.025])
    assert gripper_positions(7.0, OPEN, CLOSED) == pytest.approx(CLOSED)  # clipped


@pytest.mark.parametrize('scale', [[1.7e308] * 7, [1e+300, *SCALE[1:]], [math.inf, *SCALE[1:]], [-0.05, *SCALE[1:]],
                                   SCALE[:6], [*SCALE[:3], 4.0, *SCALE[4:]], [*SCALE[:6], 2.0]])
def test_implausible_action_scales_are_refused(scale: list[float]) -> None:
    assert action_scale_problem(scale) is not None


def test_plausible_action_scales_pass() -> None:
    from worldvla_ros.evaluation.node_config import action_scale_presets

    for scale in [SCALE, [0.0] * 7, *action_scale_presets().values()]:
        assert action_scale_problem(scale) is None, scale


LIMITS = dict(action_min=[-1.0] * 6 + [-1.0], action_max=[1.0] * 6 + [1.0], scale=SCALE, period=0.1,
              measured_position=MEASURED_P, gripper_open=OPEN, gripper_closed=CLOSED)


def _outputs(action: np.ndarray) -> DriverOutputs:
    return DriverOutputs(twist_from_action(action, np.array(SCALE), 0.1),
                         pose_target(MEASURED_P, MEASURED_Q, action, np.array(SCALE)),
                         gripper_positions(action[6], OPEN, CLOSED))


def test_the_last_gate_passes_every_form_of_a_command_within_the_limits() -> None:
    for action in (np.array([1.0, -1.0, 0.5, 1.0, -1.0, 0.0, 1.0]), np.zeros(7)):
        assert output_problem(action, _outputs(action), **LIMITS) is None
    hold = np.zeros(7)
    assert output_problem(hold, _outputs(hold), **{**LIMITS, 'action_min': [0.5] * 7}, hold=True) is None


@pytest.mark.parametrize('what', ['nan command', 'command beyond max', 'inf twist', 'twist beyond the limits',
                                  'nan pose', 'pose jump', 'unnormalized quaternion', 'gripper beyond closed'])
def test_the_last_gate_stops_whatever_produced_the_number(what: str) -> None:
    action = np.array([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    out = _outputs(action)
    if what == 'nan command':
        action = action.copy()
        action[2] = np.nan
    elif what == 'command beyond max':
        action = action.copy()
        action[0] = 1.5
    elif what == 'inf twist':
        out.twist = (np.array([np.inf, 0, 0]), np.zeros(3))
    elif what == 'twist beyond the limits':
        out.twist = (np.array([0.51, 0, 0]), np.zeros(3))  # 1 unit × 0.05 m in 0.1 s is 0.5 m/s
    elif what == 'nan pose':
        out.pose = (np.array([np.nan, 0, 0]), MEASURED_Q)
    elif what == 'pose jump':
        out.pose = (MEASURED_P + np.array([0.06, 0, 0]), MEASURED_Q)
    elif what == 'unnormalized quaternion':
        out.pose = (MEASURED_P, MEASURED_Q * 2)
    else:
        out.gripper = np.array([0.05, 0.0])
    assert output_problem(action, out, **LIMITS) is not None


def _start(fixed: Path, logs: Path, ns: str, params: dict[str, str]) -> NodeProcess:
    return NodeProcess('action_node', logs, {
        'checkpoint': str(fixed), 'device': 'cpu', 'enabled': 'true', 'control_rate_hz': str(RATE),
        'max_obs_age': '2.0', 'watchdog_timeout': '2.0', 'replan_threshold': '1',
        'max_step': '[0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 2.0]', **params}, config=[default_config()], namespace=ns)


class Recorder:
    """Everything one robot's driver would receive, with the harness's receipt order."""

    def __init__(self, h: Harness, gripper_type: type) -> None:
        self.h = h
        self.twists: list[TwistStamped] = []
        self.poses: list[PoseStamped] = []
        self.grippers: list = []
        n = h.node
        n.create_subscription(TwistStamped, 'servo/delta_twist_cmds', lambda m: h._add(self.twists, m),
                              reliable_qos(100))
        n.create_subscription(PoseStamped, 'ee_target', lambda m: h._add(self.poses, m), reliable_qos(100))
        topic = 'gripper_controller/' + ('commands' if gripper_type is Float64MultiArray else 'joint_trajectory')
        n.create_subscription(gripper_type, topic, lambda m: h._add(self.grippers, m), reliable_qos(100))
        self.pose_pub = n.create_publisher(PoseStamped, 'ee_pose', qos_profile_sensor_data)

    def publish_pose(self, age: float = 0.0) -> None:
        msg = PoseStamped()
        msg.header.frame_id = 'panda_link0'
        msg.header.stamp = Time(nanoseconds=self.h.now_ns() - int(age * 1e9)).to_msg()
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = MEASURED_P
        o = msg.pose.orientation
        o.x, o.y, o.z, o.w = MEASURED_Q
        self.pose_pub.publish(msg)

    def stream(self, seconds: float, pose_age: float | None = 0.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.h.send_frame()
            if pose_age is not None:
                self.publish_pose(pose_age)
            time.sleep(0.05)

    def commands(self) -> list:
        with self.h.lock:
            return [m for _, m in self.h.commands if not m.dry_run]


def _in_order(expected: list[np.ndarray], received: list[np.ndarray], what: str) -> None:
    """Every one of ``received`` is the conversion of one of ``expected``, in the same order."""
    assert len(received) >= 5, f'only {len(received)} {what}'
    i = 0
    for n, r in enumerate(received):
        while i < len(expected) and not np.allclose(expected[i], r, atol=1e-6):
            i += 1
        if i == len(expected):
            pytest.fail(f'{what} #{n} is the conversion of no command sent after the previous one:\n{r}')
        i += 1


def _aligned(expected: list[np.ndarray], received: list[np.ndarray], what: str) -> int:
    """Where ``received`` (a run of consecutive messages) sits in ``expected``; fails if nowhere."""
    assert len(received) >= 5, f'only {len(received)} {what}'
    for offset in range(len(expected) - len(received) + 1):
        if all(np.allclose(e, r, atol=1e-6) for e, r in zip(expected[offset:], received, strict=False)):
            return offset
    pytest.fail(f'the {what} are not the conversions of the commands sent:\n{received[:5]}\n{expected[:8]}')


@pytest.fixture(scope='module')
def two_robots(fixed_chunk_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp('logs')
    common = {'twist_topic': 'servo/delta_twist_cmds', 'twist_frame_id': 'panda_link0', 'pose_topic': 'ee_target',
              'pose_feedback_topic': 'ee_pose', 'gripper_joints': "['finger_left', 'finger_right']",
              'gripper_open': str(OPEN), 'gripper_closed': str(CLOSED)}
    a = _start(fixed_chunk_checkpoint, logs, 'arm_a', {**common, 'gripper_output': 'joint_trajectory',
                                                       'gripper_topic': 'gripper_controller/joint_trajectory'})
    b = _start(fixed_chunk_checkpoint, logs, 'arm_b', {**common, 'gripper_output': 'forward_command'})
    rclpy.init()
    ha, hb = Harness(namespace='arm_a'), Harness(namespace='arm_b')
    ra, rb = Recorder(ha, JointTrajectory), Recorder(hb, Float64MultiArray)
    for h in (ha, hb):
        h.instruction_pub.publish(String(data='put the red block in the bowl'))
    yield (ha, ra, a), (hb, rb, b)
    for h in (ha, hb):
        h.close()
    rclpy.shutdown()
    a.stop()
    b.stop()


def _wait_for_motion(h: Harness, r: Recorder, node: NodeProcess, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not any(not m.hold for m in r.commands()):
        r.stream(0.5, pose_age=None)
    assert any(not m.hold for m in r.commands()), node.log()[-3000:]


@pytest.mark.ros
def test_every_driver_output_is_the_command_sent(two_robots) -> None:
    for h, r, node in two_robots:
        _wait_for_motion(h, r, node)
        # no measured pose yet: commands and twists go out, pose targets do not (counted)
        assert h.wait_for(lambda h=h: h.counter('worldvla_action', 'pose_targets_skipped_no_pose') > 0, 10,
                          frames=False)
        assert not r.poses and r.twists
    (_, ra, _), (_, rb, _) = two_robots
    for r in (ra, rb):
        r.stream(3.0)
    time.sleep(0.5)
    for h, r, _node in two_robots:
        with h.lock:
            twists, poses, grippers = list(r.twists), list(r.poses), list(r.grippers)
        time.sleep(0.3)  # the outputs are other topics: the commands they came from may still be on their way
        commands = r.commands()
        actions = [np.asarray(c.action) for c in commands]
        assert any(not c.hold for c in commands)
        lin_ang = [np.concatenate(twist_from_action(a_, np.array(SCALE), 1.0 / RATE)) for a_ in actions]
        got = [np.array([t.twist.linear.x, t.twist.linear.y, t.twist.linear.z,
                         t.twist.angular.x, t.twist.angular.y, t.twist.angular.z]) for t in twists]
        _aligned(lin_ang, got[-25:], 'twists')
        assert {t.header.frame_id for t in twists} == {'panda_link0'}
        stamps = [Time.from_msg(t.header.stamp).nanoseconds * 1e-9 for t in twists]
        # one per control period (a late timer tick is followed by an early one: jitter, not drift)
        assert np.all(np.diff(stamps) > 0) and np.median(np.diff(stamps)) == pytest.approx(1 / RATE, abs=0.03)
        assert abs(stamps[-1] - h.now_ns() * 1e-9) < 1.5
        targets = [np.concatenate(pose_target(MEASURED_P, MEASURED_Q, a_, np.array(SCALE))) for a_ in actions]
        got = [np.array([p.pose.position.x, p.pose.position.y, p.pose.position.z, p.pose.orientation.x,
                         p.pose.orientation.y, p.pose.orientation.z, p.pose.orientation.w]) for p in poses]
        # a target is skipped when the measured pose is late (counted): in order, not necessarily contiguous
        _in_order(targets, got[-20:], 'pose targets')
        assert {p.header.frame_id for p in poses} == {'panda_link0'}
        fingers = [gripper_positions(a_[6], OPEN, CLOSED) for a_ in actions]
        if isinstance(grippers[0], JointTrajectory):
            assert grippers[0].joint_names == ['finger_left', 'finger_right']
            assert all(len(g.points) == 1 and g.points[0].time_from_start.nanosec == int(1e9 / RATE) for g in grippers)
            got = [np.array(g.points[0].positions) for g in grippers]
        else:
            got = [np.array(g.data) for g in grippers]
        _aligned(fingers, got[-25:], 'gripper commands')


@pytest.mark.ros
def test_estop_dry_run_and_a_stale_pose_reach_every_output(two_robots) -> None:
    (ha, ra, _a), _ = two_robots
    action = 'worldvla_action'
    ra.stream(1.0)
    # a measured pose older than pose_feedback_timeout: no pose target, counted
    before = len(ra.poses)
    ra.stream(1.5, pose_age=5.0)
    assert ha.wait_for(lambda: ha.counter(action, 'pose_targets_skipped_stale_pose') > 0, 5, frames=False)
    with ha.lock:
        stale_targets = len(ra.poses) - before
    assert stale_targets <= 2  # in flight when the stale poses began
    # e-stop: every form says "stand still"
    ha.estop_pub.publish(Bool(data=True))
    assert ha.wait_for(lambda: ha.counter(action, 'estops') >= 1, 10, frames=False)
    t0 = len(ra.twists), len(ra.poses), len(ra.grippers)
    end = time.monotonic() + 30
    while time.monotonic() < end and min(len(ra.twists) - t0[0], len(ra.poses) - t0[1]) < 8:
        ra.stream(0.2)
    with ha.lock:
        twists, poses, grippers = ra.twists[t0[0]:], ra.poses[t0[1]:], ra.grippers[t0[2]:]
    assert len(twists) >= 8 and len(poses) >= 8
    for t in twists[2:]:
        assert [t.twist.linear.x, t.twist.linear.y, t.twist.linear.z, t.twist.angular.x, t.twist.angular.y,
                t.twist.angular.z] == [0.0] * 6
    for p in poses[2:]:
        assert [p.pose.position.x, p.pose.position.y, p.pose.position.z] == pytest.approx(MEASURED_P)
        q = [p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z, p.pose.orientation.w]
        assert abs(np.dot(q, MEASURED_Q)) == pytest.approx(1.0)
    assert len({tuple(g.points[0].positions) for g in grippers[2:]}) == 1  # the gripper is kept
    # dry run: the EndEffectorCommand says dry_run, and no driver receives anything
    assert ha.set_parameter(action, 'enabled', False).successful
    time.sleep(0.3)
    n = len(ra.twists), len(ra.poses), len(ra.grippers)
    sent = len(ha.commands)
    end = time.monotonic() + 30
    while time.monotonic() < end and len(ha.commands) < sent + 8:
        ra.stream(0.2)
    assert len(ha.commands) >= sent + 8
    assert (len(ra.twists), len(ra.poses), len(ra.grippers)) == n
    assert ha.wait_for(lambda: ha.counter(action, 'driver_outputs_dry_run') > 0, 5, frames=False)


@pytest.mark.ros
def test_implausible_scales_are_refused_at_runtime_and_a_broken_measured_pose_gives_no_target(two_robots) -> None:
    _, (hb, rb, node) = two_robots
    action = 'worldvla_action'
    for bad in ([1.7e308] * 7, [1e+300, *SCALE[1:]], [*SCALE[:6], -1.0]):
        result = hb.set_parameter(action, 'action_scale', bad)
        assert not result.successful and 'action_scale' in result.reason, result
    assert hb.get_parameter(action, 'action_scale') == pytest.approx(SCALE)
    assert not hb.set_parameter(action, 'command_frame_id', '').successful
    result = hb.set_parameter(action, 'use_sim_time', True)  # the clock of every stamp check: fixed at start
    assert not result.successful and 'use_sim_time' in result.reason
    # a measured pose at infinity: no target (counted), the command and the other forms still go out
    rb.stream(1.0)
    msg = PoseStamped()
    msg.header.frame_id = 'panda_link0'
    msg.pose.position.x = math.inf
    msg.pose.orientation.w = 1.0
    with hb.lock:
        targets, sent = len(rb.poses), len(hb.commands)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        msg.header.stamp = Time(nanoseconds=hb.now_ns()).to_msg()
        rb.pose_pub.publish(msg)
        hb.send_frame()
        time.sleep(0.05)
    assert hb.wait_for(lambda: hb.counter(action, 'rejected_measured_pose') > 0, 5, frames=False), node.log()[-2000:]
    with hb.lock:
        new_targets = rb.poses[targets:]
        assert len(hb.commands) >= sent + 20
    assert len(new_targets) <= 2  # in flight
    assert all(math.isfinite(p.pose.position.x) for p in rb.poses)
    with hb.lock:
        twists = list(rb.twists)
    assert all(math.isfinite(v) for t in twists for v in (t.twist.linear.x, t.twist.linear.y, t.twist.linear.z))
