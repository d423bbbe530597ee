"""Start the worldvla nodes without ``ros2 launch``: same executables, same YAML, same arguments.

    worldvla_bringup --checkpoint DIR [--device cpu] [--config config/worldvla.yaml]
    worldvla_bringup --demo 30          # + a synthetic camera and an instruction, prints what flows

``--demo`` without ``--checkpoint`` writes a tiny random checkpoint first (until the bundled
trained model lands), so the whole graph can be seen working on a fresh machine.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODES = {'action_node': 'worldvla_action', 'world_model_node': 'worldvla_world_model'}


def default_config() -> Path:
    for candidate in (Path(sys.prefix) / 'share' / 'worldvla' / 'config' / 'worldvla.yaml',
                      REPO / 'config' / 'worldvla.yaml'):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError('config/worldvla.yaml not found')


def node_command(executable: str, config: Path, params: dict[str, str], namespace: str = '',
                 remaps: dict[str, str] | None = None) -> list[str]:
    """The command line launch_ros would run for this node."""
    installed = Path(sys.prefix) / 'lib' / 'worldvla' / executable
    cmd = [sys.executable, str(installed)] if installed.is_file() else [
        sys.executable, '-m', f'worldvla_ros.nodes.{executable}']
    cmd += ['--ros-args', '-r', f'__node:={NODES[executable]}', '--params-file', str(config)]
    if namespace:
        cmd += ['-r', f'__ns:=/{namespace.strip("/")}']
    for src, dst in (remaps or {}).items():
        cmd += ['-r', f'{src}:={dst}']
    for key, value in params.items():
        cmd += ['-p', f'{key}:={value}']
    return cmd


def start_nodes(checkpoint: str, config: Path, device: str = 'auto', namespace: str = '',
                use_world_model: bool = True, extra: dict[str, str] | None = None,
                remaps: dict[str, str] | None = None) -> list[subprocess.Popen]:
    env = dict(os.environ)
    if device in ('cpu', 'auto'):
        env.setdefault('OMP_NUM_THREADS', '1')  # two torch processes on a small CPU share it fairly
    params = {'checkpoint': checkpoint, 'device': device, **(extra or {})}
    names = ['action_node'] + (['world_model_node'] if use_world_model else [])
    return [subprocess.Popen(node_command(n, config, params, namespace, remaps), env=env) for n in names]


def stop_nodes(procs: list[subprocess.Popen], timeout: float = 10.0) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def run_demo(seconds: float, instruction: str) -> int:
    """A synthetic camera + instruction; print commands and imagined frames as they flow."""
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64MultiArray, String
    from worldvla.msg import ActionChunk, EndEffectorCommand

    from worldvla_ros.image_conversion import fill_image_msg
    from worldvla_ros.nodes.common import latched_qos, reliable_qos
    from worldvla_ros.synthetic import SyntheticCamera

    rclpy.init()
    node = rclpy.create_node('worldvla_demo')
    cam = SyntheticCamera(seed=0)
    image_pub = node.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
    node.create_publisher(String, 'instruction', latched_qos()).publish(String(data=instruction))
    seen = {'chunks': 0, 'commands': 0, 'holds': 0, 'imagined': 0, 'scored': 0}
    last: dict[str, object] = {}

    def on_chunk(m: ActionChunk) -> None:
        seen['chunks'] += 1
        last['latency'] = m.inference_latency

    def on_cmd(m: EndEffectorCommand) -> None:
        seen['holds' if m.hold else 'commands'] += 1
        last['cmd'] = np.round(np.asarray(m.action), 3).tolist()

    node.create_subscription(ActionChunk, 'worldvla/action_chunk', on_chunk, reliable_qos())
    node.create_subscription(EndEffectorCommand, 'worldvla/ee_command', on_cmd, reliable_qos(50))
    node.create_subscription(Image, 'worldvla/imagined_image', lambda m: seen.__setitem__(
        'imagined', seen['imagined'] + 1), reliable_qos())
    node.create_subscription(Float64MultiArray, 'worldvla/surprise', lambda m: (
        seen.__setitem__('scored', seen['scored'] + 1), last.__setitem__('surprise', list(m.data))), reliable_qos())

    def publish_frame() -> None:
        msg = fill_image_msg(Image(), cam.step(np.asarray(last.get('cmd', np.zeros(7)))))
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = 'camera'
        image_pub.publish(msg)

    node.create_timer(0.1, publish_frame)
    start = next_print = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            rclpy.spin_once(node, timeout_sec=0.05)
            if time.monotonic() >= next_print:
                next_print += 2.0
                lat = last.get('latency')
                sur = last.get('surprise')
                print(f'[demo {time.monotonic() - start:5.1f}s] chunks {seen["chunks"]}  commands {seen["commands"]}'
                      f'  holds {seen["holds"]}  imagined {seen["imagined"]}  scored {seen["scored"]}'
                      + (f'  latency {lat * 1e3:.0f} ms' if lat else '')
                      + (f'  last cmd {last["cmd"]}' if 'cmd' in last else '')
                      + (f'  surprise psnr {sur[1]:.1f} dB ssim {sur[2]:.2f}' if sur else ''), flush=True)
    finally:
        node.destroy_node()
        rclpy.shutdown()
    ok = seen['chunks'] > 0 and seen['commands'] > 0 and seen['imagined'] > 0
    print(f'[demo] {"OK" if ok else "FAILED"}: {seen}', flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default='')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--config', type=Path, default=None)
    parser.add_argument('--namespace', default='')
    parser.add_argument('--camera-topic', default='')
    parser.add_argument('--instruction-topic', default='')
    parser.add_argument('--no-world-model', action='store_true')
    parser.add_argument('--demo', type=float, default=0.0, metavar='SECONDS',
                        help='also run a synthetic camera and instruction for this long, then stop')
    parser.add_argument('--instruction', default='pick up the red block and place it in the bowl')
    args = parser.parse_args(argv)
    config = args.config or default_config()
    checkpoint = args.checkpoint
    extra = {}
    if not checkpoint:
        if not args.demo:
            parser.error('--checkpoint is required (or --demo to run on a tiny random checkpoint)')
        from worldvla_ros.model import make_tiny_checkpoint

        checkpoint = str(make_tiny_checkpoint(REPO / 'artifacts' / 'tiny_checkpoint'))
        extra = {'enabled': 'true', 'max_obs_age': '5.0', 'watchdog_timeout': '5.0'}
        print(f'[demo] no --checkpoint: using a tiny RANDOM checkpoint at {checkpoint} '
              '(actions are meaningless; this shows the plumbing)', flush=True)
    remaps = {}
    if args.camera_topic:
        remaps['camera/image_raw'] = args.camera_topic
    if args.instruction_topic:
        remaps['instruction'] = args.instruction_topic
    procs = start_nodes(checkpoint, config, args.device, args.namespace, not args.no_world_model, extra, remaps)
    try:
        if args.demo:
            code = run_demo(args.demo, args.instruction)
        else:
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            code = max(p.returncode or 0 for p in procs)
    except KeyboardInterrupt:
        code = 0
    finally:
        codes = stop_nodes(procs)
    failed = [c for c in codes if c not in (0, -signal.SIGINT)]
    return code or (1 if failed else 0)


if __name__ == '__main__':
    raise SystemExit(main())
