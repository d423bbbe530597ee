"""The action node's outputs: commands as EndEffectorCommand, and the same commands in the forms robot drivers
take (MoveIt Servo twists, pose targets, ros2_control gripper commands), behind the last gate."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from geometry_msgs.msg import Point, PoseStamped, TwistStamped
from rclpy.duration import Duration
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
from visualization_msgs.msg import Marker, MarkerArray
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.control import Chunk, Command
from worldvla_ros.robot_outputs import DriverOutputs, gripper_positions, output_problem, pose_target, twist_from_action


def command_msg(cmd: Command, frame_id: str) -> EndEffectorCommand:
    msg = EndEffectorCommand(index=cmd.index, chunk_size=cmd.chunk_size, chunk_sequence=cmd.chunk_sequence,
                             hold=cmd.hold, dry_run=cmd.dry_run)
    msg.header.stamp = Time(nanoseconds=cmd.stamp_ns).to_msg()
    msg.header.frame_id = frame_id
    msg.action = np.asarray(cmd.action, dtype=np.float64)
    return msg


def chunk_msg(chunk: Chunk, frame_id: str, model_id: str) -> ActionChunk:
    msg = ActionChunk(sequence=chunk.sequence, instruction=chunk.instruction, inference_latency=chunk.latency_s,
                      model_id=model_id)
    msg.header.stamp = Time(nanoseconds=chunk.stamp_ns).to_msg()
    msg.header.frame_id = frame_id
    msg.observation_stamps = [Time(nanoseconds=t).to_msg() for t in chunk.observation_stamps_ns]
    msg.raw_actions = chunk.raw.reshape(-1).astype(float).tolist()
    msg.commands = [command_msg(c, frame_id) for c in chunk.commands]
    return msg


def planned_path(chunk: Chunk, scale: np.ndarray, msg: ActionChunk) -> MarkerArray:
    """The chunk's merged commands as a line of Δxyz in metres, from the end effector."""
    actions = np.array([c.action for c in chunk.commands], dtype=np.float64).reshape(-1, 7)
    points = np.vstack([np.zeros(3), np.cumsum(actions[:, :3] * scale[:3], axis=0)])
    line = Marker(ns='worldvla_plan', id=0, type=Marker.LINE_STRIP, action=Marker.ADD, header=msg.header)
    line.scale.x = 0.01
    line.color.r, line.color.g, line.color.a = 0.1, 0.9, 1.0
    line.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in points]
    dots = Marker(ns='worldvla_plan', id=1, type=Marker.SPHERE_LIST, action=Marker.ADD, header=msg.header)
    dots.scale.x = dots.scale.y = dots.scale.z = 0.03
    dots.color.r, dots.color.b, dots.color.a = 1.0, 0.2, 1.0
    dots.points = line.points[1:]
    return MarkerArray(markers=[line, dots])


