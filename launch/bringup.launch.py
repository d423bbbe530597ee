"""ros2 launch worldvla bringup.launch.py [checkpoint:=DIR] [use_sim:=true|libero] [namespace:=robot1] …

Starts the action node and (by default) the world-model node in their own processes, optionally
a sim as the robot (the tabletop sim, or a LIBERO task: ``use_sim:=libero libero_suite:=libero_goal
libero_task:=3``; LIBERO owns /clock and the other nodes follow it) and rviz2. Which nodes start, with
which parameters and remaps, is decided by ``worldvla_ros.launch_plan``, the plan ``worldvla_bringup`` follows too:

- parameter files apply under any namespace (a section keyed by the bare node name applies to that
  node wherever it runs; ``/robot1/worldvla_action`` only there), later files win, arguments last;
- optional parts are checked before anything starts: ``use_rviz:=true`` without rviz2 installed
  starts nothing and says why;
- every node is required: when one exits the launch shuts the others down, so a failed start or
  a crash never leaves half a graph commanding the robot (closing rviz ends the launch as well);
  a node that fails (non-zero exit), a failed configure or a refused start ends ``ros2 launch`` with a
  non-zero exit and one line saying why; Ctrl-C ends it with 0;
- the action node is a managed (lifecycle) node: this launch configures it (loads and warms up the
  model) and, once inactive, activates it through launch_ros lifecycle events; a configure that
  fails ends the launch. ``autostart:=false`` leaves it unconfigured for your lifecycle manager;
- included under ``PushRosNamespace``, the pushed namespace comes first (``/site/robot1/…``).

``ros2 launch worldvla bringup.launch.py --show-args`` lists the arguments.
"""
import os
import shutil

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnShutdown
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from launch import LaunchDescription
from worldvla_ros.launch_actions import LaunchRefused, refuse, required

SHARE = get_package_share_directory('worldvla')
ARGUMENTS = {
    'checkpoint': (os.path.join(SHARE, 'models', 'tabletop'),
                   'WorldVLA checkpoint directory (default: the bundled tabletop model)'),
    'device': ('auto', 'torch device of both model nodes: auto, cpu, cuda, cuda:N'),
    'config': (os.path.join(SHARE, 'config', 'worldvla.yaml'),
               'parameter file; sections keyed by the bare node name apply in any namespace'),
    'namespace': ('', 'namespace of every node (e.g. robot1)'),
    'camera_topic': ('camera/image_raw', 'camera topic (its /compressed sibling is remapped with it)'),
    'instruction_topic': ('instruction', 'instruction topic (std_msgs/String)'),
    'use_world_model': ('true', 'also start the world-model node (imagined frames, surprise)'),
    'use_rviz': ('false', 'also start rviz2 with config/worldvla.rviz (must be installed)'),
    'use_sim': ('false', 'a sim as the robot: true (the tabletop sim, config/tabletop_sim.yaml after config) or '
                         'libero (a LIBERO task, config/libero_sim.yaml; needs scripts/install.sh --libero)'),
    'libero_suite': ('libero_object', 'use_sim:=libero: libero_spatial, libero_object, libero_goal, libero_10, …'),
    'libero_task': ('0', 'use_sim:=libero: the task index in the suite'),
    'libero_episodes': ('0', 'use_sim:=libero: episodes (initial states 0, 1, …) before the sim idles; 0: no end'),
    'use_sim_time': ('false', 'every node follows /clock, e.g. beside `ros2 bag play --clock`'),
    'enabled': ('', 'true: execute commands; false: dry run; empty: as the parameter files say '
                    '(worldvla.yaml: false; with the sim: true)'),
    'autostart': ('true', 'configure and activate the action node (a lifecycle node) through lifecycle events; '
                          'false: it waits unconfigured for your lifecycle manager (change_state service)'),
}


def _flag(text: str) -> bool:
    return text.strip().lower() in ('true', '1', 'yes', 'on')


