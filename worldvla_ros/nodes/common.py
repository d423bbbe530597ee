"""Plumbing shared by the nodes: parameter tables, guarded callbacks, camera input, counters,
diagnostics, QoS, and a main() that always ends with the robot held."""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import CallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time
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
    choices: tuple[str, ...] = ()  # the string values allowed

    def check_choice(self, value: Any) -> str | None:
        if self.choices and value not in self.choices:
            return f'must be one of {", ".join(self.choices)}, got {value!r}'
        return None

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
    'cpu_threads': Param(1, 'on a CPU device: torch threads of the inference thread (0: torch default); small '
                         'models run fastest with 1', 0, 1024, read_only=True),
    'image_rotation': Param('checkpoint', 'turn camera frames before the model: checkpoint (its rotate_180: the '
                            'released LIBERO checkpoints turn LIBERO\'s raw renders by 180°), 0 (an upright camera '
                            'for such a checkpoint), 180', read_only=True, choices=('checkpoint', '0', '180')),
}
CAMERA_PARAMETERS: dict[str, Param] = {
    'use_compressed': Param(False, 'subscribe to sensor_msgs/CompressedImage on <camera>/compressed',
                            read_only=True),
    'max_future_stamp': Param(0.1, 'seconds; camera frames stamped further ahead of this node’s clock are '
                              'rejected (clock skew tolerance)', 0.0, 10.0),
}


def load_node_policy(p: dict[str, Any], **overrides: Any):
    """The policy named by a node's MODEL_PARAMETERS; any loading problem is a StartupError."""
    from worldvla_ros.model import CheckpointError, load_policy

    if not p['checkpoint']:
        raise StartupError('parameter checkpoint is empty: give a WorldVLA checkpoint directory')
    try:
        if p.get('image_rotation', 'checkpoint') != 'checkpoint':
            overrides['rotate_180'] = p['image_rotation'] == '180'
        return load_policy(p['checkpoint'], device=p['device'], dtype=p['dtype'],
                           tokenizer_dir=p['tokenizer_dir'] or None, **overrides)
    except CheckpointError as exc:
        raise StartupError(f'cannot load checkpoint: {exc}') from exc


def prepare_policy(policy: Any, capture: str, warmup: bool, logger: Any, t0: float) -> Any:
    """A freshly loaded policy made ready to serve: its decode step captured (``capture``), one inference run
    (``warmup``: a model that cannot answer must not go active), its objects frozen out of the collector's full
    passes. Any problem is a StartupError."""
    import gc

    try:
        policy.capture_decoding(capture)
    except ValueError as exc:  # e.g. cuda_graph asked for a CPU device
        raise StartupError(f'parameter decode_capture: {exc}') from exc
    if warmup:
        try:
            policy.warmup()
        except Exception as exc:
            raise StartupError(f'warm-up inference failed: {exc}') from exc
    if policy.engine.capture_error:
        logger.warning(f'decode step not captured: {policy.engine.capture_error}')
    captured = f', decode step captured ({policy.engine.captured})' if policy.engine.captured else ''
    logger.info(f'loaded {policy.model_id} in {time.perf_counter() - t0:.1f} s{captured}')
    # the model's objects (modules, the tokenizer's vocabulary) live as long as it does: out of the collector's
    # full passes, which otherwise walk them all and stopped the control loop for up to 0.15 s
    gc.collect()
    gc.freeze()
    return policy


def declare_all(node: Node, table: dict[str, Param]) -> dict[str, Any]:
    """Declare every parameter; a value given at start-up that does not fit is a StartupError."""
    for name, p in table.items():
        try:
            node.declare_parameter(name, p.default, p.descriptor())
        except ParameterException as exc:
            kind = type(p.default).__name__.replace('str', 'string').replace('float', 'double')
            hint = f' in {p.low:g} … {p.high:g}' if p.low is not None and p.high is not None else ''
            raise StartupError(f'parameter {name}: expected a {kind}{hint} ({exc})') from exc
        problem = p.check_choice(node.get_parameter(name).value)
        if problem:
            raise StartupError(f'parameter {name}: {problem}')
    return {name: node.get_parameter(name).value for name in table}


