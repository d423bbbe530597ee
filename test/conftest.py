"""Shared fixtures: an isolated ROS 2 domain per test session and a tiny checkpoint."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path


def pick_domain(low: int, high: int) -> int:
    """A random ROS domain in [low, high]. Two test sessions running at once (scripts/test.sh runs Kilted
    and Jazzy side by side) set WORLDVLA_TEST_DOMAIN_PARITY 0 and 1 and never share a domain."""
    parity = os.environ.get('WORLDVLA_TEST_DOMAIN_PARITY')
    choices = [d for d in range(low, high + 1) if parity is None or d % 2 == int(parity)]
    return random.choice(choices)


# Isolate every test session's ROS graph before rclpy is imported anywhere.
os.environ.setdefault('ROS_DOMAIN_ID', str(pick_domain(1, 101)))
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
_ros_home = tempfile.mkdtemp(prefix='worldvla-ros-home-')
os.environ.setdefault('ROS_HOME', _ros_home)
os.environ.setdefault('ROS_LOG_DIR', os.path.join(_ros_home, 'log'))


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random checkpoint in the published layout (config.json, shards, tokenizer/)."""
    from worldvla_ros.model import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny')


@pytest.fixture(scope='session')
def tiny_policy(tiny_checkpoint):
    from worldvla_ros.model import load_policy

    return load_policy(tiny_checkpoint, device='cpu')


@pytest.fixture
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(2)]


@pytest.fixture
def isolated_graph(monkeypatch: pytest.MonkeyPatch):
    """A test node in a ROS domain of its own (nodes started in the test inherit it), spinning."""
    import threading

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    domain = pick_domain(102, 200)
    monkeypatch.setenv('ROS_DOMAIN_ID', str(domain))
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node('worldvla_isolated_harness', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    yield node
    executor.shutdown()
    spinner.join(timeout=5)
    node.destroy_node()
    rclpy.shutdown(context=context)


@pytest.fixture(scope='session')
def fixed_chunk_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with chunks of exactly 5 actions (min_actions = chunk_size), so queues are long."""
    root = tmp_path_factory.mktemp('fixed') / 'tiny_fixed'
    shutil.copytree(tiny_checkpoint, root)
    cfg = json.loads((root / 'config.json').read_text())
    cfg['worldvla']['min_actions'] = cfg['worldvla']['chunk_size']
    (root / 'config.json').write_text(json.dumps(cfg))
    return root
