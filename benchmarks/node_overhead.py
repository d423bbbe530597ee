"""Action-node overhead and behaviour under a fast camera, printed as JSON.

    python benchmarks/node_overhead.py --seconds 300 --camera-hz 30 [--checkpoint DIR --device cuda]

Overhead = (chunk received − its frame published) − the chunk's reported inference latency:
message transport, conversion, queueing and publishing, the model excluded. Reported apart, from the
node's own /diagnostics (its last 200 chunks): ``frame_wait`` — the newest frame's age when the
inference worker picks it up (up to one inference: frames arriving meanwhile wait, the newest is used)
— and ``node_work`` — the node's own work for a chunk: the frame's conversion and checks, then the
safety limits, messages and publishing (the model, the wait and transport excluded). Also reports how
many camera frames the node dropped (it must drop, not queue) and the action node's RSS over
time (it must stay flat).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import Image
from std_msgs.msg import String
from worldvla.msg import ActionChunk

from worldvla_ros.bringup import default_config, start_nodes, stop_nodes
from worldvla_ros.image_conversion import fill_image_msg
from worldvla_ros.model import make_tiny_checkpoint
from worldvla_ros.nodes.common import latched_qos, reliable_qos, watch_diagnostics
from worldvla_ros.synthetic import SyntheticCamera


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seconds', type=float, default=300.0)
    parser.add_argument('--camera-hz', type=float, default=30.0)
    parser.add_argument('--checkpoint', default='')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or str(make_tiny_checkpoint(Path(tmp.name) / 'tiny'))
    procs = start_nodes(ckpt, default_config(), args.device, use_world_model=False,
                        extra={'enabled': 'true', 'max_obs_age': '2.0'})
    action_proc = psutil.Process(procs[0].pid)
    rclpy.init()
    node = rclpy.create_node('worldvla_bench')
    image_pub = node.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
    node.create_publisher(String, 'instruction', latched_qos()).publish(String(data='pick up the red block'))
    sent: dict[int, float] = {}
    overhead, latency = [], []
    lock = threading.Lock()

    answered = threading.Event()

    def on_chunk(m: ActionChunk) -> None:
        now = time.perf_counter()
        answered.set()
        with lock:
            t_sent = sent.get(Time.from_msg(m.header.stamp).nanoseconds)
        if t_sent is not None:
            overhead.append((now - t_sent - m.inference_latency) * 1e3)
            latency.append(m.inference_latency * 1e3)

    node.create_subscription(ActionChunk, 'worldvla/action_chunk', on_chunk, reliable_qos())
    diag = watch_diagnostics(node, 'worldvla_action')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    camera = SyntheticCamera()
    frame = fill_image_msg(Image(), camera.render())
    while not answered.is_set() and action_proc.is_running():  # wait until the node answers
        frame.header.stamp = node.get_clock().now().to_msg()
        image_pub.publish(frame)
        time.sleep(0.1)
    overhead.clear()
    latency.clear()
    start_counts = dict(diag)
    rss = []
    start = next_sample = time.perf_counter()
    period = 1.0 / args.camera_hz
    published = 0
    while time.perf_counter() - start < args.seconds:
        frame.header.stamp = node.get_clock().now().to_msg()
        with lock:
            sent[Time.from_msg(frame.header.stamp).nanoseconds] = time.perf_counter()
        image_pub.publish(frame)
        published += 1
        if time.perf_counter() >= next_sample:
            rss.append(action_proc.memory_info().rss / 2**20)
            next_sample += max(1.0, args.seconds / 30)
        time.sleep(max(0.0, start + published * period - time.perf_counter()))
    time.sleep(1.5)  # one more diagnostics round
    ov = np.asarray(overhead)

    def delta(key: str) -> int:
        return int(diag.get(key, 0)) - int(start_counts.get(key, 0))

    result = {
        'seconds': args.seconds, 'camera_hz': args.camera_hz, 'frames_published': published,
        'frames_received_by_node': delta('frames_received'), 'frames_dropped_by_node': delta('frames_dropped'),
        'chunks': len(ov),
        'overhead_ms_p50': round(float(np.percentile(ov, 50)), 2) if len(ov) else None,
        'overhead_ms_p99': round(float(np.percentile(ov, 99)), 2) if len(ov) else None,
        'inference_ms_p50': round(float(np.percentile(latency, 50)), 1) if latency else None,
        'frame_wait_ms_p50_p99': [float(diag.get(f'frame_wait_p{q}_ms', 'nan')) for q in (50, 99)],
        'node_work_ms_p50_p99': [float(diag.get(f'node_work_p{q}_ms', 'nan')) for q in (50, 99)],
        'action_node_rss_mib_first_last_max': [round(rss[0], 1), round(rss[-1], 1), round(max(rss), 1)],
        'action_node_rss_mib_series': [round(r) for r in rss],
        'rss_sample_period_s': round(max(1.0, args.seconds / 30), 1),
    }
    executor.shutdown()
    spinner.join(timeout=5)
    node.destroy_node()
    rclpy.shutdown()
    stop_nodes(procs)
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
