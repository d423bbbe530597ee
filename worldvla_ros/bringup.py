"""Start the worldvla nodes without ``ros2 launch``: same executables, same YAML, same arguments.

    worldvla_bringup [--checkpoint DIR] [--device cuda] [--config config/worldvla.yaml]
    worldvla_bringup --demo 120 --episodes 5   # + the tabletop sim; prints what flows and task success

Without ``--checkpoint`` the bundled tabletop model (trained on the sim) is used. The action node is a
managed (lifecycle) node: as ``ros2 launch`` does, this configures it and then activates it through
its ``change_state`` service, and stops everything when that fails (``--no-autostart``: left to
your lifecycle manager).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from worldvla_ros.launch_plan import (
    BringupOptions,
    NodeSpec,
    parameter_directory,
    parse_value,
    plan,
)

REPO = Path(__file__).resolve().parent.parent


def installed_config(name: str) -> Path:
    """config/NAME from the ROS prefix (share/worldvla/config), else from the source tree."""
    for candidate in (Path(sys.prefix) / 'share' / 'worldvla' / 'config' / name, REPO / 'config' / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f'config/{name} not found')


def default_config() -> Path:
    return installed_config('worldvla.yaml')


def sim_config(sim: str = 'tabletop') -> Path:
    """The overrides for a sim as the robot (tabletop, libero), applied after the default config."""
    return installed_config(f'{sim}_sim.yaml')


def node_command(spec: NodeSpec, parameter_dir: Path) -> list[str]:
    """The command line launch_ros would run for this node (one parameter file, keyed by its name)."""
    installed = Path(sys.prefix) / 'lib' / 'worldvla' / spec.executable
    cmd = [str(installed)] if os.access(installed, os.X_OK) else [
        sys.executable, '-m', f'worldvla_ros.nodes.{spec.executable}']
    cmd += ['--ros-args', '-r', f'__node:={spec.name}']
    if spec.namespace:
        cmd += ['-r', f'__ns:={spec.namespace}']
    cmd += ['--params-file', str(spec.write_parameters(parameter_dir))]
    for src, dst in spec.remaps.items():
        cmd += ['-r', f'{src}:={dst}']
    return cmd


def start_nodes(checkpoint: str, config: Path | Sequence[Path], device: str = 'auto', namespace: str = '',
                use_world_model: bool = True, extra: dict[str, str] | None = None, use_sim: bool = False,
                sim_params: dict[str, str] | None = None, camera_topic: str = '',
                instruction_topic: str = '', env: dict[str, str] | None = None,
                autostart: bool = True, activate_timeout: float = 900.0, sim: str = 'tabletop'
                ) -> list[subprocess.Popen]:
    """The action node, the world-model node and the sim, each in its own process (in that order); with
    ``autostart`` the action node is configured and activated before this returns (BringupError if not).

    ``extra`` and ``sim_params`` are ``-p``-style strings (``'true'``, ``'20.0'``, ``'[0.1, …]'``).
    """
    configs = (config,) if isinstance(config, (str, Path)) else tuple(config)
    options = BringupOptions(
        checkpoint=checkpoint, configs=tuple(Path(c) for c in configs), device=device, namespace=namespace,
        camera_topic=camera_topic, instruction_topic=instruction_topic,
        use_world_model=use_world_model, use_sim=use_sim, sim=sim, autostart=autostart,
        extra={k: parse_value(v) for k, v in (extra or {}).items()},
        sim_extra={k: parse_value(v) for k, v in (sim_params or {}).items()})
    env = {**os.environ, **(env or {})}
    if device in ('cpu', 'auto'):
        env.setdefault('OMP_NUM_THREADS', '1')  # two torch processes on a small CPU share it fairly
    directory = parameter_directory()
    specs = plan(options)
    procs = [subprocess.Popen(node_command(spec, directory), env=env) for spec in specs]
    for proc in procs:
        proc.worldvla_parameter_directory = directory  # removed by stop_nodes
    try:
        for spec in specs if autostart else []:
            running = {s.fqn: proc for s, proc in zip(specs, procs, strict=True)}
            ros_env = {k: v for k, v in env.items() if k.startswith('ROS_')}  # the nodes' domain and discovery
            why = bring_to_active(spec.fqn, running, activate_timeout, ros_env) if spec.lifecycle else None
            if why:
                raise BringupError(f'{spec.fqn} did not become active: {why}')
    except BaseException:  # a failed transition, Ctrl-C while loading: never leave the other nodes running
        stop_nodes(procs)
        raise
    return procs


class BringupError(RuntimeError):
    """A managed node could not be brought to active; every node was stopped."""


def bring_to_active(node_name: str, procs: dict[str, subprocess.Popen], timeout: float = 900.0,
                    ros_env: dict[str, str] | None = None) -> str | None:
    """Configure, then activate, a lifecycle node through its ``change_state`` service, as launch_ros
    lifecycle events do; None when active, else why not (a transition refused, one of ``procs`` (by node
    name) ended, timeout). ``ros_env``: the nodes' ROS_* variables (a domain of their own, discovery range)."""
    import rclpy
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    context = rclpy.Context()  # its own: the caller may have rclpy initialized, or not
    saved = {k: os.environ.get(k) for k in ros_env or {}}
    os.environ.update(ros_env or {})  # read by rcl as the context starts
    try:
        rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    node = rclpy.create_node('worldvla_bringup_lifecycle', context=context, start_parameter_services=False)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    client = node.create_client(ChangeState, f'{node_name}/change_state')
    start = time.monotonic()
    deadline = start + timeout

    def wait(done: Callable[[], bool], until: float) -> str | None:
        """None once done; why not: a process that ended, or '' at ``until``."""
        while not done():
            ended = [(name, p.returncode) for name, p in procs.items() if p.poll() is not None]
            if ended:
                return f'{ended[0][0]} exited with code {ended[0][1]}'
            if time.monotonic() > until:
                return ''
            executor.spin_once(timeout_sec=0.1)
        return None

    try:
        # the service is up as soon as the process has imported its modules; loading the model takes longer
        why = wait(client.service_is_ready, min(deadline, start + 120.0))
        if why is not None:
            return why or f'no {node_name}/change_state service within 120 s (another ROS domain?)'
        for transition, label in ((Transition.TRANSITION_CONFIGURE, 'configure'),
                                  (Transition.TRANSITION_ACTIVATE, 'activate')):
            future = client.call_async(ChangeState.Request(transition=Transition(id=transition)))
            why = wait(future.done, deadline)
            if why is not None:
                return why or f'{label}: no answer within {timeout:g} s'
            if not future.result().success:
                return f'{label} failed (the node\'s log says why)'
        return None
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


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
    import shutil

    for directory in {getattr(p, 'worldvla_parameter_directory', None) for p in procs} - {None}:
        shutil.rmtree(directory, ignore_errors=True)  # the generated parameter files go with the nodes
    return codes


