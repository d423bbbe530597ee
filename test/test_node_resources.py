"""Resources and lifetimes of the nodes: memory with large frames, lost-frame accounting, shutdown."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from harness import NodeProcess, wait_until
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.bringup import default_config
from worldvla_ros.image_conversion import fill_image_msg
from worldvla_ros.nodes.common import latched_qos, reliable_qos, watch_diagnostics

pytestmark = pytest.mark.ros
WORLD = 'worldvla_world_model'


def _jpeg(rgb: np.ndarray, stamp) -> CompressedImage:
    ok, data = cv2.imencode('.jpg', rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    msg = CompressedImage(format='rgb8; jpeg compressed bgr8', data=data.tobytes())
    msg.header.stamp = stamp
    return msg


# -- 8: memory bounded by what the model needs, not by the camera's resolution ----------------------
@pytest.mark.timeout(240)
def test_world_model_frame_memory_does_not_grow_with_camera_resolution(tiny_checkpoint: Path, isolated_graph,
                                                                        tmp_path: Path) -> None:
    node = isolated_graph
    world = NodeProcess('world_model_node', tmp_path, {'checkpoint': str(tiny_checkpoint), 'device': 'cpu',
                                                        'use_compressed': 'true', 'history_size': '64'},
                        config=[default_config()])
    diag = watch_diagnostics(node, WORLD)
    pub = node.create_publisher(CompressedImage, 'camera/image_raw/compressed', qos_profile_sensor_data)
    rng = np.random.default_rng(0)
    hd = [np.repeat(np.repeat(rng.integers(0, 256, (135, 240, 3), dtype=np.uint8), 8, 0), 8, 1)
          for _ in range(4)]  # 1920×1080, 6.2 MB decoded, ~0.3 MB as JPEG
    try:
        assert wait_until(lambda: pub.get_subscription_count() > 0, 120), world.log()[-2000:]
        assert wait_until(lambda: 'model' in diag, 30)
        rss_before = psutil.Process(world.proc.pid).memory_info().rss
        i = 0
        end = time.monotonic() + 120
        while time.monotonic() < end and int(diag.get('frames_received', 0)) < 80:
            pub.publish(_jpeg(hd[i % 4], node.get_clock().now().to_msg()))
            i += 1
            time.sleep(0.05)
        assert int(diag['frames_received']) >= 80  # more than history_size full-HD frames arrived
        time.sleep(1.5)
        grown = psutil.Process(world.proc.pid).memory_info().rss - rss_before
        assert grown < 150e6, f'RSS grew by {grown / 1e6:.0f} MB (64 full-HD frames would be ~400 MB)'
        assert int(diag['frame_memory_bytes']) <= 64 * 256 * 256 * 3  # model-resolution crops only
        assert world.alive()
    finally:
        assert world.stop() == 0, world.log()[-2000:]


# -- 9: frames lost before the callback are visible -----------------------------------------------
@pytest.mark.timeout(180)
def test_received_used_dropped_and_lost_frames_add_up(tiny_checkpoint: Path, isolated_graph, tmp_path: Path) -> None:
    node = isolated_graph
    action = NodeProcess('action_node', tmp_path, {'checkpoint': str(tiny_checkpoint), 'device': 'cpu',
                                                   'max_obs_age': '5.0'}, config=[default_config()])
    diag = watch_diagnostics(node, 'worldvla_action')
    pub = node.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
    node.create_publisher(String, 'instruction', latched_qos()).publish(String(data='put the red block in the bowl'))
    frame = np.zeros((256, 256, 3), dtype=np.uint8)

    def send() -> None:
        msg = fill_image_msg(Image(), frame)
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)

    try:
        assert wait_until(lambda: pub.get_subscription_count() > 0, 120), action.log()[-2000:]
        def counts() -> tuple[int, int]:
            return int(diag.get('frames_received', 0)), int(diag.get('frames_lost_in_transport', 0))

        for _ in range(100):  # until the node has seen one: the baseline of its sequence numbers
            send()
            time.sleep(0.2)
            if counts()[0]:
                break
        time.sleep(2.0)  # /diagnostics comes once a second: let it catch up
        base = sum(counts())
        burst = 300
        for _ in range(burst):  # faster than a 2-core machine takes frames: most are overwritten
            send()
        time.sleep(1.0)
        send()  # the last one reveals the gap before it
        assert wait_until(lambda: sum(counts()) - base == burst + 1, 30), (counts(), base, burst + 1)
        received, lost = counts()
        assert lost > 0 and received > 1
        used, dropped = int(diag.get('frames_used', 0)), int(diag.get('frames_dropped', 0))
        assert 0 < used <= received and used + dropped <= received
    finally:
        assert action.stop() == 0, action.log()[-2000:]


# -- 10: shutdown inside launch's window, no abort on a second signal -------------------------------
def _world_model(tiny_checkpoint: Path, logs: Path, namespace: str) -> NodeProcess:
    return NodeProcess('world_model_node', logs, {'checkpoint': str(tiny_checkpoint), 'device': 'cpu',
                                                  'horizon': '10', 'match_tolerance': '0.5'},
                       config=[default_config()], namespace=namespace)


def _imagining(world: NodeProcess, node, namespace: str) -> NodeProcess:
    """The world-model node in the middle of a 10-frame imagination (several seconds on this CPU)."""
    imagined: list[Image] = []
    node.create_subscription(Image, f'{namespace}/worldvla/imagined_image', imagined.append, reliable_qos())
    cam = node.create_publisher(Image, f'{namespace}/camera/image_raw', qos_profile_sensor_data)
    chunks = node.create_publisher(ActionChunk, f'{namespace}/worldvla/action_chunk', reliable_qos())
    assert wait_until(lambda: cam.get_subscription_count() > 0 and chunks.get_subscription_count() > 0, 120), \
        world.log()[-2000:]
    stamp = node.get_clock().now().to_msg()
    for _ in range(5):
        msg = fill_image_msg(Image(), np.full((256, 256, 3), 120, dtype=np.uint8))
        msg.header.stamp = stamp
        cam.publish(msg)
        time.sleep(0.05)
    chunk = ActionChunk(commands=[EndEffectorCommand() for _ in range(10)])
    chunk.header.stamp = stamp
    chunks.publish(chunk)
    assert wait_until(lambda: len(imagined) >= 1, 60), world.log()[-2000:]  # the rest is being imagined now
    return world


@pytest.mark.timeout(300)
def test_world_model_node_stops_within_launchs_sigint_window(tiny_checkpoint: Path, isolated_graph,
                                                             tmp_path: Path) -> None:
    # two nodes, started together in namespaces of their own: one Ctrl-C, then the impatient kind
    first, second = _world_model(tiny_checkpoint, tmp_path, 'once'), _world_model(tiny_checkpoint, tmp_path, 'twice')
    try:
        _sigint_then_impatience(first, second, isolated_graph)
    finally:
        for w in (first, second):
            if w.alive():
                w.stop()


def _sigint_then_impatience(first: NodeProcess, second: NodeProcess, graph) -> None:
    world = _imagining(first, graph, '/once')
    t0 = time.monotonic()
    world.signal(signal.SIGINT)
    code = world.wait(timeout=10)
    took = time.monotonic() - t0
    assert code == 0 and took < 5.0, (code, took, world.log()[-2000:])  # launch's SIGINT → SIGTERM window

    world = _imagining(second, graph, '/twice')
    world.signal(signal.SIGINT)
    time.sleep(0.05)
    world.signal(signal.SIGINT)  # the impatient second Ctrl-C
    end = time.monotonic() + 10
    while world.alive() and time.monotonic() < end:  # and a SIGTERM at every moment of the shutdown
        world.signal(signal.SIGTERM)
        time.sleep(0.02)
    code = world.wait(timeout=10)
    log = world.log()
    # (whether the later signals came while it was still shutting down, logged "already shutting down", or
    # after its handlers were set to ignore them, depends on how fast it stops; neither may abort it)
    assert code == 0 and 'terminate called' not in log and 'Traceback' not in log, log[-2000:]


def test_sim_node_does_not_import_torch() -> None:
    code = ('import sys, worldvla_ros.nodes.sim_node; '
            'print(sorted(m for m in ("torch", "transformers") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == '[]', out.stderr


@pytest.mark.timeout(120)
def test_a_node_stopped_while_its_callbacks_run_exits_without_a_late_error(isolated_graph, tmp_path: Path) -> None:
    """rclpy's executor shutdown does not wait for callbacks in flight and destroys what they still use: the sim
    node, stopped while its 30 Hz camera timer ran, printed "exception was never retrieved" at every exit."""
    frames: list[Image] = []
    isolated_graph.create_subscription(Image, 'camera/image_raw', frames.append, qos_profile_sensor_data)
    for _ in range(2):
        sim = NodeProcess('sim_node', tmp_path, {'rate_hz': '30.0'})
        try:
            assert wait_until(lambda: len(frames) >= 5, 60), sim.log()[-2000:]  # its timers are running
            frames.clear()
            sim.signal(signal.SIGINT)
            code = sim.wait(timeout=15)
        finally:
            sim.stop()
        log = sim.log()
        assert code == 0 and 'never retrieved' not in log and 'Traceback' not in log, log[-2000:]


def test_executor_shutdown_waits_for_a_callback_in_flight_and_says_when_one_is_stuck() -> None:
    import threading

    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from worldvla_ros.nodes.common import shutdown_executor

    context = rclpy.Context()
    rclpy.init(context=context)  # the session's own domain (conftest)
    node = rclpy.create_node('worldvla_stuck_callback', context=context)
    running, release = threading.Event(), threading.Event()

    def stuck() -> None:
        running.set()
        release.wait(10)

    node.create_timer(0.01, stuck)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(node)
    try:
        while not running.is_set():
            executor.spin_once(timeout_sec=0.1)
        t0 = time.monotonic()
        assert not shutdown_executor(executor, timeout_sec=0.3)  # bounded: the stuck one is reported
        assert 0.3 <= time.monotonic() - t0 < 2.0
        release.set()
        assert shutdown_executor(executor, timeout_sec=5.0)  # once it has ended
    finally:
        release.set()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.shutdown(context=context)
