"""ros2 launch worldvla bringup.launch.py [checkpoint:=/path/to/model_256/libero_goal] [use_sim:=true]
[use_sim_time:=true].

Starts the action node and (by default) the world-model node in their own processes,
parameters from config/worldvla.yaml, optionally the tabletop sim as the robot and rviz2 with
config/worldvla.rviz. The default checkpoint is the bundled tabletop model.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, GroupAction
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node, PushRosNamespace

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory('worldvla')
    checkpoint = LaunchConfiguration('checkpoint')
    device = LaunchConfiguration('device')
    config = LaunchConfiguration('config')
    sim_config = os.path.join(share, 'config', 'tabletop_sim.yaml')  # the sim's overrides, after `config`
    use_sim = LaunchConfiguration('use_sim')
    sim_time = {'use_sim_time': LaunchConfiguration('use_sim_time')}
    overrides = {'checkpoint': checkpoint, 'device': device, **sim_time}
    action_overrides = {**overrides, 'enabled': LaunchConfiguration('enabled')}
    camera_remap = ('camera/image_raw', LaunchConfiguration('camera_topic'))
    instruction_remap = ('instruction', LaunchConfiguration('instruction_topic'))

    args = [
        DeclareLaunchArgument('checkpoint', default_value=os.path.join(share, 'models', 'tabletop'),
                              description='WorldVLA checkpoint directory (default: the bundled tabletop model)'),
        DeclareLaunchArgument('device', default_value='auto', description='auto, cpu, cuda, cuda:N'),
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config', 'worldvla.yaml'),
                              description='parameter file'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of both nodes'),
        DeclareLaunchArgument('camera_topic', default_value='camera/image_raw'),
        DeclareLaunchArgument('instruction_topic', default_value='instruction'),
        DeclareLaunchArgument('use_world_model', default_value='true'),
        DeclareLaunchArgument('use_rviz', default_value='false'),
        DeclareLaunchArgument('use_sim', default_value='false', description='the tabletop sim as the robot'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='follow /clock, e.g. with `ros2 bag play --clock`'),
        DeclareLaunchArgument('enabled', default_value=use_sim,
                              description='execute commands (false: dry run); true by default with the sim'),
    ]
    nodes = GroupAction([
        PushRosNamespace(LaunchConfiguration('namespace')),
        Node(package='worldvla', executable='action_node', name='worldvla_action', output='screen',
             parameters=[config, action_overrides], remappings=[camera_remap, instruction_remap],
             condition=UnlessCondition(use_sim)),
        Node(package='worldvla', executable='action_node', name='worldvla_action', output='screen',
             parameters=[config, sim_config, action_overrides], remappings=[camera_remap, instruction_remap],
             condition=IfCondition(use_sim)),
        Node(package='worldvla', executable='world_model_node', name='worldvla_world_model', output='screen',
             parameters=[config, overrides], remappings=[camera_remap],
             condition=IfCondition(LaunchConfiguration('use_world_model'))),
        Node(package='worldvla', executable='sim_node', name='worldvla_sim', output='screen',
             parameters=[config, sim_time], remappings=[camera_remap, instruction_remap],
             condition=IfCondition(use_sim)),
        Node(package='rviz2', executable='rviz2', name='rviz2',
             arguments=['-d', os.path.join(share, 'config', 'worldvla.rviz')],
             condition=IfCondition(LaunchConfiguration('use_rviz'))),
    ])
    return LaunchDescription([*args, nodes])
