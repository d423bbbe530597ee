"""worldvla_bringup for real: a namespaced graph keeps every YAML parameter, the managed action node is
brought to active through its lifecycle services, a configure that fails stops everything, and a killed
launcher takes its nodes with it (each ending on a hold) instead of leaving them commanding."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from harness import Harness, wait_until
from rclpy.time import Time

pytestmark = pytest.mark.ros
NS = 'robot1'


@pytest.mark.timeout(300)
def test_namespaced_bringup_keeps_the_yaml_and_dies_with_its_launcher(tiny_checkpoint: Path, isolated_graph,
                                                                       tmp_path: Path) -> None:
    user = tmp_path / 'robot.yaml'
    user.write_text('worldvla_action:\n  ros__parameters:\n    control_rate_hz: 5.0\n    max_obs_age: 2.0\n')
    scratch = tmp_path / 'tmp'  # where the generated parameter files go (TMPDIR)
    scratch.mkdir()
    bringup = subprocess.Popen(
        [sys.executable, '-m', 'worldvla_ros.bringup', '--checkpoint', str(tiny_checkpoint), '--device', 'cpu',
         '--namespace', NS, '--config', str(Path(__file__).parent.parent / 'config' / 'worldvla.yaml'),
         '--config', str(user), '--sim', '--no-world-model'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, 'TMPDIR': str(scratch)})
    h = Harness(context=isolated_graph.context, namespace=NS)  # listens in /robot1; the sim is the camera
    action = f'/{NS}/worldvla_action'
    try:
        flowing = wait_until(lambda: len(h.chunks) >= 3 and len(h.commands) >= 8, 180)
        assert flowing, bringup.stdout.read() if bringup.poll() is not None else 'no chunks in 180 s'
        assert h.get_parameter(action, 'control_rate_hz') == 5.0  # the user's file, keyed by the bare name
        assert h.get_parameter(action, 'enabled') is True  # the sim's overlay
        assert h.get_parameter(action, 'replan_threshold') == 1
        assert h.get_parameter(action, 'checkpoint') == str(tiny_checkpoint)
        assert h.get_parameter(action, 'autostart') is False  # bringup drove it: configure, then activate
        with h.lock:
            times = np.array([t for t, _ in h.commands[-10:]])
        assert len(times) >= 5 and float(np.median(np.diff(times))) == pytest.approx(0.2, rel=0.3)  # 5 Hz

        children = psutil.Process(bringup.pid).children()
        assert {' '.join(c.cmdline()) for c in children}  # action node and sim
        with h.lock:
            sent_before = len(h.commands)
        bringup.kill()  # the launcher dies without stopping anything
        bringup.wait()
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, [c.cmdline() for c in alive]
        time.sleep(0.5)
        with h.lock:
            last = h.commands[-1][1]
            assert len(h.commands) > sent_before
        assert last.hold and list(last.action[:6]) == [0.0] * 6  # the action node's last word
        assert Time.from_msg(last.header.stamp).nanoseconds > 0
    finally:
        if bringup.poll() is None:
            bringup.send_signal(signal.SIGINT)
            bringup.wait(timeout=20)
        h.close()


@pytest.mark.timeout(120)
def test_a_configure_that_fails_stops_every_node(tiny_checkpoint: Path, isolated_graph, tmp_path: Path) -> None:
    """The model cannot load: bringup says which node and why, exits 1, and no node is left running."""
    import shutil

    broken = tmp_path / 'broken'
    shutil.copytree(tiny_checkpoint, broken)
    (broken / 'config.json').write_text('[1, 2, 3]')
    namespace = f'broken{os.getpid()}'  # its own: the Jazzy session runs this test at the same time
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    run = subprocess.run([sys.executable, '-m', 'worldvla_ros.bringup', '--checkpoint', str(broken), '--device',
                          'cpu', '--namespace', namespace, '--sim', '--no-world-model'], capture_output=True,
                         text=True, timeout=100, env={**os.environ, 'TMPDIR': str(scratch)})
    assert run.returncode == 1, run.stderr[-2000:]
    assert f'/{namespace}/worldvla_action did not become active: configure failed' in run.stderr
    assert 'configure failed: ' in run.stderr and 'expected an object' in run.stderr  # the node's own reason
    assert 'Traceback' not in run.stderr
    leftovers = [p for p in psutil.process_iter(['cmdline']) if f'__ns:=/{namespace}' in (p.info['cmdline'] or [])]
    assert not leftovers, [p.info['cmdline'] for p in leftovers]
    assert not list(scratch.iterdir()), 'generated parameter files left behind'  # every launch left them
