"""One recorded episode: camera frames, instruction and ground-truth actions, aligned per frame."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worldvla_ros.image_conversion import ImageRejected, compressed_msg_to_rgb, image_msg_to_rgb, to_model_frame

from .bag_io import (
    ACTION_CHUNK,
    COMPRESSED,
    EE_COMMAND,
    FLOAT_ARRAY,
    IMAGE,
    STRING,
    TWIST,
    BagError,
    BagReader,
    BagWriter,
    compressed_image_msg,
    ee_command_msg,
    image_msg,
    stamp_ns,
    string_msg,
)

ACTION_TYPES = (EE_COMMAND, ACTION_CHUNK, TWIST, FLOAT_ARRAY)
GRIPPER_TYPES = ('std_msgs/msg/Float64', 'std_msgs/msg/Float32', 'std_msgs/msg/Bool')


@dataclass
class TopicMap:
    """Which bag topics hold what. Empty names are found by message type when unambiguous."""

    image: str = ''
    instruction: str = ''
    actions: str = ''
    gripper: str = ''  # with TwistStamped ground truth: Float64/Float32 (value) or Bool (closed)
    instruction_text: str = ''  # overrides the instruction topic
    time_source: str = 'header'  # header stamps where a message has one, else the recording time
    gripper_open: float | None = None  # a Float64/Float32 gripper topic's value when open (→ −1) …
    gripper_closed: float | None = None  # … and when closed (→ +1)


@dataclass
class Episode:
    name: str
    instruction: str
    frame_ns: np.ndarray  # (N,) int64 time of each frame
    frames: list[np.ndarray]  # N × (H, W, 3) uint8 RGB, as image_msg_to_rgb returns them
    actions: np.ndarray  # (N, 7) ground truth per frame; NaN where the bag has none
    action_source: str = ''
    rejected_frames: dict[str, int] = field(default_factory=dict)
    conversion: str = ''  # how the recorded actions were turned into action units, when they were
    motion_frames: list[np.ndarray] = field(default_factory=list)  # gray motion-check crops, when asked for

    @property
    def period_s(self) -> float:
        """The camera's period: the median interval between frames (0 with fewer than two)."""
        return float(np.median(np.diff(self.frame_ns)) * 1e-9) if len(self.frame_ns) > 1 else 0.0

    @property
    def times_s(self) -> np.ndarray:
        """Seconds since the first frame, per frame."""
        return (self.frame_ns - self.frame_ns[0]) * 1e-9 if len(self.frame_ns) else np.zeros(0)

    def frame_index(self, ns: int, tolerance_ns: int = 1_000_000) -> int | None:
        i = int(np.searchsorted(self.frame_ns, ns))
        best = min((j for j in (i - 1, i) if 0 <= j < len(self.frame_ns)),
                   key=lambda j: abs(int(self.frame_ns[j]) - ns), default=None)
        if best is None or abs(int(self.frame_ns[best]) - ns) > tolerance_ns:
            return None
        return best


def _pick(reader: BagReader, given: str, types: Sequence[str], what: str, flag: str) -> str:
    if given:
        if given not in reader.topics:
            raise BagError(f'{reader.path}: no topic {given!r} for the {what} '
                           f'(the bag has: {", ".join(sorted(reader.topics)) or "no topics"})')
        if reader.topics[given] not in types:
            raise BagError(f'{reader.path}: topic {given!r} is {reader.topics[given]}, the {what} must be one of '
                           f'{", ".join(types)}')
        return given
    found = reader.topics_of_type(*types)
    if len(found) == 1:
        return found[0]
    if not found:
        raise BagError(f'{reader.path}: the bag has no {what} topic (a {" or ".join(types)}); it has: '
                       f'{", ".join(f"{t} [{m}]" for t, m in sorted(reader.topics.items())) or "no topics"}')
    raise BagError(f'{reader.path}: several {what} topics ({", ".join(found)}); choose one with {flag}')


def _time(m: Any, use_header: bool) -> int:
    h = getattr(m.msg, 'header', None)
    return stamp_ns(h.stamp) if use_header and h is not None else m.time_ns


def _action_of(msgtype: str, msg: Any) -> np.ndarray:
    if msgtype == EE_COMMAND:
        return np.asarray(msg.action, dtype=np.float64)
    if msgtype == TWIST:  # velocities here; twist_to_actions converts them once the period is known
        t = msg.twist
        return np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z, np.nan])
    data = np.asarray(msg.data, dtype=np.float64)
    if data.size < 7:
        raise ValueError(f'a Float64MultiArray action has {data.size} values, 7 are needed (Δxyz, Δrpy, gripper)')
    return data[:7]


def twist_to_actions(velocity: np.ndarray, period_s: float, action_scale: Sequence[float]) -> np.ndarray:
    """Recorded twists (m/s, rad/s) → action units per control period: a = v · T / s.

    ``s`` is the action scale (metres / radians one action unit moves in one period). The angular
    velocity ω is taken as a constant rotation over the period, so ω·T is the axis-angle Δrotation.
    """
    scale = np.asarray(action_scale, dtype=np.float64)[:6]
    if np.any(scale <= 0):
        raise BagError(f'TwistStamped ground truth needs an action scale > 0 in every motion dimension, got '
                       f'{list(scale)}')
    return velocity[..., :6] * period_s / scale


