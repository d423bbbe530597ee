"""What the bringup starts, decided once for ``ros2 launch`` and ``worldvla_bringup`` alike.

Parameter files are resolved here rather than left to rcl, so that they apply under any
namespace: rcl reads a section keyed ``worldvla_action`` as ``/worldvla_action`` and ignores it
for ``/robot1/worldvla_action``. Here a section applies to a node when its key is

- the bare node name (``worldvla_action``): in any namespace (how our files and most users'
  files are written),
- a fully qualified name with rcl's wildcards (``/robot1/worldvla_action``, ``/**/worldvla_action``,
  ``/*/worldvla_action``, ``/**``): as rcl matches it.

Files apply in order, later values win, launch arguments last; each node then gets one
generated file keyed by its exact name. No ROS imports: the launch file and the tests use it.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NODES = {'action_node': 'worldvla_action', 'world_model_node': 'worldvla_world_model', 'sim_node': 'worldvla_sim',
         'libero_sim_node': 'worldvla_libero_sim'}
SIMS = {'tabletop': 'sim_node', 'libero': 'libero_sim_node'}
CAMERA = 'camera/image_raw'
INSTRUCTION = 'instruction'


def normalize_namespace(*namespaces: str) -> str:
    """'' or '/a/b' (no trailing slash); several are joined, outermost first."""
    parts = [p for ns in namespaces for p in (ns or '').strip().split('/') if p]
    return '/' + '/'.join(parts) if parts else ''


def key_applies(key: str, namespace: str, name: str) -> bool:
    """Does a parameter-file section keyed ``key`` apply to node ``name`` in ``namespace``?"""
    key = str(key).strip()
    if key in ('**', '/**'):
        return True
    if '/' not in key:
        return _match([key], [name])
    pattern = [p for p in key.split('/') if p]
    target = [p for p in normalize_namespace(namespace).split('/') if p] + [name]
    return _match(pattern, target)


def _match(pattern: list[str], target: list[str]) -> bool:
    if not pattern:
        return not target
    head, rest = pattern[0], pattern[1:]
    if head == '**':
        return any(_match(rest, target[i:]) for i in range(len(target) + 1))
    if not target:
        return False
    return (head == '*' or head == target[0]) and _match(rest, target[1:])


def node_parameters(configs: Path | str | Sequence[Path | str], node: str, namespace: str = '') -> dict[str, Any]:
    """One node's parameters from parameter files applied in order (later values win)."""
    out: dict[str, Any] = {}
    for config in [configs] if isinstance(configs, (str, Path)) else configs:
        from worldvla_ros.files import MB, read_text

        data = yaml.safe_load(read_text(config, 16 * MB, 'parameter file')) or {}
        if not isinstance(data, dict):
            raise ValueError(f'{config}: not a ROS parameter file (a YAML mapping of node names)')
        for key, section in data.items():
            if key_applies(key, namespace, node):
                params = (section or {}).get('ros__parameters', {}) if isinstance(section, dict) else {}
                if not isinstance(params, dict):
                    raise ValueError(f'{config}: {key}: ros__parameters is not a mapping')
                out.update(params)
    return out


