"""The embedded default: a small tabletop simulator, its scripted expert, and closed-loop evaluation.

No ROS here; ``worldvla_ros.nodes.sim_node`` is the ROS adapter.
"""
from .tabletop import TASKS, SimConfig, TabletopSim, scripted_action

__all__ = ['TASKS', 'SimConfig', 'TabletopSim', 'scripted_action']