STATE_QUEUE_DEPTH = 100


class SeenMessages:
    """Recognises a message that reached this node twice (through two readers): the publisher's
    source timestamp and sequence number (and GID, where rclpy gives it) name it. Thread-safe, bounded."""

    def __init__(self, remember: int = 1024) -> None:
        self._seen: set[tuple] = set()
        self._order: deque[tuple] = deque()
        self._remember = remember
        self._lock = threading.Lock()

    def first_time(self, info: Any) -> bool:
        gid = (info.get('publisher_gid') or {}).get('data')  # not in Jazzy's message info
        key = (bytes(gid) if gid is not None else b'', info.get('source_timestamp'),
               info.get('publication_sequence_number'))
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            self._order.append(key)
            if len(self._order) > self._remember:
                self._seen.discard(self._order.popleft())
        return True


class GuardedNode(Node):
    """A Node none of whose callbacks can end the process.

    Every subscription, timer and service callback is wrapped: an exception is counted
    (``callback_errors`` on /diagnostics) and logged, and the node keeps running.
    """

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        self.stats = Stats()  # before Node.__init__: its parameter services are guarded too
        self.finished = threading.Event()  # a managed node reached finalized: its process may end
        super().__init__(node_name, **kwargs)
        self._said: dict[str, tuple[float, int]] = {}  # key → (last logged, suppressed since)
        self._said_lock = threading.Lock()
        # the clock of every stamp and reset check: chosen at start, as ROS nodes usually have it
        self.add_on_set_parameters_callback(_fixed_clock)

    def say(self, level: str, key: str, text: str, every: float = 2.0) -> None:
        """A log line at most once per ``every`` seconds for ``key``, saying how many were held back. Cheaper
        than rclpy's own throttle, which inspects the caller's source on every call (≈ 1 ms): for paths that
        a flood of messages or requests runs through."""
        now = time.monotonic()
        with self._said_lock:
            last, held = self._said.get(key, (-math.inf, 0))
            if now - last < every:
                self._said[key] = (last, held + 1)
                return
            self._said[key] = (now, 0)
        text += f' ({held} more like it held back)' if held else ''
        logger = self.get_logger()
        # one call site per severity: rclpy keys its logging context by call site and refuses a second severity
        if level == 'error':
            logger.error(text)
        elif level == 'warning':
            logger.warning(text)
        else:
            logger.info(text)

    def _guard(self, callback: Callable, what: str, fallback: Callable[[], Any] = lambda: None) -> Callable:
        @functools.wraps(callback)  # rclpy reads the signature (message info, timer info) through __wrapped__
        def guarded(*args: Any) -> Any:
            try:
                return callback(*args)
            except Exception as exc:
                if not self.context.ok():
                    return fallback()
                self.stats.count('callback_errors')
                self.get_logger().error(f'{what} failed, the node goes on: {type(exc).__name__}: {exc}',
                                        throttle_duration_sec=2.0)
                return fallback()

        return guarded

    def create_subscription(self, msg_type: Any, topic: str, callback: Callable, *args: Any, **kwargs: Any):
        return super().create_subscription(msg_type, topic, self._guard(callback, f'callback of {topic}'),
                                           *args, **kwargs)

    def create_state_subscription(self, msg_type: Any, topic: str, callback: Callable[[Any], None],
                                  callback_group: CallbackGroup | None = None, once: bool = True) -> None:
        """An input (e-stop, instruction) that any publisher reaches and that never loses a message.

        Two readers: a transient-local one gets the value a latched publisher (``ros2 topic pub``'s
        default) held before this node started; a volatile one matches publishers with the default
        volatile QoS, which a transient-local reader never matches. A message both readers receive is
        handled once (``once``; without it, twice: for an idempotent input such as the e-stop, where
        dropping nothing matters more). Handling the first arrival keeps each publisher's order: a reader
        delivers in order, so a message is never first seen after a later one of its publisher. Each
        reader queues ``STATE_QUEUE_DEPTH`` messages, so a burst (a bouncing e-stop button: true, then
        false at once) never overwrites one not read yet.
        """
        seen = SeenMessages()

        def handle(msg: Any, info: Any) -> None:
            if not once or seen.first_time(info):
                callback(msg)

        for durability in (DurabilityPolicy.TRANSIENT_LOCAL, DurabilityPolicy.VOLATILE):
            qos = QoSProfile(depth=STATE_QUEUE_DEPTH, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE, durability=durability)
            # a volatile publisher is incompatible with the transient-local reader only, and the volatile
            # reader receives it: no warning for that one (the volatile reader still warns of others)
            events = SubscriptionEventCallbacks(incompatible_qos=lambda _info: None) \
                if durability == DurabilityPolicy.TRANSIENT_LOCAL else None
            self.create_subscription(msg_type, topic, handle, qos, callback_group=callback_group,
                                     event_callbacks=events)

    def create_timer(self, timer_period_sec: float, callback: Callable, *args: Any, **kwargs: Any):
        return super().create_timer(timer_period_sec, self._guard(callback, f'timer {callback.__name__}'),
                                    *args, **kwargs)

    def create_service(self, srv_type: Any, srv_name: str, callback: Callable, **kwargs: Any):
        return super().create_service(srv_type, srv_name,
                                      self._guard(callback, f'service {srv_name}', srv_type.Response), **kwargs)

    def close(self) -> bool:
        """Stop background work before the node is destroyed; False if some of it did not stop."""
        return True


