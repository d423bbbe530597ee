"""A tabletop with two blocks, a bowl and a plate, and a parallel gripper moved by 7-DoF deltas.

Actions follow the release's convention and ranges (LIBERO OSC_POSE deltas, spec §4): Δx, Δy, Δz
scaled by ``SimConfig.meters_per_unit`` per step, Δroll/Δpitch ignored, Δyaw turns the gripper,
gripper −1 open / +1 closed. The camera looks down at the table through a pinhole (things nearer the
camera look larger) and the gripper casts a shadow. From straight above, height would show only as that growth, a
pixel or so of the model's frame; the lamp stands ``SimConfig.light_slant_deg`` (default 60°) from vertical, so the
shadow falls away from the gripper by its height (0: just beside it, the lighting of the models before 2026-12-07).
``SimConfig.camera_tilt_deg`` tilts the camera instead (an oblique view like LIBERO's agentview), where height moves
the gripper up the image.
The table is lit with a colour gradient (redder to the right, bluer towards the bottom of the image): every
image patch then says where on the table it is, which a few-layer model trained briefly on a CPU hardly works out
from rotary positions alone (a flat-coloured table gave 63 % correct move directions after 4000
steps).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN

BLOCKS = {'red': (215, 40, 40), 'green': (40, 170, 60)}
TARGETS = ('bowl', 'plate')
TASKS = tuple(
    (f'put the {b} block {"in the bowl" if t == "bowl" else "on the plate"}', b, t) for t in TARGETS for b in BLOCKS
)
TABLE = 0.5  # m, square table seen by the camera
HOVER_Z = 0.08
FLOOR = (120, 110, 100)  # colour around the table


@dataclass(frozen=True)
class SimConfig:
    image_size: int = 128
    meters_per_unit: float = 0.02  # Δxyz per step for an action value of 1.0
    radians_per_unit: float = 0.1  # Δyaw per step for an action value of 1.0 (roll and pitch are ignored)
    max_steps: int = 100
    grasp_radius: float = 0.03  # m, gripper-to-block distance (xy) that still grasps
    grasp_height: float = 0.025  # m, the gripper must be this low to grasp
    target_radius: float = 0.05  # m, a block released this close to the target's center counts
    camera_height: float = 0.9  # m above the table (its distance from the table's centre)
    # 0: straight down (the bundled model's view). > 0: the camera swings towards the image's bottom edge by this
    # many degrees, still aimed at the table's centre (LIBERO's agentview is oblique): height then moves the
    # gripper up the image and away from its shadow, where a view from above shows it only as a slight growth
    camera_tilt_deg: float = 0.0
    # > 0 (the bundled model's lighting since 2026-12-07: 60): a lamp this many degrees from vertical throws the
    # gripper's shadow towards the image's bottom right by height × tan(slant), so the gap between gripper and
    # shadow shows its height in a view from above. 0: the shadow falls just beside the gripper and height shows
    # as a pixel of growth (the lighting of the models before)
    light_slant_deg: float = 60.0

    @property
    def action_scale(self) -> tuple[float, ...]:
        """Metres / radians per action unit (the action node's ``action_scale``; sim ignores roll, pitch)."""
        m, r = self.meters_per_unit, self.radians_per_unit
        return (m, m, m, r, r, r, 1.0)


@dataclass
class SimState:
    gripper: np.ndarray  # x, y, z (m)
    yaw: float
    closed: bool
    blocks: dict[str, np.ndarray]  # name → x, y, z
    targets: dict[str, np.ndarray]  # name → x, y
    held: str | None = None
    steps: int = 0
    success: bool = False
    trace: list[str] = field(default_factory=list)


class TabletopSim:
    """``reset(seed, task)`` → frame; ``step(action)`` → frame; ``success`` / ``done``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.task: tuple[str, str, str] = TASKS[0]
        self.state = self._layout(np.random.default_rng(0))
        self._lo = np.asarray(LIBERO_ACTION_MIN)
        self._hi = np.asarray(LIBERO_ACTION_MAX)

    @property
    def instruction(self) -> str:
        return self.task[0]

    @property
    def success(self) -> bool:
        return self.state.success

    @property
    def done(self) -> bool:
        return self.state.success or self.state.steps >= self.config.max_steps

    def reset(self, seed: int, task: int | None = None, holding_near: float = 0.0) -> np.ndarray:
        """A new layout; ``holding_near`` > 0: the named block starts in the closed gripper, 4 cm up and within
        that many metres (xy) of its target, so only the release remains (the layout stays the seed's)."""
        rng = np.random.default_rng(seed)
        self.task = TASKS[int(rng.integers(len(TASKS))) if task is None else task % len(TASKS)]
        self.state = self._layout(rng)
        if holding_near > 0:
            s, (_, block, target) = self.state, self.task
            r, phi = holding_near * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            xy = np.clip(s.targets[target] + r * np.array([np.cos(phi), np.sin(phi)]), 0.02, TABLE - 0.02)
            s.gripper = np.array([*xy, 0.04])
            s.held, s.closed = block, True
            s.blocks[block] = np.array([xy[0], xy[1], 0.03])
        return self.render()

    @staticmethod
    def _layout(rng: np.random.Generator) -> SimState:
        spots: list[np.ndarray] = []
        while len(spots) < 4:  # two blocks, bowl, plate; apart from each other
            p = rng.uniform(0.08, TABLE - 0.08, 2)
            if all(np.linalg.norm(p - q) > 0.12 for q in spots):
                spots.append(p)
        blocks = {name: np.array([*spots[i], 0.0]) for i, name in enumerate(BLOCKS)}
        targets = {name: spots[2 + i] for i, name in enumerate(TARGETS)}
        gripper = np.array([*rng.uniform(0.1, TABLE - 0.1, 2), rng.uniform(0.06, 0.12)])
        return SimState(gripper, 0.0, False, blocks, targets)

    def step(self, action: np.ndarray) -> np.ndarray:
        """Apply one command (clamped to the release's ranges; non-finite → ignored)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        s = self.state
        if a.size != 7 or not np.all(np.isfinite(a)) or self.done:
            return self.render()
        a = np.clip(a, self._lo, self._hi)
        c = self.config
        s.gripper = s.gripper + a[:3] * c.meters_per_unit
        s.gripper[:2] = np.clip(s.gripper[:2], 0.02, TABLE - 0.02)
        s.gripper[2] = np.clip(s.gripper[2], 0.0, 0.2)
        s.yaw = float(np.clip(s.yaw + a[5] * c.radians_per_unit, -np.pi / 2, np.pi / 2))
        close = a[6] > 0
        if close and not s.closed:
            for name, pos in s.blocks.items():
                if np.linalg.norm(pos[:2] - s.gripper[:2]) < c.grasp_radius and s.gripper[2] < c.grasp_height:
                    s.held = name
                    break
        elif not close and s.closed and s.held is not None:
            block = s.blocks[s.held]
            block[2] = 0.0
            s.held = None
            _, want_block, want_target = self.task
            if np.linalg.norm(s.blocks[want_block][:2] - s.targets[want_target]) < c.target_radius:
                s.success = True
        s.closed = close
        if s.held is not None:
            s.blocks[s.held] = np.array([s.gripper[0], s.gripper[1], max(s.gripper[2] - 0.01, 0.0)])
        s.steps += 1
        return self.render()

    # -- camera ---------------------------------------------------------------------------
    def _px(self, x: float, y: float, z: float = 0.0) -> tuple[tuple[int, int], float]:
        """Pinhole aimed at the table's center: (pixel, scale) of a point at height z (scale: its size relative to
        the table's centre)."""
        u, v, scale = self._project(x, y, z)
        return (round(u), round(v)), scale

    def _project(self, x: float, y: float, z: float = 0.0) -> tuple[float, float, float]:
        c = self.config
        n = c.image_size
        if not c.camera_tilt_deg:
            scale = c.camera_height / (c.camera_height - z)
            return (n / 2 + (x - TABLE / 2) / TABLE * n * 0.92 * scale,
                    n / 2 + (y - TABLE / 2) / TABLE * n * 0.92 * scale, scale)
        t = np.radians(c.camera_tilt_deg)
        # camera on the image-bottom side of the table's centre; right = +x, down = (0, cos t, -sin t)
        qx, qy, qz = x - TABLE / 2, y - TABLE / 2 - c.camera_height * np.sin(t), z - c.camera_height * np.cos(t)
        depth = -qy * np.sin(t) - qz * np.cos(t)
        down = qy * np.cos(t) - qz * np.sin(t)
        focal = n * 0.92 * c.camera_height / TABLE
        return n / 2 + focal * qx / depth, n / 2 + focal * down / depth, float(c.camera_height / depth)

    def _background(self) -> np.ndarray:
        key = (self.config.image_size, self.config.camera_tilt_deg)
        if getattr(self, '_bg_key', None) != key:
            self._bg, self._bg_key = self._draw_background(), key
        return self._bg.copy()

    def _draw_background(self) -> np.ndarray:
        """The gradient table on the floor: drawn into its rectangle from above, warped in perspective tilted."""
        n = self.config.image_size
        if not self.config.camera_tilt_deg:
            img = np.full((n, n, 3), FLOOR, np.uint8)
            (x0, y0), _ = self._px(0, 0)
            (x1, y1), _ = self._px(TABLE, TABLE)
            img[y0 : y1 + 1, x0 : x1 + 1] = _table_texture(x1 - x0 + 1, y1 - y0 + 1)
            return img
        m = 256
        corners = np.float32([self._project(x, y)[:2] for x, y in ((0, 0), (TABLE, 0), (TABLE, TABLE), (0, TABLE))])
        src = np.float32([(0, 0), (m - 1, 0), (m - 1, m - 1), (0, m - 1)])
        return cv2.warpPerspective(_table_texture(m, m), cv2.getPerspectiveTransform(src, corners), (n, n),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=FLOOR)

    def _disc(self, img: np.ndarray, center: tuple[int, int], radius: int, color: tuple, thickness: int) -> None:
        """A flat disc on the table: a circle from above, foreshortened into an ellipse by a tilted camera."""
        tilt = self.config.camera_tilt_deg
        if not tilt:
            cv2.circle(img, center, radius, color, thickness)
        else:
            axes = (radius, max(1, round(radius * np.cos(np.radians(tilt)))))
            cv2.ellipse(img, center, axes, 0.0, 0.0, 360.0, color, thickness)

    def render(self) -> np.ndarray:
        s, n = self.state, self.config.image_size
        k = n / 128  # sizes are drawn for 128 px
        img = self._background()
        bowl, _ = self._px(*s.targets['bowl'])
        self._disc(img, bowl, round(12 * k), (60, 90, 200), -1)
        self._disc(img, bowl, round(8 * k), (40, 60, 150), -1)
        plate, _ = self._px(*s.targets['plate'])
        self._disc(img, plate, round(12 * k), (235, 235, 235), -1)
        self._disc(img, plate, round(12 * k), (160, 160, 160), max(1, round(k)))
        for name, pos in s.blocks.items():
            (u, v), sc = self._px(*pos)
            h = round(5 * k * sc)
            cv2.rectangle(img, (u - h, v - h), (u + h, v + h), BLOCKS[name], -1)
        g = s.gripper
        if not self.config.light_slant_deg:
            shadow, _ = self._px(g[0], g[1], 0.0)
            self._disc(img, (shadow[0] + round(2 * k), shadow[1] + round(2 * k)), round((3 + 40 * g[2]) * k),
                       (90, 80, 70), -1)
        else:  # the shadow darkens what it falls on (a block too) instead of painting over it
            reach = g[2] * np.tan(np.radians(self.config.light_slant_deg)) / np.sqrt(2)
            shadow, _ = self._px(g[0] + reach, g[1] + reach, 0.0)
            mask = np.zeros(img.shape[:2], np.uint8)
            self._disc(mask, shadow, round((4 + 20 * g[2]) * k), 1, -1)
            img[mask > 0] = (img[mask > 0] * 0.45).astype(np.uint8)
        (u, v), sc = self._px(*g)
        half = (3 if s.closed else 8) * k * sc
        ca, sa = np.cos(s.yaw), np.sin(s.yaw)
        for side in (-1, 1):
            cx, cy = u + side * half * ca, v + side * half * sa
            w, h = 2 * k * sc, 5 * k * sc
            box = cv2.boxPoints(((cx, cy), (2 * w, 2 * h), np.degrees(s.yaw)))
            cv2.fillConvexPoly(img, np.round(box).astype(np.int32), (35, 35, 35))
        cv2.line(img, (round(u - half * ca), round(v - half * sa)), (round(u + half * ca), round(v + half * sa)),
                 (35, 35, 35), max(1, round(2 * k * sc)))
        return img


def _table_texture(width: int, height: int) -> np.ndarray:
    """The table's colour gradient (redder to the right, bluer towards the image's bottom), width × height."""
    u = np.linspace(0.0, 1.0, width)[None, :]
    v = np.linspace(0.0, 1.0, height)[:, None]
    table = np.stack(np.broadcast_arrays(150 + 90 * u, 185 - 50 * v + 0 * u, 95 + 110 * v + 0 * u), axis=-1)
    return np.round(table).astype(np.uint8)


def light_slant(text: str) -> float:
    """argparse type of ``--light-slant``: degrees of the lamp from vertical, in [0, 75]."""
    try:
        slant = float(text)
    except ValueError:
        slant = math.nan
    if not 0.0 <= slant <= 75.0:
        raise argparse.ArgumentTypeError(f'{text!r}: the light slant is in [0, 75] degrees')
    return slant


def camera_tilt(text: str) -> float:
    """argparse type of ``--camera-tilt``: degrees from straight down, in [0, 80]."""
    try:
        tilt = float(text)
    except ValueError:
        tilt = math.nan
    if not 0.0 <= tilt <= 80.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f'{text!r}: the camera tilt is in [0, 80] degrees')
    return tilt


def scripted_action(sim: TabletopSim, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """The expert: reach above the block, descend, close, lift, carry, lower, open."""
    s, c = sim.state, sim.config
    _, want_block, want_target = sim.task
    a = np.zeros(7)
    gain = 1.0 / c.meters_per_unit  # one step closes an error of meters_per_unit at full action

    def toward(xy: np.ndarray, z: float, near: float = 0.008) -> bool:
        err = xy - s.gripper[:2]
        flat = np.linalg.norm(err) < near
        a[:2] = err * gain * 0.8
        if not flat and s.gripper[2] < HOVER_Z - 0.01 and np.linalg.norm(err) > 0.03:
            a[2] = (HOVER_Z - s.gripper[2]) * gain  # lift before travelling
            a[:2] *= 0.3
        else:
            a[2] = (z - s.gripper[2]) * gain if flat else (max(z, HOVER_Z) - s.gripper[2]) * gain * 0.5
        return flat and abs(z - s.gripper[2]) < 0.006

    if s.held != want_block:
        if s.held is not None:  # the wrong block: put it down
            a[6] = -1.0
        else:
            block = s.blocks[want_block]
            there = toward(block[:2], 0.005)
            a[6] = 1.0 if there else -1.0
    else:
        there = toward(s.targets[want_target], 0.03)
        a[6] = -1.0 if there else 1.0
    if rng is not None and noise > 0:
        a[:3] += rng.normal(0, noise, 3)
    a[:6] = np.clip(a[:6], LIBERO_ACTION_MIN[:6], LIBERO_ACTION_MAX[:6])
    return a
