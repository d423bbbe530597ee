"""The world-model node's monitor in a real ROS 2 graph: the sim's frames and executed commands in, likelihood
signals, excess-bits maps, /diagnostics levels and the optional e-stop hold out."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from harness import Harness, NodeProcess
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Float64MultiArray, String
from worldvla.msg import EndEffectorCommand

from worldvla_ros.bringup import default_config
from worldvla_ros.image_conversion import fill_image_msg
from worldvla_ros.model import load_policy
from worldvla_ros.monitor import calibrate, transition_signals
from worldvla_ros.nodes.common import latched_qos, reliable_qos
from worldvla_ros.sim.anomalies import normal_transition
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.record import with_exploration_noise
from worldvla_ros.sim.tabletop import TabletopSim, scripted_action

pytestmark = pytest.mark.ros
MONITOR = 'worldvla: world model monitor'


@pytest.fixture(scope='module')
def calibrated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with thresholds for 2 % false alarms from 100 normal sim transitions (as evaluate_bag
    --calibrate-monitor would write them) shipped inside it, as monitor_calibration.json."""
    import shutil

    from worldvla_ros.monitor import CALIBRATION_FILE

    policy = load_policy(bundled_checkpoint(), device='cpu')
    policy.use_cpu_threads(1)
    signals = []
    for i in range(100):
        t = normal_transition(600_000 + i)
        lik = policy.transition_likelihood(t.frame, t.action, t.next_frame)
        signals.append(transition_signals(lik, policy.model_frame(t.frame), policy.model_frame(t.next_frame)))
    root = tmp_path_factory.mktemp('monitor') / 'tabletop'
    shutil.copytree(bundled_checkpoint(), root)
    calibrate(signals, 0.02, model_id=policy.model_id).save(root / CALIBRATION_FILE)
    return root


