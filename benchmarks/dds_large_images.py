"""How many raw camera frames cross from one process to another, by DDS configuration, as JSON.

    python benchmarks/dds_large_images.py [--frames 20] [--hz 30] [--sizes 640x480,1280x720,1920x1080]

A publisher process sends ``--frames`` rgb8 frames at ``--hz`` with the camera QoS (best effort);
a subscriber process with the nodes' camera QoS (depth 1) counts what arrives. Each size runs
with Fast DDS's defaults and with config/fastdds_large_images.xml.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

PROFILE = Path(__file__).resolve().parent.parent / 'config' / 'fastdds_large_images.xml'

SUBSCRIBER = '''
import sys, time, rclpy
from sensor_msgs.msg import Image
from worldvla_ros.nodes.common import image_qos
rclpy.init()
node = rclpy.create_node('dds_bench_sub')
got = []
node.create_subscription(Image, 'dds_bench', lambda m: got.append(len(m.data)), image_qos())
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    rclpy.spin_once(node, timeout_sec=0.05)
print(len(got))
'''

PUBLISHER = '''
import sys, time, numpy as np, rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node('dds_bench_pub')
pub = node.create_publisher(Image, 'dds_bench', qos_profile_sensor_data)
w, h, n, hz = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 20
while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)
msg = Image(width=w, height=h, encoding='rgb8', step=3 * w)
msg.data = np.random.default_rng(0).integers(0, 256, h * w * 3, dtype=np.uint8).tobytes()
for _ in range(n):
    pub.publish(msg)
    time.sleep(1.0 / hz)
'''


def run(width: int, height: int, frames: int, hz: float, profile: bool) -> int:
    env = {**os.environ, 'ROS_DOMAIN_ID': str(random.randint(150, 230)), 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'}
    for var in ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_BUILTIN_TRANSPORTS'):
        env.pop(var, None)
    if profile:
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(PROFILE)
    seconds = 3.0 + frames / hz + 2.0
    sub = subprocess.Popen([sys.executable, '-c', SUBSCRIBER, str(seconds)], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run([sys.executable, '-c', PUBLISHER, str(width), str(height), str(frames), str(hz)], env=env,
                   check=True, timeout=60)
    out, _ = sub.communicate(timeout=60)
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frames', type=int, default=20)
    parser.add_argument('--hz', type=float, default=30.0)
    parser.add_argument('--sizes', default='640x480,1280x720,1920x1080')
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(','):
        w, h = (int(v) for v in size.split('x'))
        for profile in (False, True):
            rows.append({'size': size, 'config': PROFILE.name if profile else 'Fast DDS defaults',
                         'sent': args.frames, 'received': run(w, h, args.frames, args.hz, profile)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({'benchmark': 'dds_large_images', 'hz': args.hz, 'rows': rows}, indent=2))


if __name__ == '__main__':
    main()
