"""The controller's supervision: lifecycle, e-stop and task goals — the events that stop, start and end
commanding. A part of ``Controller`` (it holds the state these methods use), kept in a file of its own."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .types import Command, Goal, Request

Send = Callable[[Command], Command]  # publishes a command, returns the one that went out (a hold, if refused)


class Supervision:
    # -- lifecycle ------------------------------------------------------------------------------------
    def activate(self) -> None:
        """Frames are taken from now on; nothing computed before moves the robot."""
        with self.lock:
            self.epoch += 1
            self.history.clear()
            self.fresh = False
            self.commanding = True

    def deactivate(self, now: float, stamp_ns: int, send: Send | None = None, outcome: str = 'deactivated',
                   message: str = 'the node was deactivated') -> Command | None:
        """Hold (if anything was commanded), end the running goal, then command nothing."""
        with self.lock:
            self._end_goal(outcome, message, now)
            self._clear_queue()
            self.epoch += 1
            hold = None
            if self.active or (self.estop and self.commanding):
                hold = self._send(self.make_hold(stamp_ns, outcome if outcome == 'shutdown' else 'deactivate'),
                                  send, now)
            self.active = self.commanding = False
            self.last_send_time = None
            return hold

    def shutdown(self, now: float, stamp_ns: int, send: Send | None = None) -> Command | None:
        """Lifecycle shutdown, from any state: as deactivate, then nothing is accepted any more."""
        with self.lock:
            hold = self.deactivate(now, stamp_ns, send, 'shutdown', 'the node was shut down (lifecycle)')
            self.finalized = True
            return hold

    def close(self, now: float, stamp_ns: int, send: Send | None = None) -> Command | None:
        """The process stops: the last word is a hold (if anything was commanded)."""
        with self.lock:
            self.closing = True
            return self.deactivate(now, stamp_ns, send, 'shutdown', 'the node is shutting down')

    # -- e-stop ---------------------------------------------------------------------------------------
    def on_estop(self, now: float) -> bool:
        """Latch: holds only, until a reset; the running goal ends. True when newly latched."""
        with self.lock:
            newly = not self.estop
            self.estop = True
            self.epoch += 1
            self._end_goal('estopped', 'e-stop', now)
            self._clear_queue()
            self.history.clear()
            self.fresh = False
            if newly:
                self.stats.count('estops')
            return newly

    def reset_estop(self, stamp_ns: int) -> bool:
        """Unlatch; from now on only frames stamped after ``stamp_ns`` count. True when it was latched."""
        with self.lock:
            was = self.estop
            if was:
                self.estop = False
                self.epoch += 1
                self.reset_stamp_ns = stamp_ns
                self.history.clear()
                self.fresh = False
            return was

    # -- goals ----------------------------------------------------------------------------------------
    def goal_refusal(self, now: float, time_limit: float) -> tuple[str, str] | None:
        with self.lock:
            return self.goals.refusal(self.settings, now, self.commanding and not self.finalized, self.estop,
                                      time_limit)

    def start_goal(self, goal: Goal, now: float) -> bool:
        """Run an accepted goal (it preempts the running one), or end it at once when the node stopped accepting
        since the request (e-stop, deactivated, shut down). True when it runs."""
        with self.lock:
            refusal = None
            if self.estop:
                refusal = ('estopped', 'e-stop')
            elif self.finalized:
                refusal = ('shutdown', 'the node was shut down')
            elif not self.commanding:
                refusal = ('deactivated', 'the node was deactivated')
            if not self.goals.start(goal, now, refusal):
                return False
            self.instruction = goal.instruction
            self.version += 1
            self._clear_queue()  # nothing computed for an earlier task runs
            self.history.clear()  # its observations start with it (a sim's next episode is another scene)
            self.fresh = False
        return True

    def cancel_goal(self, key: Any, now: float) -> bool:
        with self.lock:  # the robot holds from the next tick on, before the goal reports canceled
            ended = self.goals.running
            if self.goals.cancel(key, now):
                self._after_goal(ended)
                return True
            return False

    def on_success(self, message: str, now: float) -> None:
        with self.lock:
            self._end_goal('succeeded', message, now)

    def _end_goal(self, outcome: str, message: str, now: float) -> None:
        self._after_goal(self.goals.end(outcome, message, now))

    def _end_goal_of(self, request: Request, outcome: str, message: str, now: float) -> None:
        if self.goals.running is not None and request.version == self.version:
            self._end_goal(outcome, message, now)

    def _after_goal(self, goal: Goal | None) -> None:
        """No command of an ended goal's task is sent after it ended."""
        if goal is not None:
            self.instruction = None
            self.version += 1
            self._clear_queue()