def test_sustained_surprise_raises_diagnostics_and_when_enabled_latches_the_estop(calibrated_checkpoint: Path,
                                                                                  tmp_path: Path) -> None:
    node = NodeProcess('world_model_node', tmp_path, {  # monitor_calibration empty: the checkpoint's own file
        'checkpoint': str(calibrated_checkpoint), 'device': 'cpu', 'surprise_warn_after': '2',
        'surprise_error_after': '4', 'max_obs_age': '5.0'}, config=[default_config()])
    rclpy.init()
    h = Harness()
    lock = threading.Lock()
    monitor: list[list[float]] = []
    maps: list[Image] = []
    estops: list[bool] = []
    levels: list[int] = []
    node_values: dict[str, str] = {}
    n = h.node
    n.create_subscription(Float64MultiArray, 'worldvla/monitor', lambda m: (lock.acquire(), monitor.append(
        list(m.data)), lock.release()), reliable_qos(100))
    n.create_subscription(Image, 'worldvla/surprise_map', lambda m: (lock.acquire(), maps.append(m), lock.release()),
                          reliable_qos(100))
    n.create_subscription(Bool, 'worldvla/estop', lambda m: (lock.acquire(), estops.append(m.data), lock.release()),
                          reliable_qos(10))

    def on_diag(m: DiagnosticArray) -> None:
        with lock:
            levels.extend(s.level[0] if isinstance(s.level, bytes) else s.level for s in m.status if s.name == MONITOR)
            node_values.update({kv.key: kv.value for s in m.status if s.name != MONITOR for kv in s.values})

    n.create_subscription(DiagnosticArray, '/diagnostics', on_diag, reliable_qos())
    commands = n.create_publisher(EndEffectorCommand, 'worldvla/ee_command', reliable_qos(50))
    sim, rng = TabletopSim(), np.random.default_rng(0)

    def publish_frame(frame: np.ndarray) -> None:
        msg = fill_image_msg(Image(), frame)
        msg.header.stamp = n.get_clock().now().to_msg()
        h.image_pub.publish(msg)
        time.sleep(0.1)

    def play(steps: int, surprising: bool, seed: int) -> None:
        """The sim's camera and its executed commands, a step each; surprising: a new layout every frame."""
        sim.reset(seed)
        for k in range(steps):
            if surprising:
                sim.reset(seed + k)
            publish_frame(sim.render())
            action = with_exploration_noise(scripted_action(sim), rng, 0.1)
            commands.publish(EndEffectorCommand(action=action.tolist()))
            time.sleep(0.1)
            sim.step(action)

    def count() -> int:
        with lock:
            return len(monitor)

    try:
        assert h.wait_for(lambda: h.image_pub.get_subscription_count() > 0 and commands.get_subscription_count() > 0,
                          timeout=120, frames=False), node.log()[-3000:]
        assert f'monitor calibrated from {calibrated_checkpoint / "monitor_calibration.json"}' in node.log()
        play(25, surprising=False, seed=650_000)
        assert h.wait_for(lambda: count() >= 15, timeout=30, frames=False), node.log()[-3000:]
        time.sleep(1.5)  # a diagnostics period
        with lock:
            normal, levels_normal = list(monitor), list(levels)
        assert levels_normal and levels_normal[-1] == 0, levels_normal  # normal operation: OK
        assert np.mean([m[-2] for m in normal]) <= 0.3, normal  # alarms rare (2 % calibrated)
        assert max(m[-1] for m in normal) < 2 and not estops
        with lock:
            assert maps and (maps[-1].height, maps[-1].width) == (64, 64)

        # an instruction between two commands (a sim's new episode) ends the chain: no transition spans it
        before = count()
        h.instruction_pub.publish(String(data='stack the blocks'))  # ends the chain play() left open
        time.sleep(0.2)
        sim.reset(655_000)
        publish_frame(sim.render())
        commands.publish(EndEffectorCommand(action=[0.0] * 7))
        time.sleep(0.2)
        h.instruction_pub.publish(String(data='stack the blocks'))  # a new episode: this command's chain ends
        time.sleep(0.2)
        for _ in range(2):
            publish_frame(sim.render())
            commands.publish(EndEffectorCommand(action=[0.0] * 7))
            time.sleep(0.2)
        assert h.wait_for(lambda: count() >= before + 1, timeout=20, frames=False)
        time.sleep(1.5)
        assert count() == before + 1  # of three commands only the last closes a transition
        with lock:
            assert int(node_values.get('transitions_across_reset', 0)) == 2, node_values
            normal = list(monitor)

        play(8, surprising=True, seed=660_000)  # hold_on_surprise is off: ERROR but no e-stop
        assert h.wait_for(lambda: count() >= len(normal) + 6, timeout=30, frames=False)
        time.sleep(1.5)
        with lock:
            surprising = monitor[len(normal):]
            assert levels[-1] == 2, levels[-12:]
            assert not estops
        assert sum(m[-2] for m in surprising) >= 5  # every new layout alarms
        seen = [int(m[-1]) for m in surprising]
        assert 1 in seen and 2 in seen and seen.index(1) < seen.index(2), seen  # WARN before ERROR

        assert h.set_parameter('worldvla_world_model', 'hold_on_surprise', True).successful
        play(6, surprising=True, seed=670_000)
        assert h.wait_for(lambda: bool(estops), timeout=20, frames=False), node.log()[-3000:]
        time.sleep(1.0)
        with lock:
            # latched at every transition while ERROR lasts: a reset in between is followed by a new latch
            assert len(estops) >= 2 and all(estops), estops
            run = len(estops)
        late: list[bool] = []  # a reader that joins now (e.g. a restarted action node) gets the latched value
        n.create_subscription(Bool, 'worldvla/estop', lambda m: late.append(m.data), latched_qos())
        assert h.wait_for(lambda: late == [True], timeout=10, frames=False), late
        play(6, surprising=False, seed=680_000)  # back to normal: the latched `true` is replaced by a `false`
        assert h.wait_for(lambda: estops[-1] is False, timeout=20, frames=False), estops
        with lock:
            assert all(estops[:-1]) and len(estops) >= run + 1, estops  # transitions still in the queue may alarm
            run = len(estops) - 1
        later: list[bool] = []
        n.create_subscription(Bool, 'worldvla/estop', lambda m: later.append(m.data), latched_qos())
        assert h.wait_for(lambda: later == [False], timeout=10, frames=False), later
        assert 'e-stop latched' in node.log()
        time.sleep(1.0)
        with lock:
            assert int(node_values.get('surprise_holds', 0)) == 1, node_values  # one run
            assert int(node_values.get('surprise_estops_sent', 0)) == run, node_values
            assert int(node_values.get('monitor_errors', 0)) == 0 and int(node_values['transitions_scored']) >= 35
    finally:
        h.close()
        rclpy.shutdown()
        code = node.stop()
    assert code == 0, node.log()[-3000:]


@pytest.mark.parametrize('case', ['shipped unknown signal', 'parameter at /dev/zero', 'parameter mistyped',
                                  'error before warn'])
