"""Many robots on one model: one fleet process, three robot namespaces, real rclpy graphs."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import torch
import yaml
from harness import Harness, wait_until
from rclpy.time import Time
from std_msgs.msg import Bool, String

from worldvla_ros.model import load_policy
from worldvla_ros.model.batching import BatchingPolicy

pytestmark = pytest.mark.ros
ROBOTS = ['arm1', 'arm2', 'arm3']
TASKS = {'arm1': 'put the red block in the bowl', 'arm2': 'stack the blocks',
         'arm3': 'move the green block onto the plate'}


@pytest.fixture(scope='module')
def fleet(fixed_chunk_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp('fleet')
    params = logs / 'fleet.yaml'
    params.write_text(yaml.safe_dump({
        'worldvla_fleet': {'ros__parameters': {'robots': ROBOTS, 'max_batch_wait_ms': 20.0}},
        '/**/worldvla_action': {'ros__parameters': {
            'checkpoint': str(fixed_chunk_checkpoint), 'device': 'cpu', 'enabled': True, 'control_rate_hz': 10.0,
            'max_obs_age': 2.0, 'watchdog_timeout': 1.0}},
        '/arm2/worldvla_action': {'ros__parameters': {'max_step': [0.02, 0.02, 0.02, 0.0, 0.0, 0.0, 0.0]}},
    }))
    log = open(logs / 'fleet.log', 'w')
    proc = subprocess.Popen([str(Path(sys.prefix) / 'lib' / 'worldvla' / 'fleet_node'), '--ros-args',
                             '--params-file', str(params)], stdout=log, stderr=subprocess.STDOUT,
                            env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    rclpy.init()
    robots = {r: Harness(namespace=r) for r in ROBOTS}
    try:
        for r, h in robots.items():
            h.instruction_pub.publish(String(data=TASKS[r]))

        def all_planning() -> bool:
            for h in robots.values():
                h.send_frame()
            return all(len(h.chunks) >= 2 for h in robots.values())

        if not wait_until(all_planning, 300, poll=0.1):
            pytest.fail(f'not every robot got chunks: {[len(h.chunks) for h in robots.values()]}\n'
                        f'{(logs / "fleet.log").read_text()[-3000:]}')
        yield robots, proc, logs / 'fleet.log'
    finally:
        for h in robots.values():
            h.close()
        rclpy.shutdown()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _stream(robots: dict[str, Harness], seconds: float, skip: tuple[str, ...] = ()) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for r, h in robots.items():
            if r not in skip:
                h.send_frame()
        time.sleep(0.1)


def test_each_robot_gets_the_chunk_it_would_get_alone(fleet, fixed_chunk_checkpoint: Path) -> None:
    robots, proc, _ = fleet
    _stream(robots, 2.0)
    policy = load_policy(fixed_chunk_checkpoint, device='cpu')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fleet process (OMP_NUM_THREADS=1): the VQ encoder's convolutions differ
    for r, h in robots.items():
        with h.lock:
            chunks = list(h.chunks[-3:])
        assert chunks and all(c.instruction == TASKS[r] for c in chunks)
        checked = 0
        for chunk in chunks:
            stamps = [Time.from_msg(s).nanoseconds for s in chunk.observation_stamps]
            if not all(s in h.sent_frames for s in stamps):
                continue
            alone = policy.predict([policy.model_frame(h.sent_frames[s]) for s in stamps], TASKS[r])
            assert np.array_equal(np.reshape(chunk.raw_actions, (-1, 7)), alone.actions), r
            checked += 1
        assert checked, r
    torch.set_num_threads(threads)
    assert proc.poll() is None


def test_one_robots_estop_and_stale_camera_stop_only_that_robot(fleet) -> None:
    robots, proc, _ = fleet
    arm1, arm2 = robots['arm1'], robots['arm2']
    arm1.estop_pub.publish(Bool(data=True))
    assert wait_until(lambda: arm1.counter('worldvla_action', 'estops') >= 1, 10)
    t0 = time.monotonic()
    _stream(robots, 3.0, skip=('arm2',))  # arm2's camera goes silent
    since = {r: [m for t, m in h.commands if t > t0 + 1.5] for r, h in robots.items()}
    assert since['arm1'] and all(m.hold for m in since['arm1'])  # e-stopped
    assert since['arm2'] and all(m.hold for m in since['arm2'])  # watchdog: no fresh chunk
    assert any(not m.hold for m in since['arm3'])  # the third robot goes on
    # each robot keeps its own limits: arm2 was given a tighter step limit
    motion2 = np.array([m.action[:3] for _, m in arm2.commands if not m.hold])
    assert len(motion2) and np.abs(np.diff(motion2, axis=0)).max() <= 0.02 + 1e-9
    assert proc.poll() is None


def test_batching_policy_gives_each_caller_its_own_chunk(tiny_policy, frames) -> None:
    """Without ROS: three threads at once get the chunks predict gives each alone, in batches."""
    import threading

    batching = BatchingPolicy(tiny_policy, callers=4, max_wait_s=0.5)
    texts = ['put the bowl on the plate', 'open the drawer', 'x', 'a robot whose camera sends floats']
    out: dict[str, np.ndarray] = {}
    errors: dict[str, BaseException] = {}

    def ask(text: str) -> None:
        try:
            sent = [f.astype(np.float32) for f in frames] if 'floats' in text else frames
            out[text] = batching.predict(sent, text).actions
        except BaseException as exc:
            errors[text] = exc

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # the bad frame is its robot's own error (raised in its thread, before batching); the others get chunks
    assert list(errors) == [texts[3]] and isinstance(errors[texts[3]], ValueError)
    for text in texts[:3]:
        assert np.array_equal(out[text], tiny_policy.predict(frames, text).actions)
    assert max(batching.batch_sizes) >= 2  # decoded together
    with pytest.raises(ValueError):
        batching.predict(frames, '   ')  # one caller's bad instruction is its own error
    batching.close()
