"""The task (RunInstruction) state machine: at most one goal runs; every goal accepted ends with exactly one
outcome; requests are checked once, before acceptance. The controller holds one ``Goals`` and calls it under
its lock."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .types import ControlSettings, Goal


class Goals:
    def __init__(self, count: Callable[[str, int], None]) -> None:
        self.count = count
        self.running: Goal | None = None
        self.ended_since_tick = False  # a goal ended: the next tick holds, whatever is queued
        self.last_accepted = -math.inf  # monotonic time (min_goal_interval)

    def refusal(self, settings: ControlSettings, now: float, active: bool, estop: bool, time_limit: float
                ) -> tuple[str, str] | None:
        """(counter, why) a goal request is refused, or None; the instruction itself is checked by the caller (the
        model's limits). A request that passes counts as accepted from here on (the interval runs from it)."""
        if not active:
            return 'goal', 'the node is not active (lifecycle)'
        if not math.isfinite(time_limit) or time_limit < 0:
            return 'goal', f'time_limit must be a finite number of seconds ≥ 0, got {time_limit}'
        if estop:
            return 'goal', 'e-stop latched: call worldvla/reset_estop first'
        if self.running is not None and settings.goal_policy == 'reject':
            return 'goal', 'a goal is running (goal_policy reject)'
        if now - self.last_accepted < settings.min_goal_interval:
            return 'goal_rate', (f'a goal {now - self.last_accepted:.3f} s after the last accepted one '
                                 f'(min_goal_interval {settings.min_goal_interval:g} s)')
        self.last_accepted = now
        return None

    def start(self, goal: Goal, now: float, refusal: tuple[str, str] | None) -> bool:
        """Run ``goal`` (the running one is preempted), or end it at once with ``refusal`` = (outcome, message)
        when the node stopped accepting between the request and now. True when it runs."""
        goal.start = now
        if refusal is not None:
            self._finish(goal, *refusal, now)
            return False
        if self.running is not None:
            self.end('preempted', 'preempted by a newer goal', now)
        self.running = goal
        self.count('goals_accepted', 1)
        return True

    def end(self, outcome: str, message: str, now: float) -> Goal | None:
        """End the running goal: the next tick holds. The ended goal, or None when none ran."""
        goal, self.running = self.running, None
        if goal is None:
            return None
        self._finish(goal, outcome, message, now)
        self.ended_since_tick = True
        return goal

    def cancel(self, key: Any, now: float) -> bool:
        if self.running is not None and self.running.key is key:
            self.running.cancel_requested = True
            self.end('canceled', 'canceled', now)
            return True
        return False

    def limit_reached(self, now: float) -> tuple[str, str] | None:
        """(outcome, message) when the running goal has reached its step or time limit."""
        goal = self.running
        if goal is not None and goal.max_steps and goal.steps >= goal.max_steps:
            return 'step_limit', f'{goal.steps} steps sent (max_steps)'
        if goal is not None and goal.time_limit and now - goal.start >= goal.time_limit:
            return 'time_limit', f'time limit {goal.time_limit:g} s'
        return None

    def take_ended(self) -> bool:
        """True once after any goal ended (the tick that follows holds)."""
        ended, self.ended_since_tick = self.ended_since_tick, False
        return ended

    def _finish(self, goal: Goal, outcome: str, message: str, now: float) -> None:
        if goal.outcome:  # exactly one outcome
            return
        goal.outcome, goal.message, goal.end = outcome, message, now
        self.count(f'goals_{outcome}', 1)
        goal.done.set()
