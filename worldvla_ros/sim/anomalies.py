"""Normal and anomalous transitions of the tabletop sim, for measuring the world-model monitor.

Use held-out layout seeds (100000–199999): the bundled model's training used 0–999, 200000–211999,
300000–303999, 400000–401499, 500000–511499 and, for its last fine-tune, 700000+ and 720000+. Calibrated
on layouts from 240000 on and tested on layouts from 150000 on, the monitor alarmed on 11–15 % of normal
transitions instead of 5 % (3 % the other way round), for a reason not found; the benchmark keeps to one range.

A transition is (frame, commanded action, real next frame). Normal: the expert's command executed.
Anomalies, each on its own held-out layout:
- ``teleported``: the named block jumps 6–15 cm during the step.
- ``removed``: the other block vanishes during the step.
- ``stuck``: the arm was commanded to move at least 1 cm and did not (the sim steps with the arm held still; the
  gripper opens and closes as commanded. The sim renders without sensor noise, so the frame changes only where the
  fingers move).
- ``slipped``: a held block drops to the table where it was while the gripper carries on.
- ``camera_bump``: the next frame is shifted by 2 model pixels.
- ``lighting``: the next frame's colour balance changes (per-channel gain 0.75–0.9 or 1.1–1.25).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .record import diverse_start, with_exploration_noise
from .tabletop import TABLE, SimConfig, TabletopSim, scripted_action

KINDS = ('teleported', 'removed', 'stuck', 'slipped', 'camera_bump', 'lighting')
FAULTS = ('wrong_direction', 'flipped_x', 'wrong_axis', 'late_frames', 'stuck_arm')  # from an onset to the end
LATE_STEPS = 2
MIN_FAULT_STEPS = 5  # faulty transitions a fault episode keeps where the normal episode is long enough
MIN_STUCK_MOTION = 0.5  # action units (1 cm at the sim's 2 cm per unit): a stuck arm is only visible if told to move


@dataclass
class Transition:
    frame: np.ndarray
    action: np.ndarray  # (7,) the command the robot was given
    next_frame: np.ndarray
    kind: str  # 'normal' or one of KINDS
    seed: int


def _state(seed: int, rng: np.random.Generator, config: SimConfig | None, held: float) -> TabletopSim:
    """A layout, a diverse start, then a few expert steps: states like those the robot visits."""
    sim = TabletopSim(config)
    sim.reset(seed)
    diverse_start(sim, rng, held=held)
    for _ in range(int(rng.integers(0, 8))):
        if sim.done:
            break
        sim.step(with_exploration_noise(scripted_action(sim), rng, 0.1))
    return sim


def _command(sim: TabletopSim, rng: np.random.Generator) -> np.ndarray:
    return with_exploration_noise(scripted_action(sim), rng, 0.1)


def normal_transition(seed: int, config: SimConfig | None = None) -> Transition:
    rng = np.random.default_rng(seed)
    sim = _state(seed, rng, config, held=0.3)
    frame, action = sim.render(), _command(sim, rng)
    return Transition(frame, action, sim.step(action), 'normal', seed)


def anomalous_transition(kind: str, seed: int, config: SimConfig | None = None, model_resolution: int = 64
                         ) -> Transition:
    """One transition of ``kind`` (see the module's doc) on layout ``seed``."""
    if kind not in KINDS:
        raise ValueError(f'unknown anomaly {kind!r}; one of {KINDS}')
    rng = np.random.default_rng(seed)
    for attempt in range(200):
        # another layout when this one has no state for the kind: far above every training seed range
        sim = _state(seed + 1_000_000 * attempt, rng, config, held=1.0 if kind == 'slipped' else 0.3)
        s, (_, named, _) = sim.state, sim.task
        frame, action = sim.render(), _command(sim, rng)
        if kind == 'stuck' and np.linalg.norm(action[:3]) < MIN_STUCK_MOTION:
            continue
        if kind == 'slipped' and (s.held is None or action[6] <= 0):
            continue
        before = {k: v.copy() for k, v in s.blocks.items()}
        # stuck: the sim executes the step with the arm held still (the gripper still opens and closes, a held
        # block stays held): the frame is the one the scene really shows, not a copy of the last
        nxt = sim.step(executed_action('stuck_arm', action) if kind == 'stuck' else action)
        if kind == 'teleported':
            if s.held == named:
                s.held = None
            for _ in range(100):
                r, phi = rng.uniform(0.06, 0.15), rng.uniform(0, 2 * np.pi)
                xy = s.blocks[named][:2] + r * np.array([np.cos(phi), np.sin(phi)])
                if np.all((xy > 0.03) & (xy < TABLE - 0.03)):
                    break
            s.blocks[named] = np.array([xy[0], xy[1], 0.0])
            nxt = sim.render()
        elif kind == 'removed':
            other = next(k for k in s.blocks if k != named)
            if s.held == other:
                s.held = None
            del s.blocks[other]
            nxt = sim.render()
        elif kind == 'slipped':
            s.held = None
            s.blocks[named] = np.array([*before[named][:2], 0.0])
            nxt = sim.render()
        elif kind == 'camera_bump':
            px = 2 * nxt.shape[0] / model_resolution
            phi = rng.uniform(0, 2 * np.pi)
            m = np.float32([[1, 0, px * np.cos(phi)], [0, 1, px * np.sin(phi)]])
            nxt = cv2.warpAffine(nxt, m, (nxt.shape[1], nxt.shape[0]), borderMode=cv2.BORDER_REPLICATE)
        elif kind == 'lighting':
            gain = rng.uniform(0.75, 0.9, 3) if rng.random() < 0.5 else rng.uniform(1.1, 1.25, 3)
            nxt = np.clip(np.round(nxt.astype(np.float64) * gain), 0, 255).astype(np.uint8)
        return Transition(frame, action, nxt, kind, seed)
    raise RuntimeError(f'no state for {kind!r} from seed {seed}')


@dataclass
class FaultEpisode:
    """What the monitor sees of one episode: frames ``observed[k]`` at command ``commands[k]`` (transition k is
    observed[k] → observed[k + 1] under commands[k]); the fault from transition ``onset`` on (None: normal)."""

    observed: list[np.ndarray]
    commands: list[np.ndarray]
    fault: str | None
    onset: int | None
    seed: int
    instruction: str = ''
    executed: list[np.ndarray] = field(default_factory=list)

    def transitions(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]]:
        """(frame, command, next frame, the two commands before) of each transition."""
        return [(self.observed[k], self.commands[k], self.observed[k + 1], self.commands[max(0, k - 2):k])
                for k in range(len(self.commands))]