def test_a_broken_calibration_stops_the_start_with_one_fatal_line(tiny_checkpoint: Path, tmp_path: Path,
                                                                  case: str) -> None:
    import json
    import shutil
    import subprocess
    import sys

    from worldvla_ros.monitor import CALIBRATION_FILE

    broken = tmp_path / 'broken'
    shutil.copytree(tiny_checkpoint, broken)
    params, says = [], []
    if case == 'shipped unknown signal':
        (broken / CALIBRATION_FILE).write_text('{"format": "worldvla-monitor-calibration/1", "thresholds": {"x": 1}}')
        says = ['unknown signals', CALIBRATION_FILE, "checkpoint's calibration"]
    elif case == 'parameter at /dev/zero':
        params, says = ['monitor_calibration:=/dev/zero'], ['parameter monitor_calibration', '/dev/zero',
                                                             'not a regular file']
    elif case == 'parameter mistyped':
        mine = tmp_path / 'mine.json'
        mine.write_text(json.dumps({'format': 'worldvla-monitor-calibration/1', 'false_alarm_rate': 'abc',
                                    'thresholds': {'peak_excess_bits': 1.0}}))
        params, says = [f'monitor_calibration:={mine}'], ['parameter monitor_calibration', str(mine),
                                                           'false_alarm_rate']
    else:
        params, says = ['surprise_warn_after:=5', 'surprise_error_after:=2'], ['surprise_error_after']
    cmd = [sys.executable, '-m', 'worldvla_ros.nodes.world_model_node', '--ros-args', '-p', f'checkpoint:={broken}',
           '-p', 'device:=cpu']
    for p in params:
        cmd += ['-p', p]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    fatal = [line for line in out.splitlines() if 'FATAL' in line]
    assert proc.returncode == 1 and 'Traceback' not in out and len(fatal) == 1, out[-2000:]
    assert all(s in fatal[0] for s in says), fatal[0]
    assert 'ready: world model' not in out  # refused before the model loaded