def gripper_to_action(value: np.ndarray, opened: float, closed: float) -> np.ndarray:
    """A gripper reading (position, width …) → the model's −1 (open) … +1 (closed), linear, clipped."""
    return np.clip(-1.0 + 2.0 * (value - opened) / (closed - opened), -1.0, 1.0)


def read_episode(path: str | Path, topics: TopicMap | None = None, action_scale: Sequence[float] | None = None,
                 period_s: float | None = None, frame_size: int | None = None, motion: bool = False) -> Episode:
    """Frames (decoded with the action node's own conversion) and per-frame ground truth.

    ``frame_size``: each frame is kept only as the model's square crop at that resolution
    (``to_model_frame``, unrotated), made as it is decoded — all a model reads of it, so memory stays at
    N × size² × 3 bytes whatever the camera's resolution. None keeps the decoded frames whole.
    TwistStamped ground truth is converted to action units with ``action_scale`` and the control
    period (``period_s``, else the camera's); a Float gripper topic needs ``gripper_open/closed``.
    ``motion``: also keep each frame's gray motion-check crop (``motion_check.motion_frame``, 128² bytes).
    """
    keep = (lambda rgb: np.array(rgb)) if frame_size is None else (
        lambda rgb: to_model_frame(rgb, frame_size, rotate_180=False))
    topics = topics or TopicMap()
    use_header = topics.time_source == 'header'
    with BagReader(path) as reader:
        image_topic = _pick(reader, topics.image, (IMAGE, COMPRESSED), 'camera image', '--image-topic')
        action_topic = _pick(reader, topics.actions, ACTION_TYPES, 'ground-truth action', '--action-topic')
        action_type = reader.topics[action_topic]
        if action_type == TWIST and action_scale is None:
            raise BagError(f'{reader.path}: TwistStamped ground truth on {action_topic} needs the action scale '
                           '(m and rad per action unit) to be compared with actions')
        gripper_topic = ''
        if action_type == TWIST and topics.gripper:
            gripper_topic = _pick(reader, topics.gripper, GRIPPER_TYPES, 'gripper', '--gripper-topic')
            if not reader.topics[gripper_topic].endswith('Bool') and (
                    topics.gripper_open is None or topics.gripper_closed is None
                    or topics.gripper_open == topics.gripper_closed):
                raise BagError(f'{reader.path}: gripper topic {gripper_topic} is {reader.topics[gripper_topic]}: '
                               'give --gripper-open and --gripper-closed (its values when open and when closed) '
                               'to map it to the model\'s -1 (open) … +1 (closed)')
        instruction = topics.instruction_text
        instruction_topic = ''
        if not instruction:
            instruction_topic = _pick(reader, topics.instruction, (STRING,), 'instruction', '--instruction-topic')
        declared_frames = reader.counts.get(image_topic, 0)
        if declared_frames == 0:
            raise BagError(f'{reader.path}: topic {image_topic} holds no messages')

        frame_ns, frames, rejected, why, gray = [], [], {}, {}, []
        act_ns, acts, grip_ns, grips = [], [], [], []
        wanted = [t for t in (image_topic, action_topic, gripper_topic, instruction_topic) if t]
        for m in reader.messages(wanted):
            if m.topic == image_topic:
                try:
                    rgb = compressed_msg_to_rgb(m.msg) if m.msgtype == COMPRESSED else image_msg_to_rgb(m.msg)
                except ImageRejected as exc:
                    rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
                    why.setdefault(exc.reason, str(exc))
                    continue
                frame_ns.append(_time(m, use_header))
                frames.append(keep(rgb))
                if motion:
                    from worldvla_ros.motion_check import motion_frame

                    gray.append(motion_frame(rgb))
            elif m.topic == action_topic:
                if m.msgtype == ACTION_CHUNK:
                    t0 = _time(m, use_header)
                    for i, c in enumerate(m.msg.commands):
                        act_ns.append((t0, i))
                        acts.append(np.asarray(c.action, dtype=np.float64))
                else:
                    try:
                        acts.append(_action_of(m.msgtype, m.msg))
                    except ValueError as exc:
                        raise BagError(f'{reader.path}: topic {action_topic}: {exc}') from exc
                    act_ns.append((_time(m, use_header), 0))
            elif m.topic == gripper_topic:
                grip_ns.append(_time(m, False))
                grips.append((1.0 if m.msg.data else -1.0) if m.msgtype.endswith('Bool') else float(m.msg.data))
            elif m.topic == instruction_topic and not instruction:
                instruction = ' '.join(m.msg.data.split())
    if not frames and not rejected:  # the metadata counted messages the storage no longer holds
        raise BagError(f'{path}: topic {image_topic} holds no readable messages (its metadata declares '
                       f'{declared_frames}): the bag is truncated or its storage was edited')
    if not frames:
        reasons = '; '.join(f'{n} × {why[r]}' for r, n in rejected.items())
        raise BagError(f'{path}: every frame on {image_topic} was rejected: {reasons}')
    if not instruction:
        raise BagError(f'{path}: no instruction (topic {instruction_topic} is empty); give --instruction')
    order = np.argsort(frame_ns, kind='stable')
    frame_ns_arr = np.asarray(frame_ns, dtype=np.int64)[order]
    frames = [frames[i] for i in order]
    gray = [gray[i] for i in order] if gray else []
    gt = align_actions(frame_ns_arr, act_ns, acts)
    conversion = ''
    if action_type == TWIST:
        period = period_s or (float(np.median(np.diff(frame_ns_arr)) * 1e-9) if len(frame_ns_arr) > 1 else 0.0)
        if period <= 0:
            raise BagError(f'{path}: one frame only: give the control rate to convert its twists')
        gt[:, :6] = twist_to_actions(gt, period, action_scale)
        conversion = (f'TwistStamped (m/s, rad/s) × {period * 1e3:.1f} ms / action scale '
                      f'{[round(float(x), 6) for x in np.asarray(action_scale, dtype=float)[:6]]}')
    if gripper_topic:
        # the gripper command in force during step i: the last one before frame i+1
        step_end = np.append(frame_ns_arr[1:] - 1, np.iinfo(np.int64).max)
        values = _hold_values(step_end, np.asarray(grip_ns, dtype=np.int64), np.asarray(grips))
        if not reader.topics[gripper_topic].endswith('Bool'):
            values = gripper_to_action(values, topics.gripper_open, topics.gripper_closed)
            conversion += (f'; gripper {topics.gripper_open:g} (open) … {topics.gripper_closed:g} (closed) '
                           '→ -1 … +1')
        gt[:, 6] = values
    if np.all(np.isnan(gt[:, :6])):
        raise BagError(f'{path}: no action on {action_topic} lines up with a camera frame; '
                       'try --time-source bag')
    return Episode(Path(path).name, instruction, frame_ns_arr, frames, gt, f'{action_topic} [{action_type}]',
                   rejected, conversion.lstrip('; '), gray)


