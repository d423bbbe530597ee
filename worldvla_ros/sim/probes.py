"""Does a policy read the scene's geometry? Controlled placements instead of expert trajectories."""
from __future__ import annotations

from typing import Any

import numpy as np

from .tabletop import HOVER_Z, TABLE, TabletopSim

OFFSETS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def reach_direction_probe(policy: Any, seeds: range | list[int], offset: float = 0.12,
                          sim: TabletopSim | None = None) -> dict[str, float]:
    """Put the gripper ``offset`` m beside the named block (±x, ±y, hover height, open) and check the
    sign of the commanded move along that axis (mean of the chunk's first two actions).

    The expert would move toward the block every time; a policy that ignores where the gripper is
    relative to the block scores about 0.5. Placements off the table are skipped.
    """
    sim = sim or TabletopSim()
    hits: dict[str, list[bool]] = {'x': [], 'y': []}
    for seed in seeds:
        sim.reset(seed)
        block = sim.state.blocks[sim.task[1]][:2].copy()
        for d in OFFSETS:
            pos = block + offset * np.asarray(d, dtype=float)
            if np.any(pos < 0.02) or np.any(pos > TABLE - 0.02):
                continue
            sim.state.gripper[:] = [*pos, HOVER_Z]
            move = np.asarray(policy.predict_actions([sim.render()], sim.instruction))[:2].mean(0)
            axis = 0 if d[0] else 1
            hits['xy'[axis]].append(bool(np.sign(move[axis]) == -np.sign(d[axis])))
    return {k: round(float(np.mean(v)), 4) if v else float('nan') for k, v in hits.items()} | {
        'placements': sum(len(v) for v in hits.values())}
