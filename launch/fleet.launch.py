"""ros2 launch worldvla fleet.launch.py robots:=arm1,arm2,arm3 [checkpoint:=DIR] [device:=cuda] [use_sim:=true] …

One process serving several robots with one model (``fleet_node``): an action node in each robot
namespace (its own camera, instruction, task action, e-stop, watchdog, limits and outputs), the
robots' chunks decoded together. Each robot's parameters come from ``config`` (sections keyed by the
bare node name apply to every robot, ``/arm2/worldvla_action`` only there), then the arguments. Every
action node configures and activates itself (``autostart``). ``use_sim:=true`` gives every robot a
tabletop sim of its own in its namespace (each robot's goals end on its own ``sim/success``): the way
to try a fleet without robots. Every process is required: when one ends, the launch ends; a process that
fails, or robot names that are not ROS names, end ``ros2 launch`` with a non-zero exit and one line saying
why. More robots than one GPU serves: one fleet launch per machine.
"""
import os
import re
import shutil
import tempfile

import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnShutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from worldvla_ros.launch_actions import LaunchRefused, required

SHARE = get_package_share_directory('worldvla')
ARGUMENTS = {
    'robots': ('robot1,robot2', 'comma-separated robot namespaces; one action node in each, one shared model'),
    'checkpoint': (os.path.join(SHARE, 'models', 'tabletop'),
                   'WorldVLA checkpoint directory (default: the bundled tabletop model)'),
    'device': ('auto', 'torch device of the shared model: auto, cpu, cuda, cuda:N'),
    'config': (os.path.join(SHARE, 'config', 'worldvla.yaml'),
               'parameter file; sections keyed by the bare node name apply to every robot'),
    'enabled': ('', 'true: execute commands; false: dry run; empty: as the parameter file says'),
    'max_batch_wait_ms': ('5.0', 'after one robot asks for a chunk, how long to wait for the others'),
    'use_sim': ('false', 'a tabletop sim as each robot (loads config/tabletop_sim.yaml after config)'),
}
ROS_NAME = re.compile(r'[A-Za-z][A-Za-z0-9_]*')


def robot_namespaces(text: str) -> list[str]:
    """``arm1,arm2`` → ['/arm1', '/arm2']; LaunchRefused for names ROS does not take or given twice."""
    from worldvla_ros.launch_plan import normalize_namespace

    robots = [normalize_namespace(r) for r in text.split(',') if r.strip()]
    bad = [r for r in robots if not all(ROS_NAME.fullmatch(part) for part in r.strip('/').split('/'))]
    if not robots or bad or len(set(robots)) != len(robots):
        raise LaunchRefused(f'[worldvla] robots:={text!r}: distinct ROS names needed (letters, digits and _, not '
                            f'starting with a digit){": " + ", ".join(bad) if bad else ""}')
    return robots


def _setup(context):
    from worldvla_ros.launch_plan import node_parameters

    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    robots = robot_namespaces(arg['robots'])
    use_sim = arg['use_sim'].strip().lower() in ('true', '1', 'yes', 'on')
    configs = [arg['config']] + ([os.path.join(SHARE, 'config', 'tabletop_sim.yaml')] if use_sim else [])
    sections = {'worldvla_fleet': {'ros__parameters': {
        'robots': robots, 'max_batch_wait_ms': float(arg['max_batch_wait_ms'])}}}
    for robot in robots:
        values = node_parameters(configs, 'worldvla_action', robot)
        values.update(checkpoint=arg['checkpoint'], device=arg['device'], autostart=True)
        if arg['enabled'].strip():
            values['enabled'] = arg['enabled'].strip().lower() in ('true', '1', 'yes', 'on')
        sections[f'{robot}/worldvla_action'] = {'ros__parameters': values}
        if use_sim:
            sections[f'{robot}/worldvla_sim'] = {'ros__parameters': node_parameters(configs, 'worldvla_sim', robot)}
    directory = tempfile.mkdtemp(prefix='worldvla-fleet-')
    path = os.path.join(directory, 'fleet.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(sections, f)
    stopping = {'now': False}
    # no name or namespace on the fleet process: a remap of either would apply to every node in it
    actions = [RegisterEventHandler(OnShutdown(on_shutdown=lambda *_: shutil.rmtree(directory, ignore_errors=True))),
               Node(package='worldvla', executable='fleet_node', output='screen', parameters=[path],
                    on_exit=required('fleet_node', stopping))]
    for robot in robots if use_sim else []:
        actions.append(Node(package='worldvla', executable='sim_node', name='worldvla_sim',
                            namespace=robot.lstrip('/'), output='screen', parameters=[path],
                            on_exit=required(f'{robot}/worldvla_sim', stopping)))
    return actions


def generate_launch_description() -> LaunchDescription:
    args = [DeclareLaunchArgument(name, default_value=default, description=description)
            for name, (default, description) in ARGUMENTS.items()]
    return LaunchDescription([*args, OpaqueFunction(function=_setup)])
