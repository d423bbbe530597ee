"""Real ROS 2 graphs: the nodes in their own processes, a test node publishing and listening."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from harness import Harness
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from worldvla.msg import ActionChunk

from worldvla_ros.bringup import default_config, start_nodes, stop_nodes
from worldvla_ros.nodes.common import latched_qos, reliable_qos
from worldvla_ros.synthetic import SyntheticCamera

pytestmark = pytest.mark.ros
RATE = 20.0
MAX_STEP = 0.05  # per-step limit of Δx, Δy, Δz in the graph under test


@pytest.fixture(scope='module')
def graph(tiny_checkpoint: Path):
    procs = start_nodes(str(tiny_checkpoint), default_config(), device='cpu', extra={
        'enabled': 'true', 'control_rate_hz': str(RATE), 'max_obs_age': '1.0', 'watchdog_timeout': '0.5',
        'horizon': '2', 'max_step': f'[{MAX_STEP}, {MAX_STEP}, {MAX_STEP}, 0.0, 0.0, 0.0, 0.0]'})
    rclpy.init()
    harness = Harness()
    harness.instruction_pub.publish(String(data='put the red block in the bowl'))
    ok = harness.wait_for(lambda: len(harness.chunks) > 0, timeout=300)
    if not ok:
        stop_nodes(procs)
        pytest.fail('no ActionChunk within 300 s of starting the nodes')
    yield harness, procs
    harness.close()
    rclpy.shutdown()
    codes = stop_nodes(procs)
    assert all(c in (0, -2) for c in codes), codes


def test_chunks_and_commands_flow_at_the_configured_rate(graph) -> None:
    h, procs = graph
    assert all(p.poll() is None for p in procs)
    h.stream(3.0)
    with h.lock:
        chunks, commands = list(h.chunks), list(h.commands)
    chunk = chunks[-1]
    assert Time.from_msg(chunk.header.stamp).nanoseconds in h.sent_stamps  # stamped with its observation
    assert 1 <= len(chunk.commands) <= 5 and len(chunk.raw_actions) == 7 * len(chunk.commands)
    assert chunk.instruction == 'put the red block in the bowl' and chunk.inference_latency > 0
    assert len(chunk.observation_stamps) == 2 and chunk.model_id.startswith('tiny@')
    assert h.wait_for(lambda: 'node_work_p99_ms' in h.diag.get('worldvla_action', {}), timeout=5, frames=False)
    with h.lock:  # the node reports its own work and the frames' wait apart from the model's latency
        d = h.diag['worldvla_action']
        assert 0 < float(d['node_work_p50_ms']) <= float(d['node_work_p99_ms']) < float(d['latency_p99_ms']) * 10
        assert 0 <= float(d['frame_wait_p50_ms']) <= float(d['frame_wait_p99_ms'])
    assert [c.sequence for c in chunks] == sorted(c.sequence for c in chunks)
    motion = [m for _, m in commands if not m.hold]
    assert motion and all(Time.from_msg(m.header.stamp).nanoseconds in h.sent_stamps for m in motion)
    assert all(not m.dry_run for _, m in commands)
    times = np.array([t for t, _ in commands[-40:]])
    period = float(np.median(np.diff(times)))
    assert period == pytest.approx(1.0 / RATE, rel=0.3)


def test_imagined_frames_and_surprise(graph) -> None:
    h, _ = graph
    assert h.wait_for(lambda: len(h.imagined) >= 2 and len(h.surprise) >= 1, timeout=60)
    with h.lock:
        img, chunks, score = h.imagined[-1], list(h.chunks), h.surprise[-1]
    assert (img.width, img.height, img.encoding) == (256, 256, 'rgb8') and len(img.data) == 256 * 256 * 3
    assert img.header.frame_id == 'camera_optical' and {c.header.frame_id for c in chunks} == {'ee_delta'}
    chunk_stamps = {Time.from_msg(c.header.stamp).nanoseconds for c in chunks}
    t = Time.from_msg(img.header.stamp).nanoseconds
    assert any(t - s in (round(1e9 / RATE), round(2e9 / RATE)) for s in chunk_stamps)  # at its predicted time
    step, psnr_db, ssim_v = score
    assert step in (1.0, 2.0) and 0 < psnr_db < 100 and -1 <= ssim_v <= 1


def _bad_image(kind: str, h: Harness) -> Image:
    msg = h.frame_msg()
    if kind == 'encoding':
        msg.encoding = '32FC1'
    elif kind == 'size':
        msg.width = 0
    elif kind == 'step':
        msg.data = bytes(msg.data)[:-100]
    return msg


def test_bad_input_is_counted_and_rejected(graph) -> None:
    h, procs = graph
    node = 'worldvla_action'
    assert h.wait_for(lambda: node in h.diag, timeout=30)
    before = {k: h.counter(node, f'rejected_{k}') for k in ('encoding', 'size', 'step', 'instruction', 'stale')}

    def resend_until_counted(kind: str, send) -> None:  # the camera topic is best effort: a frame may be lost
        end = time.monotonic() + 30
        while time.monotonic() < end and h.counter(node, f'rejected_{kind}') <= before[kind]:
            send()
            h.wait_for(lambda: h.counter(node, f'rejected_{kind}') > before[kind], timeout=1.5, hz=4, frames=False)
        assert h.counter(node, f'rejected_{kind}') > before[kind], (kind, h.diag.get(node))

    for kind in ('encoding', 'size', 'step'):
        resend_until_counted(kind, lambda kind=kind: h.image_pub.publish(_bad_image(kind, h)))
    h.instruction_pub.publish(String(data='   '))
    time.sleep(0.2)
    h.instruction_pub.publish(String(data='x' * 5000))
    time.sleep(0.2)
    h.instruction_pub.publish(String(data='put the red block in the bowl'))
    resend_until_counted('stale', lambda: h.send_frame(stamp_offset=-30.0))  # 30 s old
    assert h.wait_for(lambda: h.counter(node, 'rejected_instruction') >= before['instruction'] + 2, timeout=30,
                      hz=2), h.diag.get(node)
    assert all(p.poll() is None for p in procs)  # nothing crashed
    n = len(h.chunks)
    assert h.wait_for(lambda: len(h.chunks) > n, timeout=30)  # and it still works


def test_watchdog_hold_on_the_next_tick_after_inference_stalls(graph) -> None:
    h, _ = graph
    h.stream(2.0)
    stopped = time.monotonic()  # camera stops: no new chunk can come; wait until the node says it is idle

    def idle() -> bool:
        fresh = time.monotonic() > stopped + 1.5  # a diagnostics report sent after the camera stopped
        return fresh and h.diag.get('worldvla_action', {}).get('idle') == 'true' and h.commands[-1][1].hold

    assert h.wait_for(idle, timeout=60, frames=False)
    with h.lock:
        cmds = list(h.commands)
    last_motion = max(i for i, (_, m) in enumerate(cmds) if not m.hold)
    following = cmds[last_motion + 1 :]
    assert following and all(m.hold for _, m in following)  # the next tick after the queue ran dry is a hold
    gap = following[0][0] - cmds[last_motion][0]
    assert gap < 0.5  # one tick (50 ms) when idle: a guard, so a loaded machine's late timer still passes
    hold = following[0][1]
    assert list(hold.action[:6]) == [0.0] * 6
    assert hold.action[6] == pytest.approx(cmds[last_motion][1].action[6])  # gripper unchanged


def _reset_estop(h: Harness) -> None:
    assert h.reset_client.wait_for_service(timeout_sec=5)
    result = h.reset_client.call(Trigger.Request(), timeout_sec=5)
    assert result is not None and result.success


def _latched_then_holds_only(h: Harness, before: int) -> None:
    """The node counted a new e-stop; every command after it is a hold, with frames streaming."""
    latched = h.wait_for(lambda: h.counter('worldvla_action', 'estops') > before, timeout=10)
    assert latched, h.diag.get('worldvla_action')
    n = len(h.commands)  # the count is reported after the latch: commands from here on are all after it
    h.stream(2.0)
    with h.lock:
        during = [m for _, m in h.commands[n:]]
    assert during and all(m.hold for m in during)


def test_estop_latches_until_reset(graph) -> None:
    """A bouncing e-stop (true, then a burst of false at once) latches while the node is busy with
    frames: a false must never overwrite a true the node has not read yet."""
    h, _ = graph
    before = h.counter('worldvla_action', 'estops')
    h.stream(1.0)  # inference running
    h.estop_pub.publish(Bool(data=True))
    for _ in range(30):
        h.estop_pub.publish(Bool(data=False))  # does not unlatch
    _latched_then_holds_only(h, before)
    _reset_estop(h)
    m = len(h.commands)
    assert h.wait_for(lambda: any(not c.hold for _, c in h.commands[m:]), timeout=30)


def test_estop_from_a_volatile_publisher(graph) -> None:
    """An e-stop publisher with the default (volatile) QoS, as most nodes create one, still stops the arm;
    a latched (transient-local) one is covered above."""
    h, _ = graph
    before = h.counter('worldvla_action', 'estops')
    pub = h.node.create_publisher(Bool, 'worldvla/estop', reliable_qos())
    try:
        assert h.wait_for(lambda: pub.get_subscription_count() > 0, timeout=10, frames=False)
        h.stream(0.5)
        pub.publish(Bool(data=True))
        _latched_then_holds_only(h, before)
    finally:
        h.node.destroy_publisher(pub)
    _reset_estop(h)
    m = len(h.commands)
    assert h.wait_for(lambda: any(not c.hold for _, c in h.commands[m:]), timeout=30)


def test_step_limit_holds_for_every_command_sent(graph) -> None:
    """Across chunk seams, after watchdog and e-stop holds, from rest: no motion command jumps by more
    than max_step from the command before it (a hold itself may always stop the robot)."""
    h, _ = graph
    h.stream(2.0)
    with h.lock:
        sent = [m for _, m in h.commands]
    actions = np.array([m.action for m in sent])
    motion = np.array([not m.hold for m in sent])
    assert motion.sum() > 20 and (~motion).sum() > 0  # earlier tests left holds in between
    steps = np.abs(np.diff(np.vstack([np.zeros(7), actions]), axis=0))[:, :3]  # from rest before the first
    assert steps[motion].max() <= MAX_STEP + 1e-9
    raw = np.concatenate([np.reshape(c.raw_actions, (-1, 7))[:, :3] for c in h.chunks])
    assert np.abs(raw).max() > 2 * MAX_STEP  # the model asked for more: the limit did work
    assert h.counter('worldvla_action', 'values_limited') > 0


def _set_parameter(h: Harness, name: str, value: list[float]):
    return h.set_parameter('worldvla_action', name, [float(v) for v in value])


def test_safety_limits_change_at_runtime(graph) -> None:
    """ros2 param set on max_step takes effect with the next command; an inconsistent clamp is refused."""
    h, _ = graph
    tighter = MAX_STEP / 5
    assert _set_parameter(h, 'max_step', [tighter] * 3 + [0.0] * 4).successful
    with h.lock:
        n = len(h.commands)
    h.stream(3.0)
    with h.lock:
        sent = [m for _, m in h.commands[n - 1 :]]  # with the command before the change
    actions = np.array([m.action for m in sent])
    steps = np.abs(np.diff(actions, axis=0))[:, :3]
    motion = np.array([not m.hold for m in sent[1:]])
    # the random tiny model often ends a chunk after one action: motion and holds alternate
    assert motion.sum() >= 5 and steps[motion].max() <= tighter + 1e-9
    refused = _set_parameter(h, 'action_min', [1.0] * 7)  # above action_max
    assert not refused.successful and 'action_max' in refused.reason
    assert _set_parameter(h, 'max_step', [MAX_STEP] * 3 + [0.0] * 4).successful


@pytest.mark.timeout(180)
def test_compressed_camera_feeds_both_nodes(tiny_checkpoint: Path, isolated_graph) -> None:
    """use_compressed: JPEG frames on camera/image_raw/compressed → chunks and imagined frames; a broken one is
    counted and rejected by both nodes."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    from worldvla_ros.nodes.common import watch_diagnostics

    node = isolated_graph
    procs = start_nodes(str(tiny_checkpoint), default_config(), 'cpu', extra={
        'use_compressed': 'true', 'control_rate_hz': str(RATE), 'max_obs_age': '2.0'})
    chunks: list[ActionChunk] = []
    imagined: list[Image] = []
    node.create_subscription(ActionChunk, 'worldvla/action_chunk', chunks.append, reliable_qos())
    node.create_subscription(Image, 'worldvla/imagined_image', imagined.append, reliable_qos())
    action_diag = watch_diagnostics(node, 'worldvla_action')
    wm_diag = watch_diagnostics(node, 'worldvla_world_model')
    pub = node.create_publisher(CompressedImage, 'camera/image_raw/compressed', qos_profile_sensor_data)
    node.create_publisher(String, 'instruction', latched_qos()).publish(String(data='put the red block in the bowl'))
    camera = SyntheticCamera(seed=4)

    def jpeg(broken: bool = False) -> CompressedImage:
        ok, data = cv2.imencode('.jpg', camera.render()[:, :, ::-1])
        assert ok
        msg = CompressedImage(format='rgb8; jpeg compressed bgr8', data=b'garbage' if broken else data.tobytes())
        msg.header.stamp = node.get_clock().now().to_msg()
        return msg

    try:
        end, sent = time.monotonic() + 120, 0
        while time.monotonic() < end and not (chunks and imagined and 'rejected_decode' in wm_diag
                                              and 'rejected_decode' in action_diag):
            pub.publish(jpeg(broken=sent % 5 == 4))
            sent += 1
            time.sleep(0.1)
        assert chunks and imagined, (action_diag, wm_diag)
        assert (imagined[-1].width, imagined[-1].height) == (256, 256)
        assert int(action_diag['rejected_decode']) >= 1 and int(wm_diag['rejected_decode']) >= 1
        assert all(p.poll() is None for p in procs)
    finally:
        codes = stop_nodes(procs)
    assert all(c in (0, -2) for c in codes), codes


def test_missing_checkpoint_exits_nonzero(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, '-m', 'worldvla_ros.nodes.action_node', '--ros-args', '-p',
         f'checkpoint:={tmp_path / "missing"}'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert 'cannot load checkpoint' in proc.stderr and 'does not exist' in proc.stderr
