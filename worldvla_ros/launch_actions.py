"""Launch actions both launch files share: a required node's on_exit, and a refusal that fails the launch.

Imported by ``launch/*.launch.py`` only (``launch`` is imported when an action is made, so the module loads
without it, and the tests' recording stand-in for ``launch`` is the one in use when they run the launch files).
"""
from __future__ import annotations

from typing import Any


class LaunchRefused(RuntimeError):
    """Ends ``ros2 launch`` with exit 1 and this message: launch reports an exception raised by an action as
    '[ERROR] [launch]: Caught exception in launch …: <message>' and shuts everything down (its only way to
    end a launch as failed; a Shutdown action ends it with 0)."""


def required(name: str, stopping: dict) -> Any:
    """on_exit of a required process: the others are stopped with one Shutdown (launch_ros raises on a second one
    once a lifecycle node is part of the launch), and a process that failed fails the launch."""
    from launch.actions import OpaqueFunction, Shutdown

    def ended(context: Any) -> Any:
        if stopping['now'] or context.is_shutdown:
            return None  # already stopping (Ctrl-C, another node): nothing more to say
        stopping['now'] = True
        code = getattr(getattr(context.locals, 'event', None), 'returncode', 0)
        if code:
            raise LaunchRefused(f'{name} exited with code {code} (its log above says why)')
        return [Shutdown(reason=f'{name} exited')]

    return OpaqueFunction(function=ended)


def refuse(message: str, stopping: dict) -> Any:
    """An action that fails the launch with ``message`` (exit 1)."""
    from launch.actions import OpaqueFunction

    def fail(_context: Any) -> None:
        stopping['now'] = True
        raise LaunchRefused(message)

    return OpaqueFunction(function=fail)