def parse_value(text: str) -> Any:
    """A ``-p name:=value`` string as rcl reads it (YAML: true → bool, 5 → int, [..] → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@dataclass(frozen=True)
class NodeSpec:
    executable: str
    name: str
    namespace: str
    parameters: dict[str, Any]
    remaps: dict[str, str] = field(default_factory=dict)
    lifecycle: bool = False  # a managed node: its launcher drives configure/activate (its own autostart is off)

    @property
    def fqn(self) -> str:
        return f'{self.namespace}/{self.name}'

    def write_parameters(self, directory: Path) -> Path:
        """This node's parameters as a file of its own, keyed ``/**/<name>``: it reaches the node under
        whatever namespace it ends up in (a launch file including ours may push one more)."""
        path = Path(directory) / f'{self.fqn.strip("/").replace("/", "__")}.yaml'
        path.write_text(yaml.safe_dump({f'/**/{self.name}': {'ros__parameters': self.parameters}}, sort_keys=False))
        return path


@dataclass(frozen=True)
class BringupOptions:
    checkpoint: str
    configs: tuple[Path, ...]
    device: str = 'auto'
    namespace: str = ''
    camera_topic: str = ''
    instruction_topic: str = ''
    use_world_model: bool = True
    use_sim: bool = False
    sim: str = 'tabletop'  # which sim, with use_sim: tabletop | libero (it owns /clock: the others follow it)
    sim_config: Path | None = None  # applied after ``configs`` with the sim
    use_sim_time: bool = False
    enabled: bool | None = None  # None: as the parameter files say (the sim's file enables)
    autostart: bool = True  # the launcher configures and activates the managed nodes; false: a manager does
    extra: dict[str, Any] = field(default_factory=dict)  # more parameters of the model nodes
    sim_extra: dict[str, Any] = field(default_factory=dict)  # more parameters of the sim


def plan(options: BringupOptions) -> list[NodeSpec]:
    """The nodes to start, in order: action node, world-model node, sim."""
    ns = normalize_namespace(options.namespace)
    configs = list(options.configs)
    if options.use_sim and options.sim_config is not None:
        configs.append(options.sim_config)
    remaps = {}
    if options.camera_topic and options.camera_topic != CAMERA:
        remaps[CAMERA] = options.camera_topic
        remaps[f'{CAMERA}/compressed'] = f'{options.camera_topic.rstrip("/")}/compressed'
    if options.instruction_topic and options.instruction_topic != INSTRUCTION:
        remaps[INSTRUCTION] = options.instruction_topic
    model = {'checkpoint': options.checkpoint, 'device': options.device, **options.extra}
    clock_owner = options.use_sim and options.sim == 'libero'
    time = {'use_sim_time': True} if options.use_sim_time or clock_owner else {}
    sim_exe = SIMS[options.sim]
    executables = ['action_node'] + (['world_model_node'] if options.use_world_model else []) + (
        [sim_exe] if options.use_sim else [])
    specs = []
    for exe in executables:
        name = NODES[exe]
        params = node_parameters(configs, name, ns)
        params.update(options.sim_extra if exe == sim_exe else model)
        if exe == 'action_node' and options.enabled is not None:
            params['enabled'] = options.enabled
        managed = exe == 'action_node'
        if managed:
            params['autostart'] = False  # the launcher's lifecycle transitions (or the user's manager) instead
        if not (exe == sim_exe and clock_owner):  # the LIBERO sim publishes /clock: it cannot follow one
            params.update(time)
        specs.append(NodeSpec(exe, name, ns, params, dict(remaps), lifecycle=managed))
    return specs


def parameter_directory() -> Path:
    return Path(tempfile.mkdtemp(prefix='worldvla-params-'))


def missing_packages(wanted: Iterable[str]) -> list[str]:
    """The ROS packages of ``wanted`` that are not installed (checked before anything starts)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    missing = []
    for package in wanted:
        try:
            get_package_prefix(package)
        except PackageNotFoundError:
            missing.append(package)
    return missing


def resolve_topic(topic: str, namespace: str, remaps: dict[str, str]) -> str:
    """The absolute name a node in ``namespace`` with ``remaps`` uses for ``topic``."""
    topic = remaps.get(topic, topic)
    return topic if topic.startswith('/') else f'{normalize_namespace(namespace)}/{topic}'


def rviz_config(template: Path, namespace: str, remaps: dict[str, str], directory: Path,
                fixed_frame: str = '') -> Path:
    """config/worldvla.rviz with every display's topic resolved for this namespace and these remaps
    (rviz shows absolute names; the template's relative ones would only fit the root namespace), and its
    fixed frame the action node's ``command_frame_id`` (the planned path is drawn in it)."""
    data = yaml.safe_load(Path(template).read_text())
    if fixed_frame:
        data['Visualization Manager'].setdefault('Global Options', {})['Fixed Frame'] = fixed_frame
    for display in data['Visualization Manager']['Displays']:
        topic = display.get('Topic')
        if isinstance(topic, dict) and topic.get('Value'):
            topic['Value'] = resolve_topic(topic['Value'], namespace, remaps)
    path = Path(directory) / 'worldvla.rviz'
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