def _fixed_clock(params: list) -> SetParametersResult:
    if any(p.name == 'use_sim_time' for p in params):
        return SetParametersResult(successful=False, reason='use_sim_time is fixed at start-up (it would change the '
                                                            'clock of every stamp and reset check mid-run)')
    return SetParametersResult(successful=True)


def image_qos(depth: int = 1) -> QoSProfile:
    qos = QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in ('reliability', 'durability', 'history')},
                     depth=depth)
    return qos


class CameraInput:
    """``camera/image_raw`` (Image) or ``camera/image_raw/compressed``: checked, decoded, counted.

    Counters on /diagnostics: ``frames_received`` (reached the callback), ``frames_lost_in_transport``
    (gaps in the publisher's sequence numbers: overwritten in the depth-1 queue or lost on the
    wire before the callback ran), ``rejected_<reason>`` (unusable: encoding, size, decode,
    future stamp …). What a node then does with a good frame it counts itself.
    """

    def __init__(self, node: GuardedNode, compressed: bool, on_frame: Callable[[np.ndarray, Header, float], None],
                 on_reject: Callable[[ImageRejected], None], group: CallbackGroup) -> None:
        self.node = node
        self.stats = node.stats
        self._on_frame = on_frame
        self._on_reject = on_reject
        self._convert = compressed_msg_to_rgb if compressed else image_msg_to_rgb
        self._last_sequence: dict[Any, int] = {}
        msg_type, topic = (CompressedImage, 'camera/image_raw/compressed') if compressed else (Image,
                                                                                             'camera/image_raw')
        from rclpy.subscription import Subscription

        with_info = hasattr(Subscription, 'CallbackType')  # message info (sequence numbers): rclpy ≥ Jazzy
        callback = self._callback if with_info else lambda msg: self._callback(msg, None)
        node.create_subscription(msg_type, topic, callback, image_qos(), callback_group=group)

    def _callback(self, msg: Image | CompressedImage, info: dict | None) -> None:
        received = time.perf_counter()  # handed to on_frame: the node's own work starts here
        self.stats.count('frames_received')
        self._count_lost(info)
        try:
            self._check_stamp(msg.header)
            rgb = self._convert(msg)
        except ImageRejected as exc:
            self._on_reject(exc)
            return
        self._on_frame(rgb, msg.header, received)

    def _count_lost(self, info: dict | None) -> None:
        seq = (info or {}).get('publication_sequence_number')
        if not seq:
            return
        gid = (info or {}).get('publisher_gid') or {}
        key = bytes(gid.get('data', b'')) if isinstance(gid, dict) else None
        last = self._last_sequence.get(key)
        if last is not None and seq > last + 1:
            self.stats.count('frames_lost_in_transport', seq - last - 1)
        self._last_sequence[key] = seq if last is None else max(seq, last)

    def _check_stamp(self, header: Header) -> None:
        try:
            stamp = Time.from_msg(header.stamp)
        except ValueError as exc:  # negative seconds
            raise ImageRejected('stamp', f'invalid header stamp {header.stamp.sec} s: {exc}') from exc
        ahead = (stamp - self.node.get_clock().now()).nanoseconds * 1e-9
        limit = self.node.get_parameter('max_future_stamp').value
        if ahead > limit:
            raise ImageRejected('future_stamp', f'frame stamped {ahead:.3f} s ahead of this node’s clock '
                                                f'(max_future_stamp {limit:g} s)')


