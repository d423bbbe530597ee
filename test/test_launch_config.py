"""The real launch file, checked without `launch` installed: executables, parameters, topics."""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import yaml

from worldvla_ros.nodes import action_node, sim_node, world_model_node

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / 'launch' / 'bringup.launch.py'
NODE_PARAMS = {'worldvla_action': action_node.PARAMETERS, 'worldvla_world_model': world_model_node.PARAMETERS,
               'worldvla_sim': sim_node.PARAMETERS}


def _node_calls() -> list[dict[str, str]]:
    tree = ast.parse(LAUNCH.read_text())
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'Node':
            kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            calls.append(kw)
    return calls


def test_launch_file_compiles_and_declares_arguments() -> None:
    source = LAUNCH.read_text()
    compile(source, str(LAUNCH), 'exec')
    for arg in ('checkpoint', 'device', 'config', 'namespace', 'camera_topic', 'instruction_topic',
                'use_world_model', 'use_rviz', 'use_sim', 'use_sim_time', 'enabled'):
        assert f"DeclareLaunchArgument('{arg}'" in source


def test_every_worldvla_executable_is_installed() -> None:
    ours = [c for c in _node_calls() if c.get('package') == 'worldvla']
    assert {c['executable'] for c in ours} == {'action_node', 'world_model_node', 'sim_node'}
    assert {c['name'] for c in ours} == set(NODE_PARAMS)
    cmake = (REPO / 'CMakeLists.txt').read_text()
    lib = Path(sys.prefix) / 'lib' / 'worldvla'
    for c in ours:
        assert f'scripts/{c["executable"]}' in cmake  # installed to lib/worldvla by colcon
        assert os.access(lib / c['executable'], os.X_OK), lib / c['executable']


@pytest.mark.parametrize('name', ['worldvla.yaml', 'tabletop_sim.yaml'])
def test_every_yaml_parameter_is_declared_by_its_node(name: str) -> None:
    config = yaml.safe_load((REPO / 'config' / name).read_text())
    if name == 'worldvla.yaml':  # the full reference: every node, every parameter
        assert set(config) == set(NODE_PARAMS)
        for node, table in NODE_PARAMS.items():
            assert set(table) <= set(config[node]['ros__parameters']), f'{node}: not in the YAML'
    else:
        assert set(config) <= set(NODE_PARAMS)
    for node in config:
        table = NODE_PARAMS[node]
        params = config[node]['ros__parameters']
        undeclared = set(params) - set(table)
        assert not undeclared, f'{node}: {undeclared} in the YAML but not declared'
        for name, value in params.items():
            default = table[name].default
            assert type(value) is type(default) or (isinstance(default, float) and isinstance(value, int)), name
            if isinstance(default, list):
                assert len(value) == len(default), name


def test_sim_overrides_match_the_sim() -> None:
    from worldvla_ros.sim.tabletop import SimConfig

    sim = yaml.safe_load((REPO / 'config' / 'tabletop_sim.yaml').read_text())['worldvla_action']['ros__parameters']
    assert tuple(sim['action_scale']) == SimConfig().action_scale
    assert "parameters=[config, sim_config, action_overrides]" in LAUNCH.read_text()


def test_rviz_config_shows_camera_imagined_comparison_and_path() -> None:
    rviz = yaml.safe_load((REPO / 'config' / 'worldvla.rviz').read_text())
    topics = {d['Topic']['Value'] for d in rviz['Visualization Manager']['Displays'] if 'Topic' in d}
    assert topics == {'/camera/image_raw', '/worldvla/imagined_image', '/worldvla/imagined_comparison',
                      '/worldvla/planned_path'}


def test_package_xml_is_valid() -> None:
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(REPO / 'package.xml'))
    assert pkg.name == 'worldvla' and pkg.package_format == 3
    deps = {d.name for d in pkg.exec_depends + pkg.build_depends + pkg.buildtool_depends}
    for name in ('rclpy', 'sensor_msgs', 'visualization_msgs', 'diagnostic_msgs', 'cv_bridge', 'launch_ros',
                 'rosidl_default_generators', 'python3-torch', 'python3-tqdm', 'python3-matplotlib', 'python3-h5py'):
        assert name in deps
