"""WorldVLA on ROS 2: the model core (``worldvla_ros.model``, no ROS) and thin rclpy nodes."""

__version__ = '0.1.0'