def latched_qos() -> QoSProfile:
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def reliable_qos(depth: int = 10) -> QoSProfile:
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)


class Stats:
    """Thread-safe counters and windows of durations (``latency``: the model's; others by name), reported
    on /diagnostics as ``<name>_p50_ms`` / ``<name>_p99_ms`` / ``<name>_max_ms``."""

    def __init__(self, window: int = 200) -> None:
        self._lock = threading.Lock()
        self._window = window
        self.counts: Counter[str] = Counter()
        self._durations: dict[str, deque[float]] = {}

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def latency(self, seconds: float) -> None:
        self.duration('latency', seconds)

    def duration(self, name: str, seconds: float) -> None:
        with self._lock:
            self._durations.setdefault(name, deque(maxlen=self._window)).append(seconds)

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            out = {k: str(v) for k, v in sorted(self.counts.items())}
            for name, window in sorted(self._durations.items()):
                ms = np.asarray(window) * 1e3
                digits = 1 if name == 'latency' else 3
                out[f'{name}_p50_ms'] = f'{np.percentile(ms, 50):.{digits}f}'
                out[f'{name}_p99_ms'] = f'{np.percentile(ms, 99):.{digits}f}'
                out[f'{name}_max_ms'] = f'{ms.max():.{digits}f}'
        return out


def diagnostic_status(node: Node, name: str, level: int, message: str, values: dict[str, str]) -> DiagnosticStatus:
    # the node's full name: robots in different namespaces must not report as one
    status = DiagnosticStatus(level=bytes([level]), name=name, message=message,
                              hardware_id=node.get_fully_qualified_name().lstrip('/'))
    status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
    return status


def diagnostics_msg(node: Node, name: str, level: int, message: str, values: dict[str, str]) -> DiagnosticArray:
    arr = DiagnosticArray()
    arr.header.stamp = node.get_clock().now().to_msg()
    arr.status = [diagnostic_status(node, name, level, message, values)]
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


def _die_with_parent() -> None:
    """SIGTERM to this process when the process that started it dies (launch killed, bringup crashed):
    an orphaned node must not go on commanding a robot. Linux only."""
    if not sys.platform.startswith('linux'):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def shutdown_executor(executor: MultiThreadedExecutor, timeout_sec: float = 2.0) -> bool:
    """``executor.shutdown`` once the callbacks in flight have ended. rclpy's own (Jazzy, Kilted) does not wait
    for them (it tests its shutdown flag just after setting it) and destroys its guard condition under them: a
    callback that ends afterwards fails on it in its pool thread, and rclpy prints "The following exception
    was never retrieved" at exit. False if a callback is still running after ``timeout_sec``: the executor is
    then left as it is (Kilted's shutdown would join that callback's thread forever)."""
    tasks = list(getattr(executor, '_futures', ()))  # the handlers spin_once gave the pool
    deadline = time.monotonic() + timeout_sec
    while any(not (t.done() or t.cancelled()) for t in tasks):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return executor.shutdown(timeout_sec=timeout_sec)


FINALIZED_LINGER_S = 0.5


