"""Shared fixtures: an isolated ROS 2 domain per test session and a tiny checkpoint."""
from __future__ import annotations

import os
import random
import tempfile

# Isolate every test session's ROS graph before rclpy is imported anywhere.
os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 101)))
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
_ros_home = tempfile.mkdtemp(prefix='worldvla-ros-home-')
os.environ.setdefault('ROS_HOME', _ros_home)
os.environ.setdefault('ROS_LOG_DIR', os.path.join(_ros_home, 'log'))
