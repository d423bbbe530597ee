"""ros2 launch worldvla fleet.launch.py robots:=arm1,arm2,arm3 [checkpoint:=DIR] [device:=cuda] …

One process serving several robots with one model (``fleet_node``): an action node in each robot
namespace (its own camera, instruction, task action, e-stop, watchdog, limits and outputs), the
robots' chunks decoded together. Each robot's parameters come from ``config`` (sections keyed by the
bare node name apply to every robot, ``/arm2/worldvla_action`` only there), then the arguments. Every
action node configures and activates itself (``autostart``); the process is required: when it ends,
the launch ends. More robots than one GPU serves: one fleet launch per machine.
"""
import os
import tempfile

import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

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
}


def _setup(context):
    from worldvla_ros.launch_plan import node_parameters, normalize_namespace

    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    robots = [normalize_namespace(r) for r in arg['robots'].split(',') if r.strip()]
    sections = {'worldvla_fleet': {'ros__parameters': {
        'robots': robots, 'max_batch_wait_ms': float(arg['max_batch_wait_ms'])}}}
    for robot in robots:
        values = node_parameters([arg['config']], 'worldvla_action', robot)
        values.update(checkpoint=arg['checkpoint'], device=arg['device'], autostart=True)
        if arg['enabled'].strip():
            values['enabled'] = arg['enabled'].strip().lower() in ('true', '1', 'yes', 'on')
        sections[f'{robot}/worldvla_action'] = {'ros__parameters': values}
    path = os.path.join(tempfile.mkdtemp(prefix='worldvla-fleet-'), 'fleet.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(sections, f)
    # no name or namespace here: a remap of either would apply to every node of the process
    return [Node(package='worldvla', executable='fleet_node', output='screen', parameters=[path],
                 on_exit=Shutdown(reason='fleet_node exited'))]


def generate_launch_description() -> LaunchDescription:
    args = [DeclareLaunchArgument(name, default_value=default, description=description)
            for name, (default, description) in ARGUMENTS.items()]
    return LaunchDescription([*args, OpaqueFunction(function=_setup)])