def align_actions(frame_ns: np.ndarray, act_ns: Sequence[tuple[int, int]], acts: Sequence[np.ndarray]) -> np.ndarray:
    """Ground truth of frame i: the first action stamped at or after it (and before frame i+1).

    ``act_ns`` holds (stamp, offset): offset k > 0 (the k-th command of a recorded chunk) counts
    k frames on from the frame at ``stamp``. A later recorded chunk overrides an earlier one.
    """
    n = len(frame_ns)
    gt = np.full((n, 7), np.nan)
    if n == 0:
        return gt
    tol = 1_000_000  # header stamps copied from the frame may round by < 1 ms
    for (t, k), a in zip(act_ns, acts, strict=True):
        i = int(np.searchsorted(frame_ns, t + tol, side='right')) - 1
        if i < 0:
            continue  # commanded before the first frame
        if k == 0 and not np.all(np.isnan(gt[i])):
            continue  # several commands between two frames: the first one answers the frame
        if i + k < n:
            gt[i + k] = a
    return gt


def _hold_values(at_ns: np.ndarray, ns: np.ndarray, values: np.ndarray) -> np.ndarray:
    if len(ns) == 0:
        return np.full(len(at_ns), np.nan)
    idx = np.searchsorted(ns, at_ns, side='right') - 1
    out = values[np.clip(idx, 0, None)].astype(np.float64)
    out[idx < 0] = np.nan
    return out


def write_episode(
    path: str | Path,
    frames: Iterable[np.ndarray],
    actions: np.ndarray,
    instruction: str,
    rate_hz: float = 10.0,
    storage: str = 'mcap',
    start_ns: int = 1_700_000_000_000_000_000,
    image_topic: str = '/camera/image_raw',
    action_topic: str = '/teleop/ee_command',
    instruction_topic: str = '/instruction',
    compressed: str = '',
) -> Path:
    """A bag as a teleoperated robot records it: frame i at t_i, then the command sent for it.

    ``compressed`` ('png', 'jpeg'): the frames as CompressedImage on ``<image_topic>/compressed``.
    """
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, 7)
    if hasattr(frames, '__len__') and len(actions) != len(frames):
        raise ValueError(f'{len(frames)} frames but {len(actions)} actions')
    period = round(1e9 / rate_hz)
    with BagWriter(path, storage) as bag:  # frames may be an iterator: written as they come
        bag.write(instruction_topic, STRING, start_ns, string_msg(instruction))
        for i, (rgb, a) in enumerate(zip(frames, actions, strict=True)):
            t = start_ns + i * period
            if compressed:
                bag.write(f'{image_topic}/compressed', COMPRESSED, t + 1000, compressed_image_msg(rgb, t, compressed))
            else:
                bag.write(image_topic, IMAGE, t + 1000, image_msg(rgb, t))
            bag.write(action_topic, EE_COMMAND, t + 2000, ee_command_msg(a, t, sequence=i))
    return Path(path)
