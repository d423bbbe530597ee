"""Faults inside the model, forced through a running action node: counted, never commanded."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.bringup import default_config, start_nodes, stop_nodes
from worldvla_ros.image_conversion import fill_image_msg
from worldvla_ros.nodes.common import latched_qos, reliable_qos, watch_diagnostics
from worldvla_ros.synthetic import SyntheticCamera

pytestmark = pytest.mark.ros


@pytest.fixture(scope='module')
def nan_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a NaN output head: the model itself emits NaN logits."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp('nan') / 'nan'
    shutil.copytree(tiny_checkpoint, root)
    for shard in root.glob('*.safetensors'):
        tensors = load_file(shard)
        if 'lm_head.weight' in tensors:
            tensors['lm_head.weight'][:] = float('nan')
            save_file(tensors, shard, metadata={'format': 'pt'})
    return root


def test_policy_raises_instead_of_decoding_nan(nan_checkpoint: Path, frames: list[np.ndarray]) -> None:
    from worldvla_ros.model import NonFiniteLogits, load_policy

    policy = load_policy(nan_checkpoint, device='cpu')
    with pytest.raises(NonFiniteLogits):
        policy.predict(frames, 'pick up the block')
    with pytest.raises(NonFiniteLogits):
        policy.predict(frames, 'pick up the block', batched=False)


def test_nan_model_fails_warmup_with_a_clear_error(nan_checkpoint: Path) -> None:
    proc = subprocess.run(
        [sys.executable, '-m', 'worldvla_ros.nodes.action_node', '--ros-args', '-p', f'checkpoint:={nan_checkpoint}',
         '-p', 'device:=cpu'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'warm-up inference failed' in proc.stderr and 'NaN' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_nan_output_at_runtime_is_counted_and_never_commanded(nan_checkpoint: Path, isolated_graph) -> None:
    node = isolated_graph
    procs = start_nodes(str(nan_checkpoint), default_config(), 'cpu', use_world_model=False,
                        extra={'warmup': 'false', 'enabled': 'true', 'control_rate_hz': '20.0'})
    chunks: list[ActionChunk] = []
    commands: list[EndEffectorCommand] = []

    node.create_subscription(ActionChunk, 'worldvla/action_chunk', chunks.append, reliable_qos())
    node.create_subscription(EndEffectorCommand, 'worldvla/ee_command', commands.append, reliable_qos(100))
    diag = watch_diagnostics(node, 'worldvla_action')
    image_pub = node.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
    node.create_publisher(String, 'instruction', latched_qos()).publish(String(data='pick up the red block'))
    camera = SyntheticCamera()
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and int(diag.get('rejected_non_finite_output', 0)) < 3:
            msg = fill_image_msg(Image(), camera.render())
            msg.header.stamp = node.get_clock().now().to_msg()
            image_pub.publish(msg)
            time.sleep(0.1)
        assert int(diag.get('rejected_non_finite_output', 0)) >= 3, diag
        assert procs[0].poll() is None  # still running
        assert chunks == []
        assert all(c.hold for c in commands)  # nothing but holds (none at all before a first chunk)
    finally:
        codes = stop_nodes(procs)
    assert codes[0] in (0, -2)
