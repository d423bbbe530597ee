"""The action node's parameters: the table it declares, their checks, and the controller settings and
safety limits they make."""
from __future__ import annotations

from typing import Any

import numpy as np

from worldvla_ros.control.types import PARAMETER_FIELDS
from worldvla_ros.evaluation.node_config import safety_limits  # one reading of the limits, offline and live
from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN, LIBERO_ACTION_SCALE
from worldvla_ros.nodes.common import CAMERA_PARAMETERS, MODEL_PARAMETERS, Param
from worldvla_ros.robot_outputs import action_scale_problem

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

LIMIT_PARAMETERS = ('action_min', 'action_max', 'max_step')  # SafetyLimits' fields, in order
SETTING_PARAMETERS = {n: f for n, f in PARAMETER_FIELDS.items() if n != 'control_rate_hz'}  # runtime changes


def check_seven(name: str, non_negative: bool = False):
    def check(value: Any) -> str | None:
        if len(value) != 7 or not all(np.isfinite(value)):
            return f'{name} needs 7 finite values'
        if non_negative and min(value) < 0:
            return f'{name} must be ≥ 0 in every dimension, got {list(value)}'
        return None

    return check


def check_frame_id(value: Any) -> str | None:
    return None if str(value).strip() else 'must name a frame (commands and the planned path are stamped with it)'


def check_gripper(joints: int):
    def check(value: Any) -> str | None:
        if len(value) != joints or not all(np.isfinite(value)):
            return f'needs {joints} finite joint positions (one per gripper_joints entry), got {list(value)}'
        return None

    return check


def startup_problems(p: dict[str, Any]) -> list[str]:
    """What makes these start-up values unusable (the node refuses to start with the first)."""
    problems = [f'invalid {name}: {why}' for name, check in (('action_scale', action_scale_problem),
                                                             ('command_frame_id', check_frame_id))
                if (why := check(p[name]))]
    try:
        safety_limits(p)
    except ValueError as exc:
        problems.append(f'invalid safety limits: {exc}')
    if p['pose_topic'] and not p['pose_feedback_topic']:
        problems.append('pose_topic needs pose_feedback_topic: targets start from the measured pose')
    if p['gripper_output'] != 'none':
        problems += [f'{name}: {why}' for name in ('gripper_open', 'gripper_closed')
                     if (why := check_gripper(len(p['gripper_joints']))(p[name]))]
    return problems


def runtime_checks(joints: int) -> dict[str, Any]:
    """Checks of the values ``ros2 param set`` may change."""
    return {'action_min': check_seven('action_min'), 'action_max': check_seven('action_max'),
            'max_step': check_seven('max_step', non_negative=True), 'action_scale': action_scale_problem,
            'command_frame_id': check_frame_id, 'goal_policy': PARAMETERS['goal_policy'].check_choice,
            'chunk_merge': PARAMETERS['chunk_merge'].check_choice, 'gripper_open': check_gripper(joints),
            'gripper_closed': check_gripper(joints)}
