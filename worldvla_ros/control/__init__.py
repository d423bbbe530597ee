"""The control loop shared by the action node, the fleet, lockstep evaluation and the closed-loop sims: no ROS,
no torch (``controller.Controller``; ``loop.SynchronousLoop`` drives it where time is simulated)."""
from .controller import Controller
from .types import Chunk, Command, ControlSettings, Goal, Request, Tally

__all__ = ['Chunk', 'Command', 'ControlSettings', 'Controller', 'Goal', 'Request', 'Tally']
