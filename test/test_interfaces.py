"""The package's rosidl interfaces are real generated messages, installed in ROS layout."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from rclpy.serialization import deserialize_message, serialize_message
from worldvla.msg import ActionChunk, EndEffectorCommand

PREFIX = Path(sys.prefix)


def test_end_effector_command_fields() -> None:
    cmd = EndEffectorCommand()
    assert len(cmd.action) == 7
    assert EndEffectorCommand.GRIPPER == 6
    cmd.action[:] = [0.1, -0.2, 0.3, 0.0, 0.01, -0.01, 1.0]
    cmd.index = 3
    cmd.header.frame_id = 'ee'
    back = deserialize_message(serialize_message(cmd), EndEffectorCommand)
    assert list(back.action) == pytest.approx([0.1, -0.2, 0.3, 0.0, 0.01, -0.01, 1.0])
    assert back.index == 3 and back.header.frame_id == 'ee'


def test_action_chunk_round_trip() -> None:
    chunk = ActionChunk(instruction='pick up the red block', model_id='tiny', sequence=7)
    chunk.commands = [EndEffectorCommand(index=i) for i in range(5)]
    chunk.observation_stamps = [chunk.header.stamp, chunk.header.stamp]
    chunk.raw_actions = [0.5] * 35
    back = deserialize_message(serialize_message(chunk), ActionChunk)
    assert back.instruction == 'pick up the red block'
    assert [c.index for c in back.commands] == list(range(5))
    assert len(back.observation_stamps) == 2 and back.sequence == 7


def test_run_instruction_action_types() -> None:
    from worldvla.action import RunInstruction

    goal = RunInstruction.Goal(instruction='open the drawer', max_steps=200, time_limit=60.0)
    back = deserialize_message(serialize_message(goal), RunInstruction.Goal)
    assert (back.instruction, back.max_steps, back.time_limit) == ('open the drawer', 200, 60.0)
    outcomes = [RunInstruction.Result.SUCCEEDED, RunInstruction.Result.STEP_LIMIT, RunInstruction.Result.TIME_LIMIT,
                RunInstruction.Result.CANCELED, RunInstruction.Result.PREEMPTED, RunInstruction.Result.ESTOPPED,
                RunInstruction.Result.MODEL_ERROR, RunInstruction.Result.SHUTDOWN]
    assert len(set(outcomes)) == 8
    assert {'chunks', 'commands_sent', 'last_inference_latency', 'surprise_psnr'} <= set(
        RunInstruction.Feedback.get_fields_and_field_types())


@pytest.mark.skipif(not (PREFIX / 'lib' / 'worldvla').is_dir(), reason='not the standalone venv install')
def test_ros_layout_in_prefix() -> None:
    for exe in ('action_node', 'world_model_node', 'sim_node', 'worldvla_bringup', 'make_tiny_checkpoint',
                'evaluate_bag', 'convert_to_bag', 'record_demos', 'worldvla_train', 'worldvla_sim_eval',
                'worldvla_finetune'):
        path = PREFIX / 'lib' / 'worldvla' / exe
        assert path.is_file() and os.access(path, os.X_OK), path
        assert path.read_text().splitlines()[0] == f'#!{sys.executable}'  # not `env python3`: see below
    share = PREFIX / 'share' / 'worldvla'
    assert (share / 'package.xml').is_file()
    assert (share / 'launch' / 'bringup.launch.py').is_file()
    assert (share / 'config' / 'worldvla.yaml').is_file()
    assert (share / 'action' / 'RunInstruction.action').is_file()  # what `ros2 interface show` reads
    from ament_index_python.packages import get_package_share_directory

    assert Path(get_package_share_directory('worldvla')) == share


@pytest.mark.skipif(not (PREFIX / 'lib' / 'worldvla').is_dir(), reason='not the standalone venv install')
def test_executables_run_without_an_activated_environment(tmp_path: Path) -> None:
    """`ros2 run worldvla X` / launch_ros exec lib/worldvla/X directly: it must find its Python itself."""
    import subprocess

    env = {'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path), 'ROS_LOG_DIR': str(tmp_path)}
    lib = PREFIX / 'lib' / 'worldvla'
    node = subprocess.run([str(lib / 'action_node'), '--ros-args', '-p', f'checkpoint:={tmp_path / "none"}'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert node.returncode == 1 and 'cannot load checkpoint' in node.stderr, node.stderr[-2000:]
    bringup = subprocess.run([str(lib / 'worldvla_bringup'), '--help'], env=env, capture_output=True, text=True,
                             timeout=120)
    assert bringup.returncode == 0 and '--namespace' in bringup.stdout, bringup.stderr[-2000:]
