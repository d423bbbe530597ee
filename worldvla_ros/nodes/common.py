"""Plumbing shared by the nodes: parameter tables, counters, diagnostics, QoS, main()."""
from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import CallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from worldvla_ros.image_conversion import ImageRejected, compressed_msg_to_rgb, image_msg_to_rgb


@dataclass(frozen=True)
class Param:
    """One declared parameter: default, description, optional range, read-only after start."""

    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    read_only: bool = False

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(description=self.description, read_only=self.read_only)
        if self.low is not None and self.high is not None:
            if isinstance(self.default, bool):
                pass
            elif isinstance(self.default, int):
                d.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
            elif isinstance(self.default, float):
                d.floating_point_range = [FloatingPointRange(from_value=float(self.low), to_value=float(self.high))]
        return d


MODEL_PARAMETERS: dict[str, Param] = {
    'checkpoint': Param('', 'WorldVLA checkpoint directory (config.json + safetensors)', read_only=True),
    'tokenizer_dir': Param('', 'text_tokenizer.json + vqgan.yaml/.ckpt; empty: found beside the checkpoint',
                           read_only=True),
    'device': Param('auto', 'torch device: auto, cpu, cuda, cuda:1 …', read_only=True),
    'dtype': Param('auto', 'auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32', read_only=True),
}


def load_node_policy(p: dict[str, Any], **overrides: Any):
    """The policy named by a node's MODEL_PARAMETERS; any loading problem is a StartupError."""
    from worldvla_ros.model import CheckpointError, load_policy

    if not p['checkpoint']:
        raise StartupError('parameter checkpoint is empty: give a WorldVLA checkpoint directory')
    try:
        return load_policy(p['checkpoint'], device=p['device'], dtype=p['dtype'],
                           tokenizer_dir=p['tokenizer_dir'] or None, **overrides)
    except CheckpointError as exc:
        raise StartupError(f'cannot load checkpoint: {exc}') from exc


def declare_all(node: Node, table: dict[str, Param]) -> dict[str, Any]:
    for name, p in table.items():
        node.declare_parameter(name, p.default, p.descriptor())
    return {name: node.get_parameter(name).value for name in table}


def image_qos(depth: int = 1) -> QoSProfile:
    qos = QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in ('reliability', 'durability', 'history')},
                     depth=depth)
    return qos


def subscribe_camera(node: Node, compressed: bool, stats: Stats, on_frame: Callable[[np.ndarray, Header], None],
                     on_reject: Callable[[ImageRejected], None], group: CallbackGroup) -> None:
    """``camera/image_raw`` (Image) or ``camera/image_raw/compressed``, decoded to RGB by the shared conversion."""
    convert = compressed_msg_to_rgb if compressed else image_msg_to_rgb

    def callback(msg: Image | CompressedImage) -> None:
        stats.count('frames_received')
        try:
            rgb = convert(msg)
        except ImageRejected as exc:
            on_reject(exc)
            return
        on_frame(rgb, msg.header)

    msg_type, topic = (CompressedImage, 'camera/image_raw/compressed') if compressed else (Image, 'camera/image_raw')
    node.create_subscription(msg_type, topic, callback, image_qos(), callback_group=group)


def latched_qos() -> QoSProfile:
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def reliable_qos(depth: int = 10) -> QoSProfile:
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)


class Stats:
    """Thread-safe counters and a latency window, reported on /diagnostics."""

    def __init__(self, window: int = 200) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._latency: deque[float] = deque(maxlen=window)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency.append(seconds)

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            out = {k: str(v) for k, v in sorted(self.counts.items())}
            if self._latency:
                lat = np.asarray(self._latency) * 1e3
                out['latency_p50_ms'] = f'{np.percentile(lat, 50):.1f}'
                out['latency_p99_ms'] = f'{np.percentile(lat, 99):.1f}'
        return out


def diagnostics_msg(node: Node, name: str, level: int, message: str, values: dict[str, str]) -> DiagnosticArray:
    arr = DiagnosticArray()
    arr.header.stamp = node.get_clock().now().to_msg()
    status = DiagnosticStatus(level=bytes([level]), name=name, message=message, hardware_id=node.get_name())
    status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
    arr.status = [status]
    return arr


def watch_diagnostics(node: Node, hardware_id: str) -> dict[str, str]:
    """Subscribe to /diagnostics; the returned dict keeps the newest values ``hardware_id`` reported."""
    values: dict[str, str] = {}

    def on_diag(m: DiagnosticArray) -> None:
        for s in m.status:
            if s.hardware_id == hardware_id:
                values.update({kv.key: kv.value for kv in s.values})

    node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, reliable_qos())
    return values


def reject_changes_of(read_only: set[str], checks: dict[str, Callable[[Any], str | None]]):
    """An on-set-parameters callback: refuses read-only names and values failing their check."""

    def callback(params: list) -> SetParametersResult:
        for p in params:
            if p.name in read_only:
                return SetParametersResult(successful=False, reason=f'{p.name} is fixed at start-up')
            check = checks.get(p.name)
            problem = check(p.value) if check else None
            if problem:
                return SetParametersResult(successful=False, reason=f'{p.name}: {problem}')
        return SetParametersResult(successful=True)

    return callback


def spin_node(factory: Callable[[], Node], args: list[str] | None = None) -> int:
    """init, build, spin on a multi-threaded executor, shut down cleanly; the exit code."""
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = factory()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except StartupError as exc:
        rclpy.logging.get_logger('worldvla').fatal(str(exc))
        code = 1
    finally:
        if node is not None:
            close = getattr(node, 'close', None)
            if close:
                close()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


class StartupError(RuntimeError):
    """A configuration problem found at start-up: logged as fatal, the process exits 1."""
