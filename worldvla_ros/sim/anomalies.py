"""Normal and anomalous transitions of the tabletop sim, for measuring the world-model monitor.

Use held-out layout seeds (100000–199999): the bundled model's training used 0–999, 200000–211999,
300000–303999, 400000–401499, 500000–511499 and, for its last fine-tune, 700000+ and 720000+. Calibrated
on layouts from 240000 on and tested on layouts from 150000 on, the monitor alarmed on 11–15 % of normal
transitions instead of 5 % (3 % the other way round), for a reason not found; the benchmark keeps to one range.

A transition is (frame, commanded action, real next frame). Normal: the expert's command executed.
Anomalies, each on its own held-out layout:
- ``teleported``: the named block jumps 6–15 cm during the step.
- ``removed``: the other block vanishes during the step.
- ``stuck``: the arm was commanded to move at least 1 cm and did not (the next frame is the current one).
- ``slipped``: a held block drops to the table where it was while the gripper carries on.
- ``camera_bump``: the next frame is shifted by 2 model pixels.
- ``lighting``: the next frame's colour balance changes (per-channel gain 0.75–0.9 or 1.1–1.25).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .record import diverse_start, with_exploration_noise
from .tabletop import TABLE, SimConfig, TabletopSim, scripted_action

KINDS = ('teleported', 'removed', 'stuck', 'slipped', 'camera_bump', 'lighting')
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
        nxt = sim.step(action)
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
        elif kind == 'stuck':
            nxt = frame.copy()
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
