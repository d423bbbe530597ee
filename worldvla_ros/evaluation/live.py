"""Live replay: the bag plays through rclpy with /clock, the real nodes answer, outputs are recorded.

Per bag: start the nodes (``use_sim_time``), wait until they subscribe, publish the instruction,
play the camera messages byte for byte at their recorded times (scaled by ``--rate``) while
/clock advances (from half a control period before the first frame: the node's control timer starts on that
clock, so each frame arrives half a period before the tick that first can use it, never in a race with it),
keep the clock running until the last chunk has been executed, record every
output topic into ``OUT/outputs_<bag>`` (mcap), stop the nodes, and score that recording.

``--await-chunks``: the clock stands still (1) after each frame from which the action node will ask for a chunk
(its queue has run down to ``replan_threshold``, as the LIBERO sim node decides) until that chunk is out, and
(2) before each frame, once the node commands, until the command of the tick before it is out. The node then
meets frames and ticks in the order lockstep evaluation assumes and sends what lockstep computes, however
slowly the machine infers or the processes are scheduled; latency is no longer felt. Without it the replay
runs in the robot's real time. A bag whose frames are further apart than a control period may leave a tick
without a frame (then (2) waits out its timeout, counted).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from worldvla_ros.model.errors import CheckpointError

from .bag_io import ACTION_CHUNK, COMPRESSED, EE_COMMAND, FLOAT_ARRAY, IMAGE, BagError, BagReader, BagWriter, stamp_ns
from .episode import Episode, _pick
from .scoring import ChunkRecord, ExecutedAction, ImaginedFrame, RunRecord

OUTPUTS = {  # recorded under their full names, as `ros2 bag record` writes them
    '/worldvla/action_chunk': ACTION_CHUNK,
    '/worldvla/ee_command': EE_COMMAND,
    '/worldvla/imagined_image': IMAGE,
    '/worldvla/surprise': FLOAT_ARRAY,
    '/diagnostics': 'diagnostic_msgs/msg/DiagnosticArray',
}
READY_TIMEOUT_S = 180.0
CHUNK_TIMEOUT_S = 60.0  # --await-chunks: wall seconds a frame's chunk is waited for before the clock moves on
COMMAND_TIMEOUT_S = 10.0  # --await-chunks: wall seconds the command before a frame is waited for
DRAIN_TIMEOUT_S = 180.0  # after the last frame: until every node reports it has nothing left to do


def evaluate_live(args: argparse.Namespace, episodes: list[Episode], config: list[Path],
                  control_rate_hz: float) -> tuple[list[RunRecord], dict[str, Any]]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, info = [], {}
    for bag, episode in zip(args.bags, episodes, strict=True):
        name = Path(bag).stem if Path(bag).suffix == '.mcap' else Path(bag).name  # a single .mcap file: no .mcap twice
        recording = out / f'outputs_{name}'
        if recording.exists():
            import shutil

            shutil.rmtree(recording)
        played = play_and_record(args, Path(bag), episode, config, recording, control_rate_hz)
        run, info = score_recording(recording, episode, played)
        runs.append(run)
    info['rotate_180'] = _rotates(Path(args.checkpoint))
    return runs, info


def _rotates(checkpoint: Path) -> bool:
    """The checkpoint's rotate_180 setting (the release's LIBERO frames are turned), read without torch."""
    import json

    from worldvla_ros.files import MB, read_text

    try:
        cfg = json.loads(read_text(checkpoint / 'config.json', 64 * MB, 'config.json'))
        return bool(cfg.get('worldvla', {}).get('rotate_180', True))
    except (OSError, ValueError, AttributeError, RecursionError):
        return True


class ReplayClock:
    """Sim time: the wall clock since ``start`` scaled by the rate, from ``t0_ns``; held still between ``hold``
    and ``release`` (read from the recorder's thread too)."""

    def __init__(self, t0_ns: int, rate: float) -> None:
        self.t0_ns, self.rate = t0_ns, rate
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        with self.lock:
            self.wall0, self.held_at, self.held_total = time.monotonic(), None, 0.0

    def now(self) -> int:
        with self.lock:
            wall = self.held_at if self.held_at is not None else time.monotonic()
            return self.t0_ns + int((wall - self.wall0 - self.held_total) * self.rate * 1e9)

    def hold(self) -> None:
        with self.lock:
            if self.held_at is None:
                self.held_at = time.monotonic()

    def release(self) -> None:
        with self.lock:
            if self.held_at is not None:
                self.held_total += time.monotonic() - self.held_at
                self.held_at = None


class ChunkWatch:
    """What the replay knows of the action node's loop from its outputs: the newest chunk's frame stamp, the
    commands sent and the last of them, enough to tell whether the node asks for a chunk from the next frame."""

    def __init__(self, replan_threshold: int) -> None:
        self.threshold = replan_threshold
        self.cond = threading.Condition()
        self.newest_chunk_ns = -1
        self.commands = 0
        self.last: tuple[bool, int, int] | None = None  # (hold, index, chunk_size) of the last command

    def on_output(self, msgtype: str, data: bytes) -> None:
        from rclpy.serialization import deserialize_message

        if msgtype not in (ACTION_CHUNK, EE_COMMAND):
            return
        msg = deserialize_message(data, _rclpy_type(msgtype))
        with self.cond:
            if msgtype == ACTION_CHUNK:
                self.newest_chunk_ns = max(self.newest_chunk_ns, stamp_ns(msg.header.stamp))
            else:
                self.last = (bool(msg.hold), int(msg.index), int(msg.chunk_size))
                self.commands += 1
            self.cond.notify_all()

    def expects_chunk(self) -> bool:
        """Whether a frame arriving now is one the node asks a chunk from (the controller's rule)."""
        with self.cond:
            if self.threshold < 0 or self.last is None or self.last[0]:
                return True
            return self.last[2] - self.last[1] - 1 <= self.threshold

    def commanding(self) -> int | None:
        """The commands sent so far, or None while the node has neither a chunk nor a command out (silent)."""
        with self.cond:
            return self.commands if self.commands or self.newest_chunk_ns >= 0 else None

    def await_command(self, after: int, timeout_s: float) -> bool:
        """Until more than ``after`` commands are out; False after ``timeout_s``."""
        with self.cond:
            return self.cond.wait_for(lambda: self.commands > after, timeout_s)

    def await_chunk(self, frame_ns: int, timeout_s: float) -> bool:
        """Until a chunk from a frame stamped ``frame_ns`` or later is out; False after ``timeout_s``."""
        with self.cond:
            return self.cond.wait_for(lambda: self.newest_chunk_ns >= frame_ns, timeout_s)


def _header_stamp_ns(data: bytes, msg_type: type) -> int:
    from rclpy.serialization import deserialize_message

    return stamp_ns(deserialize_message(data, msg_type).header.stamp)


def play_and_record(args: argparse.Namespace, bag: Path, episode: Episode, config: list[Path], recording: Path,
                    control_rate_hz: float) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    from worldvla_ros.bringup import start_nodes, stop_nodes
    from worldvla_ros.nodes.common import image_qos, latched_qos, reliable_qos

    # the camera messages stream from the bag as they are played: memory stays at one message, whatever its size
    reader = BagReader(bag)
    image_topic = _pick(reader, args.image_topic, (IMAGE, COMPRESSED), 'camera image', '--image-topic')
    compressed = reader.topics[image_topic] == COMPRESSED
    total = reader.counts.get(image_topic, 0)
    messages = reader.raw_messages([image_topic])
    pending = next(messages, None)
    if pending is None:
        reader.__exit__()
        raise BagError(f'{bag}: topic {image_topic} holds no messages')
    use_wm = not args.no_world_model
    extra = {'use_sim_time': 'true', 'horizon': str(args.wm_horizon), 'dtype': args.dtype,
             'use_compressed': str(compressed).lower(), 'control_rate_hz': repr(float(control_rate_hz))}
    if args.tokenizer_dir:
        extra['tokenizer_dir'] = args.tokenizer_dir
    # a ROS domain of its own, on this machine only: the replay's /clock and commands never reach a robot
    domain = args.domain_id if args.domain_id is not None else random.randint(120, 230)
    isolation = {'ROS_DOMAIN_ID': str(domain), 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'}
    try:
        procs = start_nodes(args.checkpoint, config, args.device, use_world_model=use_wm, extra=extra, env=isolation)
    except BaseException:
        reader.__exit__()
        raise
    context = rclpy.Context()
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node('worldvla_bag_player', context=context)
    executor = SingleThreadedExecutor(context=context)
    writer = BagWriter(recording, 'mcap')
    # ticks half a period away from the frames (docstring)
    clock = ReplayClock(pending[2] - round(0.5e9 / control_rate_hz), max(args.rate, 1e-3))
    watch = None
    if getattr(args, 'await_chunks', False):
        from worldvla_ros.launch_plan import node_parameters

        watch = ChunkWatch(int(node_parameters(config, 'worldvla_action').get('replan_threshold', -1)))
    image_type = CompressedImage if compressed else Image
    timeouts = {'chunk': 0, 'command': 0}
    sent_before = None  # --await-chunks: the commands out when the last frame went, once the node commands

    idle_since: dict[str, float] = {}  # node → wall time of its newest report saying it had nothing to do
    names = {'worldvla_action'} | ({'worldvla_world_model'} if not args.no_world_model else set())

    def recorder(topic: str, msgtype: str):
        def callback(data: bytes) -> None:
            writer.write_raw(topic, msgtype, clock.now(), data)
            if watch is not None:
                watch.on_output(msgtype, data)
            if topic == '/diagnostics':
                _note_idle(data, idle_since)
        return callback

    spinner: threading.Thread | None = None
    played = 0
    try:
        for topic, msgtype in OUTPUTS.items():
            node.create_subscription(_rclpy_type(msgtype), topic, recorder(topic, msgtype), reliable_qos(100),
                                     raw=True)
        clock_pub = node.create_publisher(Clock, '/clock', 10)
        image_pub = (node.create_publisher(CompressedImage, 'camera/image_raw/compressed', image_qos(5))
                     if compressed else node.create_publisher(Image, 'camera/image_raw', image_qos(5)))
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()

        def publish_clock(ns: int) -> None:
            clock = Clock()
            clock.clock.sec, clock.clock.nanosec = divmod(int(ns), 1_000_000_000)
            clock_pub.publish(clock)

        deadline = time.monotonic() + READY_TIMEOUT_S
        while image_pub.get_subscription_count() < len(procs):
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise CheckpointError(f'a node exited with code {dead[0].returncode} before it was ready '
                                      '(its log is above)')
            if time.monotonic() > deadline:
                raise CheckpointError(f'the nodes were not ready after {READY_TIMEOUT_S:.0f} s')
            publish_clock(clock.t0_ns)
            time.sleep(0.05)
        node.create_publisher(String, 'instruction', latched_qos()).publish(String(data=episode.instruction))
        publish_clock(clock.t0_ns)
        time.sleep(0.5)  # the instruction reaches the node before the first frame

        from tqdm import tqdm

        bar = tqdm(total=total, unit='frame', desc=f'live {bag.name}', disable=args.no_progress, file=sys.stderr)
        clock.start()
        last_frame_wall = float('inf')
        while True:
            now = clock.now()
            publish_clock(now)
            while pending is not None and pending[2] <= now:
                awaited = False
                if watch is not None:  # (docstring) the last tick's command out first, then maybe the chunk
                    clock.hold()
                    if sent_before is not None and not watch.await_command(sent_before, COMMAND_TIMEOUT_S):
                        timeouts['command'] += 1
                    awaited = watch.expects_chunk()
                image_pub.publish(pending[3])
                played += 1
                bar.update(1)
                if watch is not None:
                    if awaited and not watch.await_chunk(_header_stamp_ns(pending[3], image_type), CHUNK_TIMEOUT_S):
                        timeouts['chunk'] += 1
                    sent_before = watch.commanding()
                    clock.release()
                pending = next(messages, None)
                if pending is None:
                    last_frame_wall = time.monotonic()
                if watch is not None:
                    break  # one frame per clock reading: the tick between two frames comes first
            # run on (the clock too) until every node has said, after the last frame, that it has nothing
            # left to do: the last chunk executed, the last imagination done, the final counters sent
            if all(idle_since.get(n, 0.0) > last_frame_wall + 0.05 for n in names):
                break
            if time.monotonic() > last_frame_wall + DRAIN_TIMEOUT_S:
                print(f'evaluate_bag: warning: the nodes were still busy {DRAIN_TIMEOUT_S:.0f} s after the last '
                      'frame; scoring what they did so far', file=sys.stderr)
                break
            time.sleep(0.005)
        bar.close()
        if any(timeouts.values()):
            chunks, commands = timeouts['chunk'], timeouts['command']
            print(f'evaluate_bag: warning: --await-chunks: {chunks} awaited chunks did not come within '
                  f'{CHUNK_TIMEOUT_S:.0f} s (the node refused the frame, or does not run the task), {commands} '
                  f'commands before a frame not within {COMMAND_TIMEOUT_S:.0f} s (frames further apart than a '
                  'period, or the node stopped); the clock moved on', file=sys.stderr)
    finally:
        stop_nodes(procs)
        executor.shutdown()
        if spinner is not None:  # no callback may still be taking from an entity destroy_node frees
            spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.shutdown(context=context)
        writer.close()
        reader.__exit__()
    return played


def _note_idle(data: bytes, idle_since: dict[str, float]) -> None:
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.serialization import deserialize_message

    for status in deserialize_message(data, DiagnosticArray).status:
        values = {kv.key: kv.value for kv in status.values}
        if values.get('idle') == 'true':
            idle_since[status.hardware_id] = time.monotonic()


def _rclpy_type(msgtype: str) -> type:
    import importlib

    pkg, _, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{pkg}.msg'), name)


def score_recording(recording: Path, episode: Episode, frames_played: int) -> tuple[RunRecord, dict[str, Any]]:
    """Chunks, executed commands, surprise and counters of a recording, against the episode."""
    from worldvla_ros.model.image_tokenizer import to_model_frame

    run = RunRecord(episode.name, 'live', episode.actions, times_s=episode.times_s)
    diag: dict[str, str] = {}
    info: dict[str, Any] = {'model_id': '', 'device': '', 'chunk_size': 0, 'history_frames': 0}
    holds = unmatched = 0
    used: set[int] = set()
    with BagReader(recording) as reader:
        for m in reader.messages(list(reader.topics)):
            if m.msgtype == ACTION_CHUNK:
                c = m.msg
                f = episode.frame_index(stamp_ns(c.header.stamp))
                if f is None or not len(c.commands):
                    unmatched += 1
                    continue
                used.add(f)
                actions = np.array([cmd.action for cmd in c.commands])
                raw = np.asarray(c.raw_actions, dtype=np.float64).reshape(-1, 7)
                run.chunks.append(ChunkRecord(f, actions, raw, float(c.inference_latency),
                                              (m.time_ns - stamp_ns(c.header.stamp)) * 1e-9))
                info.update(model_id=c.model_id, chunk_size=max(info['chunk_size'], len(c.commands)),
                            history_frames=max(info['history_frames'], len(c.observation_stamps)))
            elif m.msgtype == EE_COMMAND:
                cmd = m.msg
                if cmd.hold:
                    holds += 1
                    continue
                f = episode.frame_index(stamp_ns(cmd.header.stamp))
                if f is None:
                    unmatched += 1
                    continue
                seam = cmd.index == 0 and bool(run.executed)
                run.executed.append(ExecutedAction(f + int(cmd.index), np.asarray(cmd.action, dtype=np.float64), seam))
            elif m.msgtype == FLOAT_ARRAY and m.topic.endswith('surprise') and len(m.msg.data) >= 3:
                step, p, s = m.msg.data[:3]
                run.imagined.append(ImaginedFrame(int(step), float(p), float(s)))
            elif m.msgtype == IMAGE and len(run.strip) < 6:
                f = episode.frame_index(stamp_ns(m.msg.header.stamp), tolerance_ns=50_000_000)
                if f is not None:
                    from worldvla_ros.image_conversion import image_msg_to_rgb

                    imagined = np.array(image_msg_to_rgb(m.msg))
                    real = to_model_frame(episode.frames[f], imagined.shape[0], rotate_180=False)
                    run.strip.append((f, real, imagined))
            elif m.msgtype.startswith('diagnostic_msgs'):
                for s in m.msg.status:
                    if s.hardware_id == 'worldvla_action':
                        for kv in s.values:  # counters only grow: keep the largest seen
                            if kv.value.isdigit():
                                diag[kv.key] = str(max(int(kv.value), int(diag.get(kv.key, 0))))
                            else:
                                diag[kv.key] = kv.value
    info['device'] = diag.get('device', '')
    n = lambda k: int(diag.get(k, 0))  # noqa: E731
    run.counts = {
        'frames': frames_played,
        'frames_received_by_node': n('frames_received'),
        'frames_dropped': n('frames_dropped'),
        'frames_stale': n('rejected_stale'),
        'frames_never_used': frames_played - len(used),
        'holds': holds,
        'outputs_without_frame': unmatched,
        'inference_errors': n('inference_errors'),
    }
    return run, info
