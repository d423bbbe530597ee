"""Start the worldvla nodes without ``ros2 launch``: same executables, same YAML, same arguments.

    worldvla_bringup [--checkpoint DIR] [--device cuda] [--config config/worldvla.yaml]
    worldvla_bringup --demo 120 --episodes 5   # + the tabletop sim; prints what flows and task success

Without ``--checkpoint`` the bundled tabletop model (trained on the sim) is used.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODES = {'action_node': 'worldvla_action', 'world_model_node': 'worldvla_world_model', 'sim_node': 'worldvla_sim'}


def installed_config(name: str) -> Path:
    """config/NAME from the ROS prefix (share/worldvla/config), else from the source tree."""
    for candidate in (Path(sys.prefix) / 'share' / 'worldvla' / 'config' / name, REPO / 'config' / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f'config/{name} not found')


def default_config() -> Path:
    return installed_config('worldvla.yaml')


def sim_config() -> Path:
    """The overrides for the tabletop sim as the robot, applied after the default config."""
    return installed_config('tabletop_sim.yaml')


def node_command(executable: str, config: Path | Sequence[Path], params: dict[str, str], namespace: str = '',
                 remaps: dict[str, str] | None = None) -> list[str]:
    """The command line launch_ros would run for this node; later parameter files override earlier ones."""
    installed = Path(sys.prefix) / 'lib' / 'worldvla' / executable
    cmd = [sys.executable, str(installed)] if installed.is_file() else [
        sys.executable, '-m', f'worldvla_ros.nodes.{executable}']
    cmd += ['--ros-args', '-r', f'__node:={NODES[executable]}']
    for path in [config] if isinstance(config, (str, Path)) else config:
        cmd += ['--params-file', str(path)]
    if namespace:
        cmd += ['-r', f'__ns:=/{namespace.strip("/")}']
    for src, dst in (remaps or {}).items():
        cmd += ['-r', f'{src}:={dst}']
    for key, value in params.items():
        cmd += ['-p', f'{key}:={value}']
    return cmd


def start_nodes(checkpoint: str, config: Path | Sequence[Path], device: str = 'auto', namespace: str = '',
                use_world_model: bool = True, extra: dict[str, str] | None = None,
                remaps: dict[str, str] | None = None, use_sim: bool = False,
                sim_params: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """The action node, the world-model node and the sim, each in its own process (in that order)."""
    env = dict(os.environ)
    if device in ('cpu', 'auto'):
        env.setdefault('OMP_NUM_THREADS', '1')  # two torch processes on a small CPU share it fairly
    params = {'checkpoint': checkpoint, 'device': device, **(extra or {})}
    names = ['action_node'] + (['world_model_node'] if use_world_model else [])
    procs = [subprocess.Popen(node_command(n, config, params, namespace, remaps), env=env) for n in names]
    if use_sim:
        procs.append(subprocess.Popen(node_command('sim_node', config, sim_params or {}, namespace, remaps), env=env))
    return procs


def default_checkpoint() -> str:
    from worldvla_ros.sim.bundled import bundled_checkpoint

    return str(bundled_checkpoint())


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


def run_demo(seconds: float, episodes: int) -> int:
    """Watch the sim, the action node and the world model work; print flow and task success."""
    import json

    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64MultiArray, String
    from worldvla.msg import ActionChunk, EndEffectorCommand

    from worldvla_ros.nodes.common import reliable_qos

    rclpy.init()
    node = rclpy.create_node('worldvla_demo')
    seen = {'chunks': 0, 'commands': 0, 'holds': 0, 'imagined': 0, 'scored': 0}
    last: dict[str, object] = {}
    results: list[dict] = []

    def on_chunk(m: ActionChunk) -> None:
        seen['chunks'] += 1
        last['latency'] = m.inference_latency

    def on_cmd(m: EndEffectorCommand) -> None:
        seen['holds' if m.hold else 'commands'] += 1
        last['cmd'] = np.round(np.asarray(m.action), 2).tolist()

    def on_result(m: String) -> None:
        r = json.loads(m.data)
        results.append(r)
        print(f'[demo] episode {r["episode"]} "{r["instruction"]}": {"SUCCESS" if r["success"] else "failed"} '
              f'in {r["steps"]} steps (success rate {r["success_rate"]:.0%} over {r["episodes_done"]})', flush=True)

    node.create_subscription(ActionChunk, 'worldvla/action_chunk', on_chunk, reliable_qos())
    node.create_subscription(EndEffectorCommand, 'worldvla/ee_command', on_cmd, reliable_qos(50))
    node.create_subscription(String, 'sim/episode_result', on_result, reliable_qos(50))
    node.create_subscription(Image, 'worldvla/imagined_image', lambda m: seen.__setitem__(
        'imagined', seen['imagined'] + 1), reliable_qos())
    node.create_subscription(Float64MultiArray, 'worldvla/surprise', lambda m: (
        seen.__setitem__('scored', seen['scored'] + 1), last.__setitem__('surprise', list(m.data))), reliable_qos())
    start = next_print = time.monotonic()
    try:
        while time.monotonic() - start < seconds and len(results) < episodes:
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
    wins = sum(r['success'] for r in results)
    print(f'[demo] {"OK" if ok else "FAILED"}: {seen}', flush=True)
    print(f'[demo] task success: {wins} of {len(results)} episodes', flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default='', help='default: the bundled tabletop model')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--config', type=Path, default=None)
    parser.add_argument('--namespace', default='')
    parser.add_argument('--camera-topic', default='')
    parser.add_argument('--instruction-topic', default='')
    parser.add_argument('--no-world-model', action='store_true')
    parser.add_argument('--use-sim-time', action='store_true', help='follow /clock (e.g. ros2 bag play --clock)')
    parser.add_argument('--sim', action='store_true', help='also start the tabletop sim as the robot')
    parser.add_argument('--demo', type=float, default=0.0, metavar='SECONDS',
                        help='run the sim and print what flows and the task success, for at most this long')
    parser.add_argument('--episodes', type=int, default=5, help='with --demo: stop after this many episodes')
    args = parser.parse_args(argv)
    config = args.config or default_config()
    try:
        checkpoint = args.checkpoint or default_checkpoint()
    except FileNotFoundError as exc:
        parser.error(str(exc))
    use_sim = args.sim or bool(args.demo)
    configs = [config, sim_config()] if use_sim else [config]
    if use_sim:
        print(f'[bringup] sim + action node{"" if args.no_world_model else " + world-model node"} on {checkpoint}',
              flush=True)
    remaps = {}
    if args.camera_topic:
        remaps['camera/image_raw'] = args.camera_topic
    if args.instruction_topic:
        remaps['instruction'] = args.instruction_topic
    extra = {'use_sim_time': 'true'} if args.use_sim_time else {}
    procs = start_nodes(checkpoint, configs, args.device, args.namespace, not args.no_world_model, extra, remaps,
                        use_sim=use_sim, sim_params=extra)
    try:
        if args.demo:
            code = run_demo(args.demo, args.episodes)
        else:
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            code = max(p.returncode or 0 for p in procs)
    except KeyboardInterrupt:
        code = 0
    finally:
        codes = stop_nodes(procs)
    failed = [(p, c) for p, c in zip(procs, codes, strict=True) if c not in (0, -signal.SIGINT)]
    for p, c in failed:
        print(f'[bringup] {" ".join(map(str, p.args[:4]))} … exited with code {c}', file=sys.stderr, flush=True)
    return code or (1 if failed else 0)


if __name__ == '__main__':
    raise SystemExit(main())