def spin_node(factory: Callable[[], GuardedNode | list[GuardedNode]], args: list[str] | None = None) -> int:
    """init, build, spin, and on SIGINT/SIGTERM (or any failure) close the node, which holds the robot.

    rclpy's own signal handlers are off: they shut the context down at once, and a node whose
    context is gone cannot send a last hold. A second signal during the shutdown is logged, not
    acted on (no abort). Exit code 0 after a signal, 1 for a start-up or runtime failure. ``factory``
    may build several nodes (one process serving several robots): all spin on one executor and all
    are closed.
    """
    _die_with_parent()
    # a thread waiting for the GIL (the executor's, between its many short C calls) gets it after this long at
    # most: with the default 5 ms, a busy inference thread delayed control ticks by up to 0.5 s under load
    sys.setswitchinterval(0.001)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    logger = rclpy.logging.get_logger('worldvla')
    stop = threading.Event()
    nodes: list[GuardedNode] = []
    executor: MultiThreadedExecutor | None = None
    code = 0

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            logger.warning(f'{signal.Signals(signum).name} again: already shutting down')
        stop.set()

    try:
        built = factory()  # a signal here interrupts loading (KeyboardInterrupt / default SIGTERM)
        nodes = built if isinstance(built, list) else [built]
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        executor = MultiThreadedExecutor(num_threads=max(4, 2 * len(nodes)))
        for node in nodes:
            executor.add_node(node)
        managed = [n for n in nodes if isinstance(n, LifecycleNode)]
        finalized_at = None
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.05)
            if finalized_at is None and managed and all(n.finished.is_set() for n in managed):
                finalized_at = time.monotonic()
            # spin a little longer after finalized: the transition's answer and the ended goals' results go out
            if finalized_at is not None and time.monotonic() - finalized_at > FINALIZED_LINGER_S:
                logger.info('every managed node is finalized: exiting')
                break
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except StartupError as exc:
        logger.fatal(str(exc))
        code = 1
    except Exception as exc:  # a defect: one clear line, and the robot is still held below
        logger.fatal(f'{type(exc).__name__}: {exc}')
        code = 1
    for node in nodes:
        try:
            if not node.close():
                logger.warning(f'{node.get_name()}: a worker did not stop in time: leaving without it')
        except Exception as exc:
            logger.error(f'closing failed: {type(exc).__name__}: {exc}')
    if executor is not None and nodes:
        if not shutdown_executor(executor, timeout_sec=2.0):  # a callback stuck (in a driver, say)
            logger.error('a callback did not end within 2 s of the shutdown: leaving without it')
    for node in nodes:
        node.destroy_node()
    if rclpy.ok():  # Jazzy's try_shutdown cannot keep the handlers; shutdown can, on every distro
        try:
            rclpy.shutdown(uninstall_handlers=False)  # rclpy would put the default handlers back
        except RuntimeError:  # shut down by someone else meanwhile
            pass
    # The last hold is out and rclpy is shut down (its logging flushed): leave now. The interpreter's own
    # teardown of torch and a model took 6–12 s on a busy machine, past launch's 5 s SIGINT window (then
    # SIGTERM, then SIGKILL); a worker still inside the model (not clean) must not be waited for either.
    leave(code)
    return code  # not reached


def leave(code: int) -> None:
    """Exit at once with ``code``: Python's and C's output buffers flushed, no interpreter teardown."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # nothing interrupts the last flush
        signal.signal(sig, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    if sys.platform.startswith('linux'):
        import ctypes

        ctypes.CDLL(None).fflush(None)  # rcutils writes its log lines with C stdio
    os._exit(code)


class GuardedLifecycleNode(GuardedNode, LifecycleNode):
    """A managed (lifecycle) node whose callbacks cannot end the process either."""


def release_memory(device: str) -> None:
    """Give freed model memory back: the CUDA cache on a GPU, glibc's free lists on the host."""
    import gc

    gc.unfreeze()  # a node freezes what configure loaded (gc.freeze): the model's cycles must be collectable again
    gc.collect()
    if device.startswith('cuda'):
        import torch

        torch.cuda.empty_cache()
    if sys.platform.startswith('linux'):
        import ctypes

        ctypes.CDLL('libc.so.6').malloc_trim(0)


class StartupError(RuntimeError):
    """A configuration problem found at start-up: logged as fatal, the process exits 1."""
