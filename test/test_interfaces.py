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


@pytest.mark.skipif(not (PREFIX / 'lib' / 'worldvla').is_dir(), reason='not the standalone venv install')
def test_ros_layout_in_prefix() -> None:
    for exe in ('action_node', 'world_model_node', 'bringup', 'make_tiny_checkpoint'):
        path = PREFIX / 'lib' / 'worldvla' / exe
        assert path.is_file() and os.access(path, os.X_OK), path
    share = PREFIX / 'share' / 'worldvla'
    assert (share / 'package.xml').is_file()
    assert (share / 'launch' / 'bringup.launch.py').is_file()
    assert (share / 'config' / 'worldvla.yaml').is_file()
    from ament_index_python.packages import get_package_share_directory

    assert Path(get_package_share_directory('worldvla')) == share