def run_demo(seconds: float, episodes: int, namespace: str = '') -> int:
    """Watch the sim, the action node and the world model work; print flow and task success."""
    import json

    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64MultiArray, String
    from worldvla.msg import ActionChunk, EndEffectorCommand

    from worldvla_ros.nodes.common import reliable_qos

    rclpy.init()
    node = rclpy.create_node('worldvla_demo', namespace=namespace or None)
    seen = {'chunks': 0, 'commands': 0, 'holds': 0, 'imagined': 0, 'scored': 0, 'monitored': 0, 'alarms': 0}
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
    def on_monitor(m: Float64MultiArray) -> None:  # [signals…, alarm, level]
        seen['monitored'] += 1
        seen['alarms'] += int(m.data[-2] > 0)
        last['level'] = int(m.data[-1])

    node.create_subscription(Float64MultiArray, 'worldvla/monitor', on_monitor, reliable_qos(50))
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
                      + (f'  surprise psnr {sur[1]:.1f} dB ssim {sur[2]:.2f}' if sur else '')
                      + (f'  monitor {seen["monitored"]} transitions, {seen["alarms"]} alarms, level '
                         f'{("OK", "WARN", "ERROR")[last["level"]]}' if 'level' in last else ''), flush=True)
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
    parser.add_argument('--config', type=Path, action='append', default=[],
                        help='parameter file (default: the installed config/worldvla.yaml); repeat it to layer '
                             'files, later ones win; sections keyed by the bare node name apply in any namespace')
    parser.add_argument('--namespace', default='')
    parser.add_argument('--camera-topic', default='', help='remap camera/image_raw (and its /compressed)')
    parser.add_argument('--instruction-topic', default='')
    parser.add_argument('--enabled', choices=('true', 'false'), default=None,
                        help='execute commands (false: dry run); default: as the parameter files say')
    parser.add_argument('--no-world-model', action='store_true')
    parser.add_argument('--no-autostart', action='store_true',
                        help='the action node waits unconfigured for a lifecycle manager (change_state service)')
    parser.add_argument('--use-sim-time', action='store_true', help='follow /clock (e.g. ros2 bag play --clock)')
    parser.add_argument('--sim', action='store_true', help='also start the tabletop sim as the robot')
    parser.add_argument('--demo', type=float, default=0.0, metavar='SECONDS',
                        help='run the sim and print what flows and the task success, for at most this long')
    parser.add_argument('--episodes', type=int, default=5, help='with --demo: stop after this many episodes')
    args = parser.parse_args(argv)
    missing = [str(c) for c in args.config if not c.is_file()]
    if missing:
        parser.error(f'no parameter file {", ".join(missing)}')
    configs = args.config or [default_config()]
    try:
        checkpoint = args.checkpoint or default_checkpoint()
    except FileNotFoundError as exc:
        parser.error(str(exc))
    use_sim = args.sim or bool(args.demo)
    if use_sim:
        configs = [*configs, sim_config()]
        print(f'[bringup] sim + action node{"" if args.no_world_model else " + world-model node"} on {checkpoint}',
              flush=True)
    extra = {'use_sim_time': 'true'} if args.use_sim_time else {}
    if args.enabled is not None:
        extra['enabled'] = args.enabled
    try:
        procs = start_nodes(checkpoint, configs, args.device, args.namespace, not args.no_world_model, extra,
                            use_sim=use_sim, sim_params={k: v for k, v in extra.items() if k == 'use_sim_time'},
                            camera_topic=args.camera_topic, instruction_topic=args.instruction_topic,
                            autostart=not args.no_autostart)
    except ValueError as exc:  # a parameter file that is not one
        parser.error(str(exc))
    except BringupError as exc:
        print(f'[bringup] {exc}; every node stopped', file=sys.stderr, flush=True)
        return 1
    try:
        if args.demo:
            code = run_demo(args.demo, args.episodes, args.namespace)
        else:
            while all(p.poll() is None for p in procs):  # one node ending ends them all: never half a graph
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