class DriverPublishers:
    """The configured driver forms; ``send`` publishes a command in every form after the last gate, which sends
    a hold instead of anything not finite or beyond the limits in force."""

    def __init__(self, node: Any, p: dict[str, Any], qos: Any, group: Any) -> None:
        self.node = node
        self.measured: PoseStamped | None = None
        self.twist_pub = node.create_publisher(TwistStamped, p['twist_topic'], qos) if p['twist_topic'] else None
        self.pose_pub = node.create_publisher(PoseStamped, p['pose_topic'], qos) if p['pose_topic'] else None
        if p['pose_topic']:
            node.create_subscription(PoseStamped, p['pose_feedback_topic'], self._on_pose, qos_profile_sensor_data,
                                     callback_group=group)
        kind = {'forward_command': Float64MultiArray, 'joint_trajectory': JointTrajectory}.get(p['gripper_output'])
        self.gripper_pub = node.create_publisher(kind, p['gripper_topic'], qos) if kind else None

    def _on_pose(self, msg: PoseStamped) -> None:
        self.measured = msg

    def send(self, cmd: Command, command_pub: Any, hold: Callable[[str], Command]) -> Command:
        """Publish ``cmd`` (or the hold ``hold(reason)`` makes, if the gate refuses it); the command sent."""
        param = self.node.get_parameter
        outputs = self._outputs(cmd)
        problem = self._problem(cmd, outputs)
        if problem:
            self.node.stats.count('rejected_output_gate')
            self.node.say('error', 'output_gate', f'not sent, holding instead: {problem}')
            cmd = hold('output_gate')
            outputs = self._outputs(cmd)
            if self._problem(cmd, outputs):  # a measured pose gone bad meanwhile: the command alone
                outputs = None
        command_pub.publish(command_msg(cmd, param('command_frame_id').value))
        if outputs is None:
            return cmd
        stamp = self.node.get_clock().now().to_msg()
        if outputs.twist is not None:
            twist = TwistStamped()
            twist.header.stamp, twist.header.frame_id = stamp, param('twist_frame_id').value
            t = twist.twist
            t.linear.x, t.linear.y, t.linear.z = map(float, outputs.twist[0])
            t.angular.x, t.angular.y, t.angular.z = map(float, outputs.twist[1])
            self.twist_pub.publish(twist)
        if outputs.pose is not None:
            target = PoseStamped()
            target.header.stamp, target.header.frame_id = stamp, self.measured.header.frame_id
            target.pose.position.x, target.pose.position.y, target.pose.position.z = map(float, outputs.pose[0])
            o = target.pose.orientation
            o.x, o.y, o.z, o.w = map(float, outputs.pose[1])
            self.pose_pub.publish(target)
        if outputs.gripper is not None:
            q = outputs.gripper.tolist()
            if param('gripper_output').value == 'forward_command':
                self.gripper_pub.publish(Float64MultiArray(data=q))
            else:  # a zero stamp: the controller starts the point on receipt
                period = Duration(seconds=1.0 / param('control_rate_hz').value).to_msg()
                self.gripper_pub.publish(JointTrajectory(joint_names=list(param('gripper_joints').value),
                                                         points=[JointTrajectoryPoint(positions=q,
                                                                                      time_from_start=period)]))
        return cmd

    def _outputs(self, cmd: Command) -> DriverOutputs | None:
        """Every configured form of ``cmd``; None when there are none to send (none configured, dry run)."""
        if not (self.twist_pub or self.pose_pub or self.gripper_pub):
            return None
        if cmd.dry_run:
            self.node.stats.count('driver_outputs_dry_run')
            return None
        param = self.node.get_parameter
        action = np.asarray(cmd.action, dtype=np.float64)
        scale = np.asarray(param('action_scale').value, dtype=np.float64)
        out = DriverOutputs()
        if self.twist_pub is not None:
            out.twist = twist_from_action(action, scale, 1.0 / param('control_rate_hz').value)
        if self.pose_pub is not None:
            out.pose = self._pose_target(action, scale)
        if self.gripper_pub is not None:
            out.gripper = gripper_positions(action[EndEffectorCommand.GRIPPER], param('gripper_open').value,
                                            param('gripper_closed').value)
        return out

    def _problem(self, cmd: Command, outputs: DriverOutputs | None) -> str | None:
        param = self.node.get_parameter
        limits = self.node.controller.safety.limits
        m = self.measured
        position = None if m is None else np.array([m.pose.position.x, m.pose.position.y, m.pose.position.z])
        return output_problem(cmd.action, outputs or DriverOutputs(), limits.action_min, limits.action_max,
                              param('action_scale').value, 1.0 / param('control_rate_hz').value, position,
                              param('gripper_open').value, param('gripper_closed').value, hold=cmd.hold)

    def _pose_target(self, action: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        measured, stats = self.measured, self.node.stats
        if measured is None:
            stats.count('pose_targets_skipped_no_pose')
            return None
        age = (self.node.get_clock().now() - Time.from_msg(measured.header.stamp)).nanoseconds * 1e-9
        if age > self.node.get_parameter('pose_feedback_timeout').value:
            stats.count('pose_targets_skipped_stale_pose')
            self.node.say('warning', 'stale_pose', f'no pose target: the measured pose is {age:.2f} s old')
            return None
        m = measured.pose
        try:
            return pose_target(np.array([m.position.x, m.position.y, m.position.z]),
                               np.array([m.orientation.x, m.orientation.y, m.orientation.z, m.orientation.w]),
                               action, scale)
        except ValueError as exc:
            stats.count('rejected_measured_pose')
            self.node.say('warning', 'measured_pose', f'rejected (measured_pose): {exc}')
            return None