def executed_action(fault: str | None, command: np.ndarray, turn: int = 1) -> np.ndarray:
    """What a faulty robot executes for ``command``: ``wrong_direction`` negates translation and rotation (a sign
    error in a driver), ``flipped_x`` negates Δx alone (one axis' sign), ``wrong_axis`` turns the translation by
    90° about z (``turn`` ±1: a wrong frame), ``stuck_arm`` moves nothing (the gripper still opens and closes)."""
    a = np.asarray(command, dtype=np.float64).copy()
    if fault == 'wrong_direction':
        a[:6] = -a[:6]
    elif fault == 'flipped_x':
        a[0] = -a[0]
    elif fault == 'stuck_arm':
        a[:6] = 0.0
    elif fault == 'wrong_axis':
        a[:2] = (-turn * command[1], turn * command[0])
    return a


def fault_episode(fault: str | None, seed: int, steps: int = 40, onset: int | None = None,
                  config: SimConfig | None = None, noise: float = 0.1) -> FaultEpisode:
    """An expert-driven episode on layout ``seed`` (a diverse start), with ``fault`` (one of ``FAULTS``, or None)
    from transition ``onset`` to the end; until the onset it is the normal episode of ``seed``. The default onset
    is a random transition in the first half of the normal episode that leaves at least ``MIN_FAULT_STEPS``
    transitions after it (where the normal episode is long enough). ``late_frames``: the robot
    moves as commanded, but from the onset each frame the monitor receives is ``LATE_STEPS`` steps old (a lagging
    camera stamped on arrival)."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f'unknown fault {fault!r}; one of {FAULTS}')
    if fault is not None and onset is None:
        # within the first half of the normal episode (the same until the onset), leaving MIN_FAULT_STEPS faulty
        # transitions where it is long enough: an expert that finishes early would otherwise see no fault at all
        n = len(fault_episode(None, seed, steps, config=config, noise=noise).commands)
        last = max(LATE_STEPS + 2, min(max(steps // 2, LATE_STEPS + 2), n - MIN_FAULT_STEPS + 1))
        onset = int(np.random.default_rng([seed, 1]).integers(LATE_STEPS + 1, last))
    turn = 1 if np.random.default_rng([seed, 2]).random() < 0.5 else -1
    rng = np.random.default_rng(seed)
    sim = TabletopSim(config)
    sim.reset(seed)
    diverse_start(sim, rng, held=0.3)
    real, commands, executed = [sim.render()], [], []
    for k in range(steps):
        if sim.done:
            break
        command = with_exploration_noise(scripted_action(sim), rng, noise)
        faulty = fault is not None and fault != 'late_frames' and onset is not None and k >= onset
        done = executed_action(fault if faulty else None, command, turn)
        real.append(sim.step(done))
        commands.append(command)
        executed.append(done)
    observed = list(real)
    if fault == 'late_frames' and onset is not None:
        # the frame received when command k is sent (and after the last one) is real[k - LATE_STEPS] from the
        # onset's next frame on: the first late transition ends on a frame older than the one it starts from
        for k in range(onset + 1, len(real)):
            observed[k] = real[k - LATE_STEPS]
    return FaultEpisode(observed, commands, fault, onset, seed, sim.instruction, executed)
