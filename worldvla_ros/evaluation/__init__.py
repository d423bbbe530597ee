"""Offline evaluation on rosbag2 files: read/write bags, score the policy and the world model.

Nothing here imports rclpy except ``live``; the model is only imported where it runs.
"""
