"""Safe to put on a robot: hostile input, runtime limits, e-stop races, signals, broken start-ups.

Each test drives real nodes in their own processes the way a user's robot or an adversary would,
and checks what reaches the command topic.
"""
from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Time as TimeMsg
from harness import Harness, NodeProcess, action_node_graph, wait_until
from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.bringup import default_config
from worldvla_ros.nodes.common import latched_qos, reliable_qos
from worldvla_ros.synthetic import SyntheticCamera

pytestmark = pytest.mark.ros
ACTION = 'worldvla_action'
RATE = 10.0
INSTRUCTION = 'put the red block in the bowl'


@pytest.fixture(scope='module')
def action_graph(fixed_chunk_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """One action node (enabled, sequential decoding: slow enough to race against) and a harness."""
    def first_chunk(h: Harness) -> None:
        h.instruction_pub.publish(String(data=INSTRUCTION))
        assert h.wait_for(lambda: len(h.chunks) > 0, timeout=300), 'no ActionChunk within 300 s'

    with action_node_graph(fixed_chunk_checkpoint, tmp_path_factory.mktemp('logs'), {'batched_decoding': 'false'},
                           first_chunk, 'the action node does not answer') as (h, node, _):
        yield h, node


def _motion_after(h: Harness, t: float) -> list[EndEffectorCommand]:
    with h.lock:
        return [m for when, m in h.commands if when > t and not m.hold]


def _sent_after(h: Harness, t: float) -> list[EndEffectorCommand]:
    with h.lock:
        return [m for when, m in h.commands if when > t]


# -- 3: every limit reaches every command as it goes out, queued ones included ----------------
def test_runtime_limits_and_dry_run_reach_queued_commands(action_graph) -> None:
    h, node = action_graph
    assert h.set_parameter(ACTION, 'replan_threshold', 0).successful  # a chunk runs out before the next
    tight = 0.01
    with h.lock:
        seen = len(h.chunks)
    assert h.wait_for(lambda: len(h.chunks) > seen + 1, timeout=30)
    with h.lock:
        last_chunk = h.chunks[-1].sequence
    # just after a chunk of 5 arrived: most of it is still queued
    assert h.set_parameters(ACTION, {'action_min': [-tight] * 7, 'action_max': [tight] * 7},
                            atomically=True).successful
    changed = time.monotonic()
    h.stream(2.5)
    after = _sent_after(h, changed)
    motion = [m for m in after if not m.hold]
    queued = [m for m in motion if m.chunk_sequence <= last_chunk]
    assert queued, 'no command computed before the change went out after it: the test did not test'
    values = np.array([m.action for m in after])
    assert np.abs(values).max() <= tight + 1e-12, values[np.abs(values).max(axis=1) > tight]
    raw = np.concatenate([np.reshape(c.raw_actions, (-1, 7)) for c in h.chunks])
    assert np.abs(raw).max() > 10 * tight  # the model asked for much more

    with h.lock:
        seen = len(h.chunks)
    assert h.wait_for(lambda: len(h.chunks) > seen, timeout=30)
    assert h.set_parameter(ACTION, 'enabled', False).successful
    disabled = time.monotonic()
    h.stream(1.5)
    after = _sent_after(h, disabled)
    assert after and all(m.dry_run for m in after), [m.chunk_sequence for m in after if not m.dry_run]
    assert h.set_parameter(ACTION, 'enabled', True).successful
    assert h.set_parameter(ACTION, 'action_min', [-1.0] * 7).successful
    assert h.set_parameter(ACTION, 'action_max', [1.0] * 7).successful
    assert h.set_parameter(ACTION, 'replan_threshold', -1).successful
    assert node.alive()


# -- 6: negative limits are refused --------------------------------------------------------
def test_negative_step_limit_and_scale_are_refused_at_runtime(action_graph) -> None:
    h, _ = action_graph
    refused = h.set_parameter(ACTION, 'max_step', [-0.1] * 7)
    assert not refused.successful and '≥ 0' in refused.reason
    refused = h.set_parameter(ACTION, 'action_scale', [0.05, 0.05, -0.05, 0.5, 0.5, 0.5, 1.0])
    assert not refused.successful and '≥ 0' in refused.reason
    assert h.get_parameter(ACTION, 'max_step') == [0.0] * 7


@pytest.mark.parametrize('param', ['max_step:=[-0.1,-0.1,-0.1,0.0,0.0,0.0,0.0]',
                                   'action_scale:=[0.05,0.05,0.05,-0.5,0.5,0.5,1.0]'])
def test_negative_step_limit_and_scale_are_refused_at_start(param: str, tmp_path: Path,
                                                            tiny_checkpoint: Path) -> None:
    proc = subprocess.run([sys.executable, '-m', 'worldvla_ros.nodes.action_node', '--ros-args',
                           '-p', f'checkpoint:={tiny_checkpoint}', '-p', param],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert '≥ 0' in proc.stderr and 'FATAL' in proc.stderr and 'Traceback' not in proc.stderr


# -- 4: nothing computed before an e-stop reset moves the robot after it ----------------------
def test_no_command_after_an_estop_reset_comes_from_older_frames(action_graph) -> None:
    h, node = action_graph
    assert h.reset_client.wait_for_service(timeout_sec=10)
    for trial in range(6):
        assert h.wait_for(lambda: len(h.chunks) > 0, timeout=30)
        h.stream(0.6 + 0.1 * trial)  # the e-stop lands at a different point of an inference each time
        stopped = time.monotonic()
        h.estop_pub.publish(Bool(data=True))
        # latched once a hold goes out (the next control tick); the inference in flight is still running
        assert h.wait_for(lambda t=stopped: any(m.hold for when, m in h.commands if when > t), timeout=30,
                          frames=False)
        time.sleep(0.05)
        reset_at_ns = h.now_ns()
        reset_at = time.monotonic()
        response = h.reset_client.call(Trigger.Request(), timeout_sec=10)
        assert response.success and response.message.startswith('e-stop reset'), response.message
        h.estop_pub.publish(Bool(data=False))  # the latched topic must not re-trigger it
        assert h.wait_for(lambda t=reset_at: len(_motion_after(h, t)) >= 3, timeout=60), node.log()[-2000:]
        stamps = [Time.from_msg(m.header.stamp).nanoseconds for m in _motion_after(h, reset_at)]
        early = (reset_at_ns - min(stamps)) / 1e9
        assert early <= 0, f'trial {trial}: a command from a frame {early:.3f} s before the reset'
    assert h.wait_for(lambda: h.counter(ACTION, 'estops') >= 6, timeout=30)


# -- 5: frames from the future ---------------------------------------------------------------
def test_frames_stamped_in_the_future_are_rejected(action_graph) -> None:
    h, node = action_graph
    hour_ahead = h.frame_msg(stamp_offset=3600.0)
    max_stamp = h.frame_msg()
    max_stamp.header.stamp = TimeMsg(sec=2**31 - 1, nanosec=999_999_999)
    t0 = time.monotonic()
    for msg in (hour_ahead, max_stamp):  # each until counted: best effort, depth 1, may drop one

        def counted(b: int = h.counter(ACTION, 'rejected_future_stamp'), m: Image = msg) -> bool:
            h.image_pub.publish(m)
            return h.counter(ACTION, 'rejected_future_stamp') > b

        assert h.wait_for(counted, timeout=30, hz=3, frames=False), (h.diag.get(ACTION), node.log()[-3000:])
    h.stream(1.0)
    with h.lock:
        later = [c for c in h.chunks]
    limit = h.now_ns() + int(0.2e9)
    assert all(Time.from_msg(c.header.stamp).nanoseconds <= limit for c in later)
    assert all(Time.from_msg(m.header.stamp).nanoseconds <= limit for m in _sent_after(h, t0))


# -- 12: hostile instructions ------------------------------------------------------------------
def test_control_characters_are_refused_and_a_flood_is_not_logged_line_by_line(action_graph) -> None:
    h, node = action_graph
    # (a NUL never crosses the wire: ROS strings end at it; check_instruction's unit test covers it)
    for text in ('\x1b[31mput the block\x1b[0m in the bowl', 'put \u202eeht lwob', 'put the block\x7f in'):
        before = h.counter(ACTION, 'rejected_instruction')
        h.instruction_pub.publish(String(data=text))  # one at a time: the topic keeps only the newest
        assert h.wait_for(lambda b=before: h.counter(ACTION, 'rejected_instruction') > b, timeout=30), (
            text, h.diag.get(ACTION), node.log()[-3000:])
    with h.lock:
        assert h.diag[ACTION]['instruction'] == INSTRUCTION
    log = node.log()
    assert '\x1b[31m' not in log and '\x7f' not in log and '\u202e' not in log
    assert any(f"'{c}'" in log for c in ('\\x1b', '\\u202e', '\\x7f'))  # named, escaped (throttled: one or more)

    lines_before = node.log().count('instruction: ')
    changes_before = h.counter(ACTION, 'instruction_changes')
    t0 = time.monotonic()
    for i in range(100):  # 50 new instructions a second for 2 s
        h.instruction_pub.publish(String(data=f'put the red block in the bowl number {i}'))
        time.sleep(0.02)
    h.instruction_pub.publish(String(data=INSTRUCTION))  # the last word: later tests run on it

    def settled() -> bool:  # the node acts on the last one and has reported the flood
        d = h.diag.get(ACTION, {})
        return d.get('instruction') == INSTRUCTION and int(d.get('instruction_changes', 0)) > changes_before + 1

    assert h.wait_for(settled, timeout=60, frames=False)
    elapsed = time.monotonic() - t0
    changes = h.counter(ACTION, 'instruction_changes') - changes_before
    logged = node.log().count('instruction: ') - lines_before
    assert logged <= elapsed / 1.0 + 2, f'{logged} INFO lines in {elapsed:.1f} s'  # at most one a second
    assert changes > logged + 3, (changes, logged)  # every change counted, far fewer logged


def test_instructions_from_any_publisher_are_each_handled_once_in_order(action_graph) -> None:
    """A latched publisher (ros2 topic pub's default) reaches both of the node's readers: each message is
    handled once, none lost in a burst, the last one wins; a volatile publisher (a node's default) works."""
    h, _ = action_graph
    received = h.counter(ACTION, 'instructions_received')
    burst = [f'put the red block in the bowl, try {i}' for i in range(20)]
    for text in burst:
        h.instruction_pub.publish(String(data=text))
    assert h.wait_for(lambda: h.counter(ACTION, 'instructions_received') >= received + 20, timeout=30, frames=False)
    time.sleep(1.5)  # a second report: no copy of any of them arrives late
    with h.lock:
        assert int(h.diag[ACTION]['instructions_received']) == received + 20
        assert h.diag[ACTION]['instruction'] == burst[-1]
    volatile = h.node.create_publisher(String, 'instruction', reliable_qos())
    try:
        assert wait_until(lambda: volatile.get_subscription_count() > 0, 10)
        volatile.publish(String(data='put the blue block in the bowl'))
        assert h.wait_for(lambda: h.diag.get(ACTION, {}).get('instruction') == 'put the blue block in the bowl',
                          timeout=30, frames=False)
    finally:
        h.node.destroy_publisher(volatile)
    h.instruction_pub.publish(String(data=INSTRUCTION))  # later tests run on it
    assert h.wait_for(lambda: h.diag.get(ACTION, {}).get('instruction') == INSTRUCTION, timeout=30, frames=False)


# -- 1, 10: the last command before a stop is a hold; a killed node is visible to the consumer ----
def test_sigterm_ends_with_a_hold_and_a_kill_misses_the_deadline(action_graph, fixed_chunk_checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    h, node = action_graph
    h.instruction_pub.publish(String(data=INSTRUCTION))  # (latched: the next node gets it too)
    assert h.wait_for(lambda: len(_motion_after(h, time.monotonic() - 1.0)) > 0, timeout=60)
    h.send_frame()
    stopped = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=5.0) == 0
    assert time.monotonic() - stopped < 5.0  # inside launch's SIGINT → SIGTERM window
    time.sleep(0.5)
    with h.lock:
        last = h.commands[-1][1]
    assert last.hold and list(last.action[:6]) == [0.0] * 6
    assert h.counter(ACTION, 'callback_errors') == 0

    missed: list[int] = []
    qos = reliable_qos(10)
    qos.deadline = Duration(seconds=0.5)
    h.node.create_subscription(EndEffectorCommand, 'worldvla/ee_command', lambda m: None, qos,
                               event_callbacks=SubscriptionEventCallbacks(deadline=lambda e: missed.append(1)))
    second = NodeProcess('action_node', tmp_path, {
        'checkpoint': str(fixed_chunk_checkpoint), 'device': 'cpu', 'enabled': 'true',
        'control_rate_hz': str(RATE), 'max_obs_age': '2.0'}, config=[default_config()])
    try:
        started = time.monotonic()
        assert h.wait_for(lambda: len(_motion_after(h, started)) > 3, timeout=120), second.log()[-2000:]
        n = len(missed)
        second.proc.kill()
        second.wait()
        assert wait_until(lambda: len(missed) > n, timeout=10.0)  # the consumer is told (deadline 0.5 s)
    finally:
        second.stop()


# -- 1, 2: hostile camera frames -------------------------------------------------------------
def png_declaring(width: int, height: int, rows: int) -> bytes:
    """A PNG whose header declares width×height RGB pixels, holding ``rows`` rows of zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b'\0' * (1 + 3 * width)
    data = b''.join(packer.compress(row) for _ in range(rows)) + packer.flush()
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', data) + chunk(b'IEND', b'')


@pytest.mark.timeout(240)
def test_decompression_bombs_and_bad_stamps_never_end_either_node(tiny_checkpoint: Path, isolated_graph,
                                                                   tmp_path: Path) -> None:
    import cv2
    import psutil

    from worldvla_ros.nodes.common import watch_diagnostics

    node = isolated_graph
    params = {'checkpoint': str(tiny_checkpoint), 'device': 'cpu', 'use_compressed': 'true',
              'max_obs_age': '2.0'}
    action = NodeProcess('action_node', tmp_path, params, config=[default_config()])
    world = NodeProcess('world_model_node', tmp_path, params, config=[default_config()])
    chunks: list[ActionChunk] = []
    node.create_subscription(ActionChunk, 'worldvla/action_chunk', chunks.append, reliable_qos())
    diag = {name: watch_diagnostics(node, name) for name in (ACTION, 'worldvla_world_model')}
    pub = node.create_publisher(CompressedImage, 'camera/image_raw/compressed', qos_profile_sensor_data)
    node.create_publisher(String, 'instruction', latched_qos()).publish(String(data=INSTRUCTION))
    camera = SyntheticCamera(seed=5)

    def good() -> CompressedImage:
        _, data = cv2.imencode('.jpg', camera.render()[:, :, ::-1])
        msg = CompressedImage(format='rgb8; jpeg compressed bgr8', data=data.tobytes())
        msg.header.stamp = node.get_clock().now().to_msg()
        return msg

    # 40000² trips OpenCV's own pixel limit (cv2.error); 9000² decodes (243 MB) unless refused first
    bombs = [png_declaring(40000, 40000, 10), png_declaring(9000, 9000, 9000)]
    assert len(bombs[1]) < 400_000
    try:
        assert wait_until(lambda: pub.get_subscription_count() >= 2, 120), (action.log()[-2000:], world.log()[-2000:])
        for _ in range(20):  # both nodes running normally
            pub.publish(good())
            time.sleep(0.1)
        rss = {p: psutil.Process(p.proc.pid).memory_info().rss for p in (action, world)}

        def hostile(kind: str) -> CompressedImage:
            msg = good() if kind == 'stamp' else CompressedImage(format='png', data=bombs[kind == 'bomb2'])
            msg.header.stamp = TimeMsg(sec=-5) if kind == 'stamp' else node.get_clock().now().to_msg()
            return msg

        def counts(key: str) -> list[int]:
            return [int(d.get(key, 0)) for d in diag.values()]

        for kind in ('bomb1', 'bomb2', 'stamp'):  # each until both nodes counted it (best effort may lose one)
            key = 'rejected_stamp' if kind == 'stamp' else 'rejected_size'
            before = counts(key)
            end = time.monotonic() + 30
            while time.monotonic() < end and not all(a > b for a, b in zip(counts(key), before, strict=True)):
                pub.publish(hostile(kind))
                time.sleep(0.3)
                pub.publish(good())
                time.sleep(0.5)
        assert action.alive() and world.alive(), (action.log()[-2000:], world.log()[-2000:])
        for name in diag:
            assert int(diag[name]['rejected_size']) >= 2 and int(diag[name]['rejected_stamp']) >= 1, diag[name]
            assert int(diag[name].get('callback_errors', 0)) == 0
        for p, before in rss.items():
            assert psutil.Process(p.proc.pid).memory_info().rss < before + 300e6  # nothing was decoded
        n = len(chunks)
        assert wait_until(lambda: (pub.publish(good()), time.sleep(0.1), len(chunks) > n + 2)[-1], 60)
    finally:
        codes = [action.stop(), world.stop()]
    assert codes == [0, 0], (action.log()[-2000:], world.log()[-2000:])


def test_an_exception_in_any_callback_is_counted_and_the_node_goes_on(isolated_graph) -> None:
    """The mechanism under every node: a callback that raises is counted, logged, and spinning goes on."""
    from rclpy.executors import MultiThreadedExecutor

    from worldvla_ros.nodes.common import GuardedNode, shutdown_executor

    harness = isolated_graph
    node = GuardedNode('worldvla_guard_probe', context=harness.context)
    received: list[str] = []

    def on_text(msg: String) -> None:
        if msg.data == 'boom':
            raise RuntimeError('a defect in a callback')
        received.append(msg.data)

    node.create_subscription(String, 'guard_probe', on_text, reliable_qos())
    ticks: list[int] = []
    node.create_timer(0.05, lambda: ticks.append(1) or (len(ticks) == 3 and 1 / 0))
    executor = MultiThreadedExecutor(context=harness.context)
    executor.add_node(node)
    pub = harness.create_publisher(String, 'guard_probe', reliable_qos())
    assert wait_until(lambda: pub.get_subscription_count() > 0, 10)
    try:
        for text, expected in (('one', ['one']), ('boom', ['one']), ('two', ['one', 'two'])):
            errors = node.stats.counts['callback_errors']
            pub.publish(String(data=text))
            end = time.monotonic() + 30
            while time.monotonic() < end and (received != expected or (
                    text == 'boom' and node.stats.counts['callback_errors'] == errors)):
                executor.spin_once(timeout_sec=0.05)  # raises here if a callback's exception escaped
        while len(ticks) <= 3:
            executor.spin_once(timeout_sec=0.05)
        assert received == ['one', 'two'] and len(ticks) > 3
        assert node.stats.counts['callback_errors'] == 2  # the subscription's and the timer's
    finally:
        assert shutdown_executor(executor)
        node.destroy_node()