def _setup(context):
    from pathlib import Path

    from worldvla_ros.launch_plan import (
        BringupOptions,
        missing_packages,
        normalize_namespace,
        parameter_directory,
        plan,
        rviz_config,
    )

    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    use_rviz = _flag(arg['use_rviz'])
    missing = missing_packages(['rviz2'] if use_rviz else [])
    if missing:
        raise LaunchRefused(f'[worldvla] nothing started: {", ".join(missing)} is not installed '
                            '(apt install ros-$ROS_DISTRO-rviz2, or use_rviz:=false)')
    pushed = context.launch_configurations.get('ros_namespace', '')  # from a launch file including this one
    sim = 'libero' if arg['use_sim'].strip().lower() == 'libero' else 'tabletop'
    sim_extra = {}
    if sim == 'libero':
        if not arg['libero_task'].strip().isdigit() or not arg['libero_episodes'].strip().isdigit():
            raise LaunchRefused('[worldvla] nothing started: libero_task and libero_episodes are whole numbers ≥ 0')
        sim_extra = {'suite': arg['libero_suite'], 'task': int(arg['libero_task']),
                     'episodes': int(arg['libero_episodes'])}
    options = BringupOptions(
        checkpoint=arg['checkpoint'], configs=(Path(arg['config']),), device=arg['device'],
        namespace=normalize_namespace(pushed, arg['namespace']), camera_topic=arg['camera_topic'],
        instruction_topic=arg['instruction_topic'], use_world_model=_flag(arg['use_world_model']),
        use_sim=sim == 'libero' or _flag(arg['use_sim']), sim=sim,
        sim_config=Path(SHARE, 'config', f'{sim}_sim.yaml'), sim_extra=sim_extra,
        use_sim_time=_flag(arg['use_sim_time']),
        enabled=_flag(arg['enabled']) if arg['enabled'].strip() else None, autostart=_flag(arg['autostart']))
    directory = parameter_directory()
    specs = plan(options)
    # relative: launch_ros puts a pushed namespace (PushRosNamespace) in front of it; an absolute one it keeps as is
    namespace = normalize_namespace(arg['namespace']).lstrip('/') or None
    stopping = {'now': False}
    actions = [RegisterEventHandler(OnShutdown(on_shutdown=lambda *_: shutil.rmtree(directory, ignore_errors=True)))]
    for spec in specs:
        kind = LifecycleNode if spec.lifecycle else Node
        node = kind(package='worldvla', executable=spec.executable, name=spec.name, namespace=namespace or '',
                    output='screen', parameters=[str(spec.write_parameters(directory))],
                    remappings=list(spec.remaps.items()), on_exit=required(spec.name, stopping))
        actions.append(node)
        if spec.lifecycle and options.autostart:
            actions += _bring_to_active(node, spec.name, stopping)
    if use_rviz:
        frame = specs[0].parameters.get('command_frame_id', 'ee_delta')
        rviz = rviz_config(Path(SHARE, 'config', 'worldvla.rviz'), options.namespace, specs[0].remaps, directory,
                           fixed_frame=frame)
        actions.append(Node(package='rviz2', executable='rviz2', name='rviz2', namespace=namespace,
                            arguments=['-d', str(rviz)], on_exit=required('rviz2', stopping)))
    return actions


def _bring_to_active(node: LifecycleNode, name: str, stopping: dict) -> list:
    """Configure now; activate once inactive; a configure that fails (or errors) fails the launch."""
    def change(transition: int) -> EmitEvent:
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition))

    def on(start: str, goal: str | None, entities: list) -> RegisterEventHandler:
        return RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state=start, goal_state=goal,
                                                      entities=entities))

    return [
        on('configuring', 'inactive', [LogInfo(msg=f'[worldvla] {name} configured: activating'),
                                       change(Transition.TRANSITION_ACTIVATE)]),
        on('configuring', 'unconfigured', [refuse(f'[worldvla] {name} could not be configured (its log above says '
                                                  'why)', stopping)]),
        on('errorprocessing', None, [refuse(f'[worldvla] {name} raised in a lifecycle transition', stopping)]),
        change(Transition.TRANSITION_CONFIGURE),
    ]


def generate_launch_description() -> LaunchDescription:
    args = [DeclareLaunchArgument(name, default_value=default, description=description)
            for name, (default, description) in ARGUMENTS.items()]
    return LaunchDescription([*args, OpaqueFunction(function=_setup)])
