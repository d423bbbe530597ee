"""Control under a flood of RunInstruction goals: command gaps and how many requests get an answer, as JSON.

    python benchmarks/goal_flood.py --rate 200 --seconds 10            # one action node
    python benchmarks/goal_flood.py --rate 200 --seconds 10 --fleet 3  # a 3-robot fleet, robot1 flooded

A client sends goals at ``--rate`` per second (each preempting the last, as a misbehaving task planner would)
while a camera streams at 10 Hz. Reported per robot: the gaps between consecutive ``ee_command`` messages (the
node's control period is 0.1 s; a driver's deadline is two periods) as received, before and during the flood,
and as sent (the node's own ``command_interval`` on /diagnostics: on 2 cores the receiving process competes for
the CPU with the node, so receipt gaps overstate what the node sends); for the flooded robot, the share of goal
requests answered (accepted or rejected) and of accepted goals whose result arrived.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String
from worldvla.action import RunInstruction
from worldvla.msg import EndEffectorCommand

from worldvla_ros.bringup import default_config, node_command
from worldvla_ros.image_conversion import fill_image_msg
from worldvla_ros.launch_plan import NodeSpec, node_parameters, parameter_directory
from worldvla_ros.model import make_tiny_checkpoint
from worldvla_ros.nodes.common import latched_qos, reliable_qos, watch_diagnostics
from worldvla_ros.synthetic import SyntheticCamera

TASK = 'put the red block in the bowl'


def _start(checkpoint: str, robots: list[str], tmp: Path):
    import subprocess

    params = {'checkpoint': checkpoint, 'device': 'cpu', 'enabled': True, 'max_obs_age': 2.0,
              'watchdog_timeout': 2.0, 'replan_threshold': 1}
    if len(robots) == 1 and not robots[0]:
        values = {**node_parameters([default_config()], 'worldvla_action'), **params}
        cmd = node_command(NodeSpec('action_node', 'worldvla_action', '', values), parameter_directory())
    else:
        sections = {'worldvla_fleet': {'ros__parameters': {'robots': robots}}}
        for r in robots:
            values = {**node_parameters([default_config()], 'worldvla_action', f'/{r}'), **params, 'autostart': True}
            sections[f'/{r}/worldvla_action'] = {'ros__parameters': values}
        import yaml

        path = tmp / 'fleet.yaml'
        path.write_text(yaml.safe_dump(sections))
        cmd = [sys.executable, '-m', 'worldvla_ros.nodes.fleet_node', '--ros-args', '--params-file', str(path)]
    return subprocess.Popen(cmd, stdout=open(tmp / 'node.log', 'w'), stderr=subprocess.STDOUT)


class Robot:
    def __init__(self, node: rclpy.node.Node, ns: str) -> None:
        prefix = f'{ns}/' if ns else ''
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.image_pub = node.create_publisher(Image, f'{prefix}camera/image_raw', qos_profile_sensor_data)
        node.create_publisher(String, f'{prefix}instruction', latched_qos()).publish(String(data=TASK))
        node.create_subscription(EndEffectorCommand, f'{prefix}worldvla/ee_command', self._on_command,
                                 reliable_qos(100))
        deep = reliable_qos(1000)  # answers to a burst are queued, not overwritten (the default depth is 10)
        self.goals = ActionClient(node, RunInstruction, f'{prefix}worldvla/run_instruction',
                                  goal_service_qos_profile=deep, result_service_qos_profile=deep,
                                  cancel_service_qos_profile=deep)
        self.diag = watch_diagnostics(node, f'{ns}/worldvla_action' if ns else 'worldvla_action')

    def _on_command(self, _msg: EndEffectorCommand) -> None:
        with self.lock:
            self.times.append(time.monotonic())

    def gaps(self, start: float, end: float) -> np.ndarray:
        with self.lock:
            t = np.asarray([x for x in self.times if start <= x <= end])
        return np.diff(t)


def _gap_stats(gaps: np.ndarray) -> dict[str, float | int | None]:
    if not len(gaps):
        return {'commands': 0, 'gap_p50_s': None, 'gap_p99_s': None, 'gap_max_s': None, 'gaps_over_0.2_s': None}
    return {'commands': len(gaps) + 1, 'gap_p50_s': round(float(np.percentile(gaps, 50)), 3),
            'gap_p99_s': round(float(np.percentile(gaps, 99)), 3), 'gap_max_s': round(float(gaps.max()), 3),
            'gaps_over_0.2_s': int((gaps > 0.2).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rate', type=float, default=200.0, help='goals per second')
    parser.add_argument('--seconds', type=float, default=10.0)
    parser.add_argument('--fleet', type=int, default=0, help='robots of a fleet process (0: one action node)')
    parser.add_argument('--checkpoint', default='')
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix='worldvla-flood-'))
    checkpoint = args.checkpoint or str(make_tiny_checkpoint(tmp / 'tiny'))
    robots = [f'robot{i + 1}' for i in range(args.fleet)] or ['']
    proc = _start(checkpoint, robots, tmp)
    rclpy.init()
    node = rclpy.create_node('worldvla_flood')
    fleet = [Robot(node, r) for r in robots]
    executor = SingleThreadedExecutor()  # goals sent from its own thread: no client race of rclpy
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    camera = SyntheticCamera()
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            frame = fill_image_msg(Image(), camera.render())
            frame.header.stamp = node.get_clock().now().to_msg()
            for r in fleet:
                r.image_pub.publish(frame)
            time.sleep(0.1)

    threading.Thread(target=stream, daemon=True).start()
    flooded = fleet[0]
    if not flooded.goals.wait_for_server(timeout_sec=300):
        raise SystemExit('no action server')
    end = time.monotonic() + 300
    while time.monotonic() < end and not all(len(r.times) > 20 for r in fleet):
        time.sleep(0.2)
    quiet_start = time.monotonic()
    time.sleep(3.0)
    flood_start = time.monotonic()

    lock = threading.Lock()
    answers: dict[int, str] = {}
    results: dict[int, bool] = {}
    sent = 0

    def on_answer(i: int, future) -> None:
        handle = future.result()
        with lock:
            answers[i] = 'accepted' if handle.accepted else 'rejected'
        if handle.accepted:
            handle.get_result_async().add_done_callback(lambda _f: results.__setitem__(i, True))

    # goals are sent from the executor's own thread (a timer): no client race of rclpy's ActionClient
    period = 1.0 / args.rate

    def send_due() -> None:
        nonlocal sent
        due = min(int((time.monotonic() - flood_start) / period) + 1, int(args.seconds * args.rate))
        while sent < due:
            i = sent
            sent += 1
            future = flooded.goals.send_goal_async(RunInstruction.Goal(instruction=f'{TASK} {i % 7}'))
            future.add_done_callback(lambda f, i=i: on_answer(i, f))

    timer = node.create_timer(min(period, 0.005), send_due)
    time.sleep(args.seconds)
    node.destroy_timer(timer)
    flood_end = time.monotonic()
    time.sleep(1.2)  # the nodes' diagnostics of the flood (their last 200 command intervals: 20 s at 10 Hz)
    node_side = [{k: r.diag.get(f'command_interval_{q}_ms') for q, k in (('p50', 'p50_ms'), ('p99', 'p99_ms'),
                                                                          ('max', 'max_ms'))} for r in fleet]
    time.sleep(5.0)  # late answers
    counted = {k: int(flooded.diag.get(k, 0)) for k in ('goal_requests', 'goals_accepted', 'rejected_goal_rate')}
    report = {'node_counted': counted, 'rate_goals_per_s': args.rate, 'seconds': args.seconds, 'robots': len(fleet),
              'goals_sent': sent,
              'answered_share': round(len(answers) / max(sent, 1), 4),
              'accepted': sum(a == 'accepted' for a in answers.values()),
              'rejected': sum(a == 'rejected' for a in answers.values()),
              'results_of_accepted_share': round(len(results) / max(1, sum(a == 'accepted' for a in answers.values())),
                                                 4),
              'per_robot': {}}
    for name, r in zip(robots, fleet, strict=True):
        report['per_robot'][name or 'worldvla_action'] = {
            'received_before_flood': _gap_stats(r.gaps(quiet_start, flood_start)),
            'received_during_flood': _gap_stats(r.gaps(flood_start, flood_end)),
            'sent_last_20_s_node_diagnostics': node_side[fleet.index(r)],
        }
    stop.set()
    proc.send_signal(2)
    try:
        proc.wait(timeout=30)
    except Exception:
        proc.kill()
    executor.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
