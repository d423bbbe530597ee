"""The launch file, its plan, the YAML and the rviz config, checked without `launch` installed.

`launch` and `launch_ros` are not on PyPI, so the launch file's own code is run against a small
stand-in that records what it would start (the real `ros2 launch` was run against this package
from a colcon workspace; see shared/ROS-ENV.md). Everything it decides comes from
`worldvla_ros.launch_plan`, which `worldvla_bringup` follows too and test_bringup.py runs for real.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from worldvla_ros.launch_plan import (
    NODES,
    BringupOptions,
    key_applies,
    node_parameters,
    plan,
    resolve_topic,
    rviz_config,
)
from worldvla_ros.nodes import action_node, libero_sim_node, sim_node, world_model_node

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / 'launch' / 'bringup.launch.py'
CONFIG = REPO / 'config' / 'worldvla.yaml'
SIM = REPO / 'config' / 'tabletop_sim.yaml'
NODE_PARAMS = {'worldvla_action': action_node.PARAMETERS, 'worldvla_world_model': world_model_node.PARAMETERS,
               'worldvla_sim': sim_node.PARAMETERS, 'worldvla_libero_sim': libero_sim_node.PARAMETERS}


# -- a stand-in for launch / launch_ros that records the actions ------------------------------------
@dataclass
class Recorded:
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: tuple = ()


def _recorder(kind: str) -> type:
    class Action:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.record = Recorded(kind, kwargs, args)

    Action.__name__ = kind
    return Action


class _LaunchConfiguration:
    def __init__(self, name: str) -> None:
        self.name = name

    def perform(self, context: Any) -> str:
        return context.launch_configurations[self.name]


def _load_launch(monkeypatch: pytest.MonkeyPatch, path: Path) -> Any:
    """A real launch file's module, importing a recording stand-in for launch and launch_ros."""
    launch = types.ModuleType('launch')
    launch.LaunchDescription = lambda entities: list(entities)
    actions = types.ModuleType('launch.actions')
    for kind in ('DeclareLaunchArgument', 'EmitEvent', 'LogInfo', 'OpaqueFunction', 'RegisterEventHandler',
                 'Shutdown'):
        setattr(actions, kind, _recorder(kind))
    event_handlers = types.ModuleType('launch.event_handlers')
    event_handlers.OnShutdown = _recorder('OnShutdown')
    events = types.ModuleType('launch.events')
    events.matches_action = lambda action: ('matches_action', action)
    substitutions = types.ModuleType('launch.substitutions')
    substitutions.LaunchConfiguration = _LaunchConfiguration
    launch_ros = types.ModuleType('launch_ros')
    ros_actions = types.ModuleType('launch_ros.actions')
    ros_actions.Node = _recorder('Node')
    ros_actions.LifecycleNode = _recorder('LifecycleNode')
    handlers = types.ModuleType('launch_ros.event_handlers')
    handlers.OnStateTransition = _recorder('OnStateTransition')
    lifecycle_events = types.ModuleType('launch_ros.events.lifecycle')
    lifecycle_events.ChangeState = _recorder('ChangeState')
    for name, module in (('launch', launch), ('launch.actions', actions), ('launch.events', events),
                         ('launch.event_handlers', event_handlers),
                         ('launch.substitutions', substitutions), ('launch_ros', launch_ros),
                         ('launch_ros.actions', ros_actions), ('launch_ros.event_handlers', handlers),
                         ('launch_ros.events', types.ModuleType('launch_ros.events')),
                         ('launch_ros.events.lifecycle', lifecycle_events)):
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(f'worldvla_{path.stem.replace(".", "_")}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def launch_file(monkeypatch: pytest.MonkeyPatch):
    return _load_launch(monkeypatch, LAUNCH)


def test_fleet_launch_gives_each_robot_its_parameters(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One fleet_node, unnamed (a name remap would rename every node of the process); its parameter file
    has the robot list and, per robot namespace, the YAML's action-node section with the arguments."""
    config = tmp_path / 'robots.yaml'
    config.write_text(yaml.safe_dump({
        'worldvla_action': {'ros__parameters': {'control_rate_hz': 15.0, 'enabled': False}},
        '/arm2/worldvla_action': {'ros__parameters': {'max_step': [0.01] * 3 + [0.0] * 4}}}))
    module = _load_launch(monkeypatch, REPO / 'launch' / 'fleet.launch.py')
    (node,) = _nodes(module, robots='arm1, arm2,arm3', config=str(config), checkpoint='/models/x', enabled='true')
    assert node.kwargs['executable'] == 'fleet_node' and 'name' not in node.kwargs and 'namespace' not in node.kwargs
    _check_required(node)
    (path,) = node.kwargs['parameters']
    data = yaml.safe_load(Path(path).read_text())
    assert data['worldvla_fleet']['ros__parameters']['robots'] == ['/arm1', '/arm2', '/arm3']
    for robot in ('arm1', 'arm2', 'arm3'):
        values = data[f'/{robot}/worldvla_action']['ros__parameters']
        assert values['control_rate_hz'] == 15.0 and values['checkpoint'] == '/models/x' and values['enabled']
        assert ('max_step' in values) == (robot == 'arm2')
        assert 'success_topic' not in values  # no sim asked for
    # names ROS does not take (a traceback and exit 0 before): refused with a non-zero exit and the reason
    for robots in ('a,1b', 'arm1,arm1', 'a-b', ' , '):
        with pytest.raises(module.LaunchRefused, match='distinct ROS names'):
            _run_launch(module, robots=robots)


def test_fleet_launch_with_sims_gives_each_robot_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """use_sim:=true: a tabletop sim per robot, in its namespace, and each robot's goals end on its own success."""
    module = _load_launch(monkeypatch, REPO / 'launch' / 'fleet.launch.py')
    fleet, *sims = _nodes(module, robots='arm1,arm2', use_sim='true')
    assert [(n.kwargs['executable'], n.kwargs['namespace'], n.kwargs['name']) for n in sims] == [
        ('sim_node', 'arm1', 'worldvla_sim'), ('sim_node', 'arm2', 'worldvla_sim')]
    assert all(n.kwargs['on_exit'].record.kind == 'OpaqueFunction' for n in sims)
    _check_required(fleet)  # one flag for all: after it, the sims' ending says nothing more
    data = yaml.safe_load(Path(fleet.kwargs['parameters'][0]).read_text())
    for robot in ('arm1', 'arm2'):
        action = data[f'/{robot}/worldvla_action']['ros__parameters']
        assert action['success_topic'] == 'sim/success' and action['enabled'] is True
        assert data[f'/{robot}/worldvla_sim']['ros__parameters']['wait_for_active'] == 'worldvla_action'


def _check_required(node: Recorded) -> None:
    """on_exit: the others stop with one Shutdown; already stopping, nothing more; a failure fails the launch."""
    handler = node.kwargs['on_exit'].record
    assert handler.kind == 'OpaqueFunction'
    ended = handler.kwargs['function']

    def context(code: int, shutting: bool = False) -> Any:
        return types.SimpleNamespace(is_shutdown=shutting, locals=types.SimpleNamespace(
            event=types.SimpleNamespace(returncode=code)))

    assert ended(context(0, shutting=True)) is None  # Ctrl-C: launch_ros raised on a second Shutdown
    (stop,) = ended(context(0))
    assert stop.record.kind == 'Shutdown'
    assert ended(context(0)) is None  # a second node ending once the launch stops: no second Shutdown


def test_a_failing_node_fails_the_launch(launch_file: Any) -> None:
    node = _nodes(launch_file)[1]
    with pytest.raises(launch_file.LaunchRefused, match='worldvla_world_model exited with code 1'):
        node.kwargs['on_exit'].record.kwargs['function'](types.SimpleNamespace(
            is_shutdown=False, locals=types.SimpleNamespace(event=types.SimpleNamespace(returncode=1))))


def _run_launch(module: Any, **arguments: str) -> list[Recorded]:
    """What the launch file starts for these `name:=value` arguments (defaults for the rest)."""
    entities = module.generate_launch_description()
    declared = {e.record.args[0] if e.record.args else e.record.kwargs['name']: e.record
                for e in entities if e.record.kind == 'DeclareLaunchArgument'}
    values = {name: r.kwargs['default_value'] for name, r in declared.items()}
    unknown = set(arguments) - set(values)
    assert not unknown, f'not declared: {unknown}'
    values.update(arguments)
    context = types.SimpleNamespace(launch_configurations=values)
    opaque = [e for e in entities if e.record.kind == 'OpaqueFunction']
    assert len(opaque) == 1
    return [a.record for a in opaque[0].record.kwargs['function'](context)]


def _nodes(module: Any, **arguments: str) -> list[Recorded]:
    return [a for a in _run_launch(module, **arguments) if a.kind in ('Node', 'LifecycleNode')]


def _params(node: Recorded) -> dict[str, Any]:
    (path,) = node.kwargs['parameters']
    data = yaml.safe_load(Path(path).read_text())
    (key,) = data
    assert key == f'/**/{node.kwargs["name"]}'
    return data[key]['ros__parameters']


# -- the launch file ------------------------------------------------------------------------------
def test_every_launch_argument_has_a_description(launch_file: Any) -> None:
    entities = launch_file.generate_launch_description()
    declared = [e.record for e in entities if e.record.kind == 'DeclareLaunchArgument']
    names = [r.args[0] if r.args else r.kwargs['name'] for r in declared]
    assert set(names) == {'checkpoint', 'device', 'config', 'namespace', 'camera_topic', 'instruction_topic',
                          'use_world_model', 'use_rviz', 'use_sim', 'use_sim_time', 'enabled', 'autostart',
                          'libero_suite', 'libero_task', 'libero_episodes'}
    assert all(len(r.kwargs.get('description', '')) > 10 for r in declared)


def test_use_sim_libero_starts_the_libero_sim_owning_the_clock(launch_file: Any) -> None:
    """use_sim:=libero: the LIBERO sim node with its suite and task; it publishes /clock, so the model nodes
    follow it (use_sim_time) and it does not; the action node runs the release's protocol at LIBERO's 20 Hz."""
    nodes = _nodes(launch_file, use_sim='libero', libero_suite='libero_goal', libero_task='3')
    assert [n.kwargs['executable'] for n in nodes] == ['action_node', 'world_model_node', 'libero_sim_node']
    action, world, sim = (_params(n) for n in nodes)
    assert action['use_sim_time'] is True and world['use_sim_time'] is True and 'use_sim_time' not in sim
    assert (sim['suite'], sim['task'], sim['episodes']) == ('libero_goal', 3, 0)
    assert action['control_rate_hz'] == 20.0 and action['replan_threshold'] == 0 and action['enabled'] is True
    assert action['image_rotation'] == '0' and action['success_topic'] == 'sim/success'
    with pytest.raises(launch_file.LaunchRefused, match='whole numbers'):
        _run_launch(launch_file, use_sim='libero', libero_task='three')


def test_default_launch_starts_the_two_model_nodes_every_one_required(launch_file: Any) -> None:
    nodes = _nodes(launch_file)
    assert [(n.kind, n.kwargs['executable'], n.kwargs['name']) for n in nodes] == [
        ('LifecycleNode', 'action_node', 'worldvla_action'), ('Node', 'world_model_node', 'worldvla_world_model')]
    for n in nodes:
        assert n.kwargs['package'] == 'worldvla' and n.kwargs['namespace'] == ''
    _check_required(nodes[0])  # one exits: the launch ends, never half a graph
    action = _params(nodes[0])
    assert action['checkpoint'].endswith('models/tabletop') and action['enabled'] is False
    assert action['control_rate_hz'] == 10.0


def test_namespace_keeps_every_yaml_parameter(launch_file: Any, tmp_path: Path) -> None:
    user = tmp_path / 'robot.yaml'
    user.write_text('worldvla_action:\n  ros__parameters:\n    control_rate_hz: 5.0\n'
                    '/robot2/worldvla_action:\n  ros__parameters:\n    watchdog_timeout: 9.0\n')
    nodes = _nodes(launch_file, namespace='/robot1', config=str(user), use_sim='true')
    # relative, so that launch_ros puts a namespace pushed by an including launch file in front (/site/robot1)
    assert [n.kwargs['namespace'] for n in nodes] == ['robot1'] * 3
    action = _params(nodes[0])
    assert action['control_rate_hz'] == 5.0  # the user's file, keyed by the bare name
    assert action['enabled'] is True and action['replan_threshold'] == 1  # the sim's overlay
    assert 'watchdog_timeout' not in action  # a section for another robot does not apply


def test_camera_remap_covers_the_compressed_topic(launch_file: Any) -> None:
    nodes = _nodes(launch_file, camera_topic='/front/color/image_raw', instruction_topic='/task', use_sim='true')
    for n in nodes:
        assert dict(n.kwargs['remappings']) == {
            'camera/image_raw': '/front/color/image_raw',
            'camera/image_raw/compressed': '/front/color/image_raw/compressed', 'instruction': '/task'}


def test_rviz_missing_starts_nothing(launch_file: Any) -> None:
    """use_rviz:=true where rviz2 is not installed: said, and nothing started (not half a graph)."""
    from worldvla_ros.launch_plan import missing_packages

    assert missing_packages(['rviz2']) == ['rviz2']  # true on this machine
    with pytest.raises(launch_file.LaunchRefused, match='rviz2 is not installed'):  # ros2 launch exits 1
        _run_launch(launch_file, use_rviz='true', use_sim='true')


def test_enabled_argument_overrides_the_files(launch_file: Any) -> None:
    assert _params(_nodes(launch_file, enabled='true')[0])['enabled'] is True
    assert _params(_nodes(launch_file, use_sim='true', enabled='false')[0])['enabled'] is False


def test_the_launch_brings_the_managed_action_node_to_active_through_lifecycle_events(launch_file: Any) -> None:
    """Configure at once; activate on configuring → inactive; a failed or raising configure ends the launch.
    The node's own autostart is off: the launch drives it (the real launch_ros types are checked by the
    ros2 launch run, the event wiring here)."""
    from lifecycle_msgs.msg import Transition

    actions = _run_launch(launch_file)
    node, world = (a for a in actions if a.kind in ('Node', 'LifecycleNode'))
    cleanup, *actions = actions
    assert cleanup.kind == 'RegisterEventHandler' and cleanup.args[0].record.kind == 'OnShutdown'
    assert actions[0] is node
    assert node.kind == 'LifecycleNode' and _params(node)['autostart'] is False
    assert 'autostart' not in _params(world)  # the world-model node is not managed

    def change(emit: Recorded) -> int:
        assert emit.kind == 'EmitEvent'
        event = emit.kwargs['event'].record
        assert event.kind == 'ChangeState' and event.kwargs['lifecycle_node_matcher'][1].record is node
        return event.kwargs['transition_id']

    handlers = {}
    for a in actions:
        if a.kind == 'RegisterEventHandler':
            (handler,) = a.args
            on = handler.record
            assert on.kind == 'OnStateTransition' and on.kwargs['target_lifecycle_node'].record is node
            handlers[on.kwargs['start_state'], on.kwargs['goal_state']] = [e.record for e in on.kwargs['entities']]
    assert set(handlers) == {('configuring', 'inactive'), ('configuring', 'unconfigured'), ('errorprocessing', None)}
    assert [change(e) for e in handlers['configuring', 'inactive'] if e.kind == 'EmitEvent'] == [
        Transition.TRANSITION_ACTIVATE]
    for failed in (handlers['configuring', 'unconfigured'][-1], handlers['errorprocessing', None][-1]):
        assert failed.kind == 'OpaqueFunction'  # the launch fails (exit 1) with the reason
        with pytest.raises(launch_file.LaunchRefused, match='worldvla_action'):
            failed.kwargs['function'](types.SimpleNamespace())
    emitted = [a for a in actions if a.kind == 'EmitEvent']
    assert [change(e) for e in emitted] == [Transition.TRANSITION_CONFIGURE]
    assert actions.index(emitted[0]) > max(i for i, a in enumerate(actions) if a.kind == 'RegisterEventHandler')

    # autostart:=false: unconfigured, for the user's lifecycle manager; nothing emitted, nothing registered
    manual = _run_launch(launch_file, autostart='false')[1:]
    assert [a.kind for a in manual] == ['LifecycleNode', 'Node'] and _params(manual[0])['autostart'] is False


def test_the_parameter_files_go_with_the_launch(launch_file: Any) -> None:
    """The generated files are removed when the launch shuts down (every launch left /tmp/worldvla-params-*)."""
    actions = _run_launch(launch_file)
    (path,) = _nodes_of(actions)[0].kwargs['parameters']
    assert Path(path).is_file()
    actions[0].args[0].record.kwargs['on_shutdown'](None, None)
    assert not Path(path).parent.exists()


def _nodes_of(actions: list[Recorded]) -> list[Recorded]:
    return [a for a in actions if a.kind in ('Node', 'LifecycleNode')]


# -- the plan's parameter-file semantics ---------------------------------------------------------------
@pytest.mark.parametrize(('key', 'namespace', 'applies'), [
    ('worldvla_action', '', True), ('worldvla_action', '/robot1', True), ('worldvla_action', '/a/b', True),
    ('/worldvla_action', '', True), ('/worldvla_action', '/robot1', False),
    ('/robot1/worldvla_action', '/robot1', True), ('/robot1/worldvla_action', '/robot2', False),
    ('/**/worldvla_action', '/a/b', True), ('/**', '/x', True), ('/*/worldvla_action', '/robot1', True),
    ('/*/worldvla_action', '', False), ('/**/worldvla_sim', '/robot1', False), ('worldvla_*', '', False),
])
def test_parameter_file_keys(key: str, namespace: str, applies: bool) -> None:
    assert key_applies(key, namespace, 'worldvla_action') is applies


def test_files_layer_in_order_with_arguments_last(tmp_path: Path) -> None:
    late = tmp_path / 'late.yaml'
    late.write_text('/**:\n  ros__parameters:\n    device: cuda\nworldvla_action:\n  ros__parameters:\n'
                    '    max_obs_age: 0.25\n')
    params = node_parameters([CONFIG, SIM, late], 'worldvla_action', '/robot1')
    assert params['max_obs_age'] == 0.25 and params['enabled'] is True and params['device'] == 'cuda'
    options = BringupOptions(checkpoint='/ckpt', configs=(CONFIG, late), namespace='robot1', device='cpu',
                             enabled=True, use_sim=True, sim_config=SIM, extra={'max_obs_age': 0.75})
    action, world, sim = plan(options)
    assert action.parameters['device'] == 'cpu' and action.parameters['max_obs_age'] == 0.75
    assert world.parameters['checkpoint'] == '/ckpt' and 'checkpoint' not in sim.parameters
    assert sim.fqn == '/robot1/worldvla_sim'


def test_rviz_topics_follow_namespace_and_camera_remap(tmp_path: Path) -> None:
    remaps = {'camera/image_raw': 'front/image_raw'}
    path = rviz_config(REPO / 'config' / 'worldvla.rviz', '/robot1', remaps, tmp_path)
    rviz = yaml.safe_load(path.read_text())
    topics = {d['Topic']['Value'] for d in rviz['Visualization Manager']['Displays'] if 'Topic' in d}
    assert topics == {'/robot1/front/image_raw', '/robot1/worldvla/imagined_image',
                      '/robot1/worldvla/imagined_comparison', '/robot1/worldvla/planned_path',
                      '/robot1/worldvla/surprise_map'}
    assert resolve_topic('camera/image_raw', '', {}) == '/camera/image_raw'
    assert resolve_topic('camera/image_raw', '/r', {'camera/image_raw': '/abs/cam'}) == '/abs/cam'
    # the fixed frame follows command_frame_id (the planned path is drawn in it), not a hard-coded ee_delta
    path = rviz_config(REPO / 'config' / 'worldvla.rviz', '', {}, tmp_path, fixed_frame='tool0')
    assert yaml.safe_load(path.read_text())['Visualization Manager']['Global Options']['Fixed Frame'] == 'tool0'


# -- executables, YAML, package.xml ------------------------------------------------------------------
def test_every_worldvla_executable_is_installed() -> None:
    cmake = (REPO / 'CMakeLists.txt').read_text()
    lib = Path(sys.prefix) / 'lib' / 'worldvla'
    for exe in [*NODES, 'worldvla_bringup']:
        assert exe in cmake  # installed to lib/worldvla by colcon and by scripts/install.sh
        assert os.access(lib / exe, os.X_OK), lib / exe
    assert 'worldvla_bringup' in (REPO / 'setup.py').read_text()


@pytest.mark.parametrize('name', ['worldvla.yaml', 'tabletop_sim.yaml', 'libero_sim.yaml'])
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

    sim = yaml.safe_load(SIM.read_text())['worldvla_action']['ros__parameters']
    assert tuple(sim['action_scale']) == SimConfig().action_scale


def test_launch_file_is_plain_python() -> None:
    compile(LAUNCH.read_text(), str(LAUNCH), 'exec')
    tree = ast.parse(LAUNCH.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == 'generate_launch_description' for n in tree.body)


def test_package_xml_is_valid() -> None:
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(REPO / 'package.xml'))
    assert pkg.name == 'worldvla' and pkg.package_format == 3
    deps = {d.name for d in pkg.exec_depends + pkg.build_depends + pkg.buildtool_depends}
    for name in ('rclpy', 'sensor_msgs', 'visualization_msgs', 'diagnostic_msgs', 'cv_bridge', 'launch_ros',
                 'rosidl_default_generators', 'python3-pil', 'python3-tqdm', 'python3-matplotlib', 'python3-h5py'):
        assert name in deps


# Python keys of ros/rosdistro rosdep/python.yaml, read there on 2026-12-01. Not keys (rosdep install
# fails on them): python3-torch, python3-safetensors, python3-tokenizers-pip, python3-rosbags-pip.
ROSDEP_PYTHON_KEYS = {'python3-numpy', 'python3-opencv', 'python3-pil', 'python3-yaml', 'python3-skimage',
                      'python3-tqdm', 'python3-matplotlib', 'python3-h5py', 'python3-psutil', 'python3-pytest',
                      'python3-pytest-timeout', 'python3-transformers-pip', 'python3-scipy'}
# setup.py's distributions → the rosdep key that provides them
ROSDEP_FOR = {'numpy': 'python3-numpy', 'opencv-python-headless': 'python3-opencv', 'pillow': 'python3-pil',
              'pyyaml': 'python3-yaml', 'scikit-image': 'python3-skimage', 'tqdm': 'python3-tqdm',
              'scipy': 'python3-scipy'}


def test_package_xml_names_only_real_rosdep_keys_and_requirements_cover_the_rest() -> None:
    import re

    from catkin_pkg.package import parse_package

    pkg = parse_package(str(REPO / 'package.xml'))
    python_keys = {d.name for d in pkg.exec_depends + pkg.test_depends if d.name.startswith('python')}
    assert python_keys <= ROSDEP_PYTHON_KEYS, python_keys - ROSDEP_PYTHON_KEYS
    setup = (REPO / 'setup.py').read_text()
    install_requires = re.search(r'install_requires=\[(.*?)\]', setup, re.S).group(1)
    wanted = {re.split(r'[<>=]', r)[0] for r in re.findall(r"'([^']+)'", install_requires)}
    pip_only = {re.split(r'[<>=]', line)[0] for line in (REPO / 'requirements.txt').read_text().splitlines()
                if line and not line.startswith('#')}
    for dist in wanted:
        assert dist in pip_only or ROSDEP_FOR.get(dist) in python_keys, f'{dist}: neither a rosdep key nor pip'
    train = re.search(r"'train': \[(.*?)\]", setup, re.S).group(1)  # worldvla_finetune's own (LoRA)
    assert pip_only <= wanted | {re.split(r'[<>=]', r)[0] for r in re.findall(r"'([^']+)'", train)}
