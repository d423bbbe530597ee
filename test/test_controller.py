"""The control loop without ROS, driven as an adversary would: random sequences of frames, chunks (NaN and huge
values among them), ticks, e-stops, resets, goals, cancels, successes, lifecycle changes and parameter changes.
After every command: within the limits in force when it was sent; only holds while the e-stop is latched; no
motion once a cancel is answered; every goal ends with exactly one outcome; the counters add up."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from worldvla_ros.control import Command, Controller, ControlSettings, Goal
from worldvla_ros.control.loop import SynchronousLoop
from worldvla_ros.safety import SafetyLimits

BOUND = st.floats(0.05, 2.0)


def limits_strategy() -> st.SearchStrategy[SafetyLimits]:
    def build(hi: list[float], step: list[float]) -> SafetyLimits:
        return SafetyLimits(tuple(-h for h in hi), tuple(hi), tuple(step))

    return st.builds(build, st.lists(BOUND, min_size=7, max_size=7),
                     st.lists(st.sampled_from([0.0, 0.05, 0.3]), min_size=7, max_size=7))


class ControlLoop(RuleBasedStateMachine):
    """The controller and a model of what may go out, checked at every command."""

    @initialize(limits=limits_strategy(), threshold=st.sampled_from([-1, 0, 1, 3]),
                merge=st.sampled_from(['replace', 'ensemble']))
    def start(self, limits: SafetyLimits, threshold: int, merge: str) -> None:
        self.ctrl = Controller(ControlSettings(replan_threshold=threshold, chunk_merge=merge, enabled=True,
                                               history_frames=2, min_goal_interval=0.0), limits)
        self.ctrl.set_instruction('put the red block in the bowl')
        self.ctrl.activate()
        self.now = 100.0
        self.stamp = 10**12
        self.limits = limits
        self.latched = False
        self.motion_forbidden = False  # a cancel was answered and no new task came since
        self.floor = 0  # motion only from chunks numbered from here: none of an ended task or from before a reset
        self.goals: list[Goal] = []
        self.chunks = self.holds = self.motion = 0
        self.sent: list[Command] = []

    def _advance(self, dt: float = 0.1) -> None:
        self.now += dt
        self.stamp += round(dt * 1e9)

    def _stop_old(self) -> None:
        """From now on no command of a chunk computed so far may move the robot."""
        self.floor = self.ctrl.sequence

    def _check(self, cmd: Command | None) -> None:
        if cmd is None:
            return
        a = np.asarray(cmd.action)
        lo, hi = np.asarray(self.limits.action_min), np.asarray(self.limits.action_max)
        assert a.shape == (7,) and np.all(np.isfinite(a)), a
        assert np.all(a >= lo - 1e-9) and np.all(a <= hi + 1e-9), (a, lo, hi)
        previous = self.sent[-1].action if self.sent else None
        if not cmd.hold and previous is not None:
            step = np.asarray(self.limits.max_step)
            limited = (step > 0) & np.isfinite(previous)
            # from the last command brought into the bounds in force now (bounds may have narrowed since)
            previous = np.clip(previous, lo, hi)
            assert np.all(np.abs(a - previous)[limited] <= step[limited] + 1e-9), (a, previous, step)
        if cmd.hold:
            assert np.all(a[:6] == 0.0)
        else:
            assert not self.latched, 'motion while the e-stop is latched'
            assert not self.motion_forbidden, 'motion after a cancel was answered'
            assert cmd.chunk_sequence >= self.floor, 'motion of a task that ended, or from before a reset'
        self.holds += cmd.hold
        self.motion += not cmd.hold
        self.sent.append(cmd)

    @rule(dt=st.sampled_from([0.0, 0.05, 0.1, 0.6]))
    def frame(self, dt: float) -> None:
        self._advance(dt)
        self.ctrl.on_frame(object(), self.stamp, self.now)

    @rule(chunk=st.lists(st.lists(st.floats(-5.0, 5.0), min_size=7, max_size=7), min_size=1, max_size=5),
          age=st.sampled_from([0.0, 0.0, 0.0, 0.2, 2.0, -1.0]))
    def frame_and_chunk(self, chunk: list[list[float]], age: float) -> None:
        """A frame, and the model's answer if the controller asks (the node's worker, at once); the frame may
        be stale or from the future when the request is made."""
        self._answer(np.asarray(chunk, dtype=np.float64), age)

    @rule(bad=st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -1e300]), where=st.integers(0, 6))
    def frame_and_broken_chunk(self, bad: float, where: int) -> None:
        chunk = np.full((3, 7), 0.2)
        chunk[1, where] = bad
        self._answer(chunk, 0.0)

    def _answer(self, actions: np.ndarray, age: float) -> None:
        self._advance(0.02)
        self.ctrl.on_frame(object(), self.stamp, self.now)
        request = self.ctrl.next_request(self.stamp + round(age * 1e9), self.now)
        if request is None:
            return
        if self.ctrl.on_chunk(request, actions, self.now) is not None:
            self.chunks += 1

    @rule(dt=st.sampled_from([0.05, 0.1, 0.1, 0.1, 1.5]), ticks=st.integers(1, 6))
    def tick(self, dt: float, ticks: int) -> None:
        for _ in range(ticks):
            self._advance(dt)
            running = self.ctrl.goals.running
            cmd = self.ctrl.tick(self.now, self.stamp)
            if running is not None and running.outcome:  # ended at this tick, on its step or time limit
                self._stop_old()
            self._check(cmd)

    @rule()
    def estop(self) -> None:
        self.ctrl.on_estop(self.now)
        self.latched = True
        self._stop_old()

    @rule()
    def reset(self) -> None:
        if self.ctrl.reset_estop(self.stamp):  # a reset of nothing changes nothing
            self._stop_old()
        self.latched = False

    @rule(max_steps=st.integers(0, 6), time_limit=st.sampled_from([0.0, 0.3, 5.0]))
    def goal(self, max_steps: int, time_limit: float) -> None:
        if self.ctrl.goal_refusal(self.now, time_limit) is not None:
            return
        goal = Goal(object(), 'stack the blocks', max_steps, time_limit)
        self.goals.append(goal)
        if self.ctrl.start_goal(goal, self.now):
            self.motion_forbidden = False
            self._stop_old()

    @precondition(lambda self: self.goals)
    @rule(which=st.integers(0, 50))
    def cancel(self, which: int) -> None:
        goal = self.goals[which % len(self.goals)]
        if self.ctrl.cancel_goal(goal.key, self.now):
            self.motion_forbidden = True
            self._stop_old()

    @rule()
    def success(self) -> None:
        if self.ctrl.goals.running is not None:
            self._stop_old()
        self.ctrl.on_success('the sim says so', self.now)

    @rule(text=st.sampled_from(['open the drawer', 'put the red block in the bowl', None]))
    def instruction(self, text: str | None) -> None:
        if self.ctrl.set_instruction(text) == 'changed':
            self.motion_forbidden = False
            self._stop_old()

    @rule(limits=limits_strategy())
    def new_limits(self, limits: SafetyLimits) -> None:
        self.ctrl.set_limits(limits)
        self.limits = limits

    @rule(threshold=st.sampled_from([-1, 0, 2]), merge=st.sampled_from(['replace', 'ensemble']),
          enabled=st.booleans())
    def new_settings(self, threshold: int, merge: str, enabled: bool) -> None:
        self.ctrl.update(replan_threshold=threshold, chunk_merge=merge, enabled=enabled)

    @rule()
    def deactivate_and_activate(self) -> None:
        self._stop_old()
        self._check(self.ctrl.deactivate(self.now, self.stamp))
        assert self.ctrl.tick(self.now + 0.1, self.stamp) is None  # inactive: nothing goes out
        self.ctrl.activate()

    @invariant()
    def goals_end_once(self) -> None:
        running = self.ctrl.goals.running
        for g in self.goals:
            assert (g.outcome == '') == (g is running), (g.outcome, g is running)
            assert g.done.is_set() == bool(g.outcome)

    def teardown(self) -> None:
        self._check(self.ctrl.close(self.now, self.stamp))
        assert all(g.outcome and g.done.is_set() for g in self.goals)  # every goal has its one outcome
        c = self.ctrl.stats.counts
        ended = sum(v for k, v in c.items() if k.startswith('goals_') and k != 'goals_accepted')
        assert ended == len(self.goals)
        assert c['chunks'] == self.chunks
        assert sum(v for k, v in c.items() if k.startswith('holds_')) == self.holds
        assert self.holds + self.motion == len(self.sent)


ControlLoop.TestCase.settings = settings(max_examples=400, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_control_loop_under_random_events = ControlLoop.TestCase


def test_a_replanned_chunk_waits_for_a_frame_after_the_last_command() -> None:
    """Replanning (threshold ≥ 0): the next chunk comes from a frame that shows the last command's effect, as the
    release computes the next chunk from the observation after the last action."""
    seen: list[list[str]] = []

    def infer(request):
        seen.append(list(request.frames))
        return np.full((3, 7), 0.1), 0.0

    ctrl = Controller(ControlSettings(replan_threshold=0, enabled=True, history_frames=1),
                      SafetyLimits((-1.0,) * 7, (1.0,) * 7, (0.0,) * 7))
    ctrl.set_instruction('go')
    ctrl.activate()
    loop = SynchronousLoop(ctrl, infer)
    sent = [loop.step(f'frame {i}', i * 100_000_000) for i in range(7)]
    assert seen == [['frame 0'], ['frame 3'], ['frame 6']]  # chunk length 3: frames 0, 3, 6
    assert all(c is not None and not c.hold for c in sent)


def test_the_control_package_imports_neither_ros_nor_torch() -> None:
    code = ('import sys, worldvla_ros.control, worldvla_ros.control.loop; '
            'print([m for m in ("rclpy", "torch") if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('field', ['rate_hz', 'watchdog_timeout', 'ensemble_decay'])
def test_settings_that_make_no_sense_are_refused(field: str) -> None:
    with pytest.raises(ValueError):
        ControlSettings(**{field: -1.0})


def test_the_settings_defaults_are_the_action_nodes() -> None:
    """Lockstep, the sims and the fleet get the node's behaviour where a parameter file is silent."""
    from dataclasses import fields

    from worldvla_ros.control.types import PARAMETER_FIELDS
    from worldvla_ros.nodes.action_parameters import PARAMETERS

    defaults = {f.name: f.default for f in fields(ControlSettings)}
    for name, field in PARAMETER_FIELDS.items():
        assert PARAMETERS[name].default == defaults[field], name
    assert ControlSettings.from_parameters({'replan_threshold': 2, 'unrelated': 1}).replan_threshold == 2