def test_a_driver_that_flips_x_raises_warn_then_error_and_holds_the_robot(tiny_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    """A robot whose driver executes Δx with the wrong sign from transition 8 on, its camera and its commands
    into a real world-model node whose calibration (the motion check, fitted on the expert's normal work) alarms
    on motion_cusum: the node's values are the ones computed here without ROS; it stays OK before the fault,
    then WARN, then ERROR within 2 + surprise_error_after transitions of the first alarm, and latches the e-stop
    (hold_on_surprise)."""
    from worldvla_ros.monitor import CalibrationEpisode, calibrate_episodes, motion_signals
    from worldvla_ros.motion_check import motion_features, motion_frame
    from worldvla_ros.nodes.world_model_node import MONITOR_FIELDS
    from worldvla_ros.sim.anomalies import fault_episode

    def features(ep) -> list[np.ndarray]:
        gray = [motion_frame(f) for f in ep.observed]
        return [motion_features(gray[k], gray[k + 1]) for k in range(len(ep.commands))]

    normal = [fault_episode(None, 186_000 + i, steps=30) for i in range(16)]
    cal = calibrate_episodes([CalibrationEpisode(str(i), features(e), e.commands, [{} for _ in e.commands])
                              for i, e in enumerate(normal)], 0.02, ('motion_cusum',))
    path = tmp_path / 'motion_calibration.json'
    cal.save(path)
    onset, error_after = 8, 4
    ep = fault_episode('flipped_x', 189_005, steps=16, onset=onset)
    cusum, expected = cal.sequential(), []
    for k, f in enumerate(features(ep)):
        expected.append(motion_signals(cal.motion, cusum, f, ep.commands[k], ep.commands[max(0, k - 2):k])[0])
    alarms = [e['motion_cusum'] > cal.thresholds['motion_cusum'] for e in expected]
    first = alarms.index(True)
    assert not any(alarms[:onset]) and onset <= first < onset + 5 and all(alarms[first:first + error_after])

    node = NodeProcess('world_model_node', tmp_path, {
        'checkpoint': str(tiny_checkpoint), 'device': 'cpu', 'monitor_calibration': str(path),
        'surprise_warn_after': '2', 'surprise_error_after': str(error_after), 'hold_on_surprise': 'true',
        'max_obs_age': '5.0'}, config=[default_config()])
    rclpy.init()
    h = Harness()
    lock = threading.Lock()
    monitor: list[list[float]] = []
    estops: list[bool] = []
    n = h.node
    n.create_subscription(Float64MultiArray, 'worldvla/monitor', lambda m: (lock.acquire(), monitor.append(
        list(m.data)), lock.release()), reliable_qos(100))
    n.create_subscription(Bool, 'worldvla/estop', lambda m: (lock.acquire(), estops.append(m.data), lock.release()),
                          reliable_qos(10))
    statuses: list[tuple[int, str]] = []
    n.create_subscription(DiagnosticArray, '/diagnostics', lambda m: (lock.acquire(), statuses.extend(
        (int.from_bytes(s.level, 'little') if isinstance(s.level, bytes) else s.level, s.message)
        for s in m.status if s.name == MONITOR), lock.release()), reliable_qos())
    commands = n.create_publisher(EndEffectorCommand, 'worldvla/ee_command', reliable_qos(50))
    try:
        assert h.wait_for(lambda: h.image_pub.get_subscription_count() > 0 and commands.get_subscription_count() > 0,
                          timeout=120, frames=False), node.log()[-3000:]
        received = [h.settled_counter('worldvla_world_model', 'frames_received')]

        def deliver(frame: np.ndarray) -> None:
            """Until the node counts it received (best effort: a frame may be lost, or overtaken by a command)."""
            received[0] += 1
            for _ in range(5):
                msg = fill_image_msg(Image(), frame)
                msg.header.stamp = n.get_clock().now().to_msg()
                h.image_pub.publish(msg)
                if h.wait_for(lambda: h.counter('worldvla_world_model', 'frames_received') >= received[0],
                              timeout=5, frames=False):
                    received[0] = h.counter('worldvla_world_model', 'frames_received')  # a resent frame counts too
                    return
            raise AssertionError('the world-model node receives no frames')

        for k, frame in enumerate(ep.observed):
            deliver(frame)
            action = ep.commands[k] if k < len(ep.commands) else np.zeros(7)
            commands.publish(EndEffectorCommand(action=np.asarray(action).tolist()))
            # one step at a time: a reliable command can be resent (and so overtaken by the next frame) on a
            # loaded machine, and a busy monitor drops the oldest of a queue (counted)
            assert h.wait_for(lambda k=k: h.counter('worldvla_world_model', 'commands_received') > k and
                              len(monitor) >= k, timeout=30, frames=False), (
                k, len(monitor), received, {k: v for k, v in h.diag.get('worldvla_world_model', {}).items()
                                            if 'transition' in k or 'frames' in k})
        assert h.wait_for(lambda: len(monitor) >= len(expected), timeout=30, frames=False), node.log()[-3000:]
        time.sleep(0.5)
        with lock:
            got = list(monitor)
        at = {name: i for i, name in enumerate(MONITOR_FIELDS)}
        assert len(got) == len(expected), ([round(g[at['motion_cusum']], 2) for g in got],
                                           [round(e['motion_cusum'], 2) for e in expected])
        np.testing.assert_allclose([g[at['motion_cusum']] for g in got], [e['motion_cusum'] for e in expected],
                                   atol=1e-6)
        levels = [int(g[at['level']]) for g in got]
        assert levels[:onset] == [0] * onset, levels
        assert levels[first + 1] == 1 and 2 in levels and levels.index(2) == first + error_after - 1, levels
        assert h.wait_for(lambda: bool(estops) and estops[-1], timeout=10, frames=False), estops
        # a frame captured before the command it should show arrived (a camera seeing late, stamped honestly)
        # closes no transition: counted
        commands.publish(EndEffectorCommand(action=[0.1] * 6 + [1.0]))
        time.sleep(0.3)
        old = fill_image_msg(Image(), ep.observed[-1])
        old.header.stamp = (n.get_clock().now() - rclpy.duration.Duration(seconds=1.0)).to_msg()
        h.image_pub.publish(old)
        time.sleep(0.3)
        commands.publish(EndEffectorCommand(action=[0.1] * 6 + [1.0]))
        assert h.wait_for(lambda: h.counter('worldvla_world_model', 'transitions_stale_frame') >= 1, timeout=10,
                          frames=False)
        # an instruction between every two commands (a flood) ends every chain: the monitor says it is blind, once
        # no transition was scored for BLIND_AFTER_S (5 s). A loaded machine may still be scoring what was queued
        # before the flood for a while, so the flood goes on until the report comes, for up to 20 s
        def blind_reported() -> bool:
            with lock:
                return any(level >= 1 and message.startswith('blind') for level, message in statuses[-3:])

        end = time.monotonic() + 20.0
        while time.monotonic() < end and not blind_reported():
            h.send_frame()
            time.sleep(0.05)
            commands.publish(EndEffectorCommand(action=[0.0] * 7))
            time.sleep(0.05)
            h.instruction_pub.publish(String(data='again'))
            time.sleep(0.05)
        assert blind_reported(), statuses[-5:]
    finally:
        h.close()
        rclpy.shutdown()
        code = node.stop()
    assert code == 0, node.log()[-3000:]
