"""What the graph tests share: a harness node that publishes camera/instruction/e-stop and records
every output, parameter calls through the real services, and node processes with their logs."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger
from worldvla.action import RunInstruction
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.bringup import default_config, node_command
from worldvla_ros.image_conversion import fill_image_msg
from worldvla_ros.launch_plan import NODES, NodeSpec, node_parameters, normalize_namespace, parse_value
from worldvla_ros.nodes.common import latched_qos, reliable_qos
from worldvla_ros.synthetic import SyntheticCamera


class Harness:
    """A test node: publishes camera/instruction/e-stop, records everything the nodes publish."""

    def __init__(self, context: rclpy.Context | None = None, namespace: str = '') -> None:
        self.node = rclpy.create_node('worldvla_test_harness', context=context, namespace=namespace)
        self.namespace = namespace.strip('/')
        n = self.node
        self.image_pub = n.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
        self.instruction_pub = n.create_publisher(String, 'instruction', latched_qos())
        self.estop_pub = n.create_publisher(Bool, 'worldvla/estop', latched_qos())
        self.reset_client = n.create_client(Trigger, 'worldvla/reset_estop')
        self.clients: dict[str, Any] = {}  # service name -> client, kept between calls
        self.lock = threading.RLock()  # predicates of wait_for may take it again
        self.chunks: list[ActionChunk] = []
        self.commands: list[tuple[float, EndEffectorCommand]] = []
        self.command_sent: list[tuple[float, float]] = []  # (received, sent): monotonic s, the publisher's clock s
        self.imagined: list[Image] = []
        self.surprise: list[list[float]] = []
        self.diag: dict[str, dict[str, str]] = {}
        self.diag_messages = 0
        self.sent_stamps: list[int] = []
        self.sent_frames: dict[int, np.ndarray] = {}  # stamp ns → the rgb frame (the newest 300)
        rec = self._recorder
        n.create_subscription(ActionChunk, 'worldvla/action_chunk', rec(self.chunks), reliable_qos())
        n.create_subscription(EndEffectorCommand, 'worldvla/ee_command', self._on_command, reliable_qos(100))
        n.create_subscription(Image, 'worldvla/imagined_image', rec(self.imagined), reliable_qos())
        n.create_subscription(Float64MultiArray, 'worldvla/surprise',
                              lambda m: self._add(self.surprise, list(m.data)), reliable_qos())
        n.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, reliable_qos())
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.camera = SyntheticCamera(seed=3)

    def _add(self, store: list, item: Any) -> None:
        with self.lock:
            store.append(item)

    def _on_command(self, m: EndEffectorCommand, info: dict[str, Any]) -> None:  # rclpy's MessageInfo (Kilted names it)
        now = time.monotonic()
        with self.lock:
            self.commands.append((now, m))
            # when the node sent it (the middleware's source timestamp): a busy harness receives late, the node's
            # own sending intervals are these
            self.command_sent.append((now, info['source_timestamp'] * 1e-9))

    def _recorder(self, store: list) -> Callable:
        return lambda m: self._add(store, m)

    def _on_diag(self, m: DiagnosticArray) -> None:
        merged: dict[str, dict[str, str]] = {}  # a node may report several statuses (the world model's monitor)
        for s in m.status:
            merged.setdefault(s.hardware_id, {}).update({kv.key: kv.value for kv in s.values})
        with self.lock:
            self.diag.update(merged)
            self.diag_messages += 1

    def settled_counter(self, node: str, key: str, timeout: float = 10.0) -> int:
        """A /diagnostics value from a message published after this call, so it counts what happened before."""
        with self.lock:
            seen = self.diag_messages
        assert self.wait_for(lambda: self.diag_messages >= seen + 2, timeout, frames=False), 'no diagnostics'
        return self.counter(node, key)

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def frame_msg(self, stamp_offset: float = 0.0) -> Image:
        self._last_frame = self.camera.step(np.zeros(7))
        msg = fill_image_msg(Image(), self._last_frame)
        msg.header.stamp = Time(nanoseconds=self.now_ns() + int(stamp_offset * 1e9)).to_msg()
        msg.header.frame_id = 'camera_optical'
        return msg

    def send_frame(self, stamp_offset: float = 0.0) -> int:
        msg = self.frame_msg(stamp_offset)
        self.image_pub.publish(msg)
        stamp = Time.from_msg(msg.header.stamp).nanoseconds
        self.sent_stamps.append(stamp)
        self.sent_frames[stamp] = self._last_frame
        while len(self.sent_frames) > 300:
            del self.sent_frames[next(iter(self.sent_frames))]
        return stamp

    def stream(self, seconds: float, hz: float = 10.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.send_frame()
            time.sleep(1.0 / hz)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, hz: float = 10.0,
                 frames: bool = True) -> bool:
        """Stream camera frames (unless ``frames`` is false) until the predicate holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if predicate():
                    return True
            if frames:
                self.send_frame()
            time.sleep(1.0 / hz)
        return False

    def counter(self, node: str, key: str) -> int:
        """A /diagnostics value of ``node`` in the harness's namespace."""
        name = f'{self.namespace}/{node}' if self.namespace else node
        with self.lock:
            return int(self.diag.get(name, {}).get(key, 0))

    def set_parameter(self, node: str, name: str, value: Any):
        """One parameter through the node's real SetParameters service; the SetParametersResult."""
        return self.set_parameters(node, {name: value})

    def set_parameters(self, node: str, values: dict[str, Any], atomically: bool = False):
        """Parameters through the node's real SetParameters(Atomically) service: the first result."""
        from rcl_interfaces.srv import SetParameters, SetParametersAtomically
        from rclpy.parameter import Parameter

        srv, suffix = (SetParametersAtomically, 'set_parameters_atomically') if atomically else (
            SetParameters, 'set_parameters')
        request = srv.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        response = self._call(srv, f'{node}/{suffix}', request)
        return response.result if atomically else response.results[0]

    def get_parameter(self, node: str, name: str) -> Any:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        response = self._call(GetParameters, f'{node}/get_parameters', GetParameters.Request(names=[name]))
        return parameter_value_to_python(response.values[0])

    def _call(self, srv: Any, name: str, request: Any, tries: int = 3) -> Any:
        """An idempotent service call, the client kept for the next one: a fresh client's first request can be
        answered before the server has matched its response reader, which a starved CI machine hits; such a
        lost response is asked again."""
        client = self.clients.get(name)
        if client is None:
            client = self.clients[name] = self.node.create_client(srv, name)
        assert client.wait_for_service(timeout_sec=10), f'{name} not available'
        for _ in range(tries):
            try:
                response = client.call(request, timeout_sec=10)
            except TimeoutError:  # Kilted raises where Jazzy returns None
                response = None
            if response is not None:
                return response
        raise AssertionError(f'{name}: no answer to {tries} requests in {10 * tries} s')

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.node.destroy_node()


class NodeProcess:
    """One worldvla executable in its own process, its log in a file (``log()`` reads it)."""

    def __init__(self, executable: str, log_dir: Path, params: dict[str, str], config: Any = (),
                 namespace: str = '', env: dict[str, str] | None = None) -> None:
        self.log_path = Path(log_dir) / f'{executable}-{time.monotonic_ns()}.log'
        self._log = open(self.log_path, 'w')
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'RCUTILS_COLORIZED_OUTPUT': '0', **(env or {})}
        name, ns = NODES[executable], normalize_namespace(namespace)
        values = {**node_parameters(list(config), name, ns), **{k: parse_value(v) for k, v in params.items()}}
        self.command = node_command(NodeSpec(executable, name, ns, values), Path(log_dir))
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int = signal.SIGINT) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGINT)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class SpinningSafeActionClient(ActionClient):
    """An ActionClient that may be used from a thread while another thread spins its node. Two rclpy races:
    Kilted adds the client to the node's waitables before it creates its lock (an executor that looks in
    between dies with AttributeError '_lock'); Jazzy's client registers a request's sequence number after
    sending it, so an answer the executor takes first is dropped ("Ignoring unexpected goal response") and
    the future never completes (ros2/rclpy#1123, fixed in later releases). Requests are registered under a
    lock that the executor waits for before it handles an answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()  # rclpy replaces it at the end of __init__; until then this one serves
        self._requests = threading.RLock()
        super().__init__(*args, **kwargs)

    def send_goal_async(self, *args: Any, **kwargs: Any):
        with self._requests:
            return super().send_goal_async(*args, **kwargs)

    def _cancel_goal_async(self, *args: Any, **kwargs: Any):
        with self._requests:
            return super()._cancel_goal_async(*args, **kwargs)

    def _get_result_async(self, *args: Any, **kwargs: Any):
        with self._requests:
            return super()._get_result_async(*args, **kwargs)

    async def execute(self, taken_data: Any) -> None:
        with self._requests:  # a request being sent is registered before its answer is looked up
            pass
        return await super().execute(taken_data)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


@contextmanager
def action_node_graph(checkpoint: Path, log_dir: Path, params: dict[str, str],
                      ready: Callable[[Harness], Any], what: str) -> Iterator[tuple[Harness, NodeProcess, Any]]:
    """An enabled 10 Hz action node in its own process and a harness; ``ready(harness)`` must pass (its
    result is yielded) or the test fails with ``what`` and the node's log."""
    node = NodeProcess('action_node', log_dir, {
        'checkpoint': str(checkpoint), 'device': 'cpu', 'enabled': 'true', 'control_rate_hz': '10.0',
        'max_obs_age': '2.0', 'watchdog_timeout': '2.0', **params}, config=[default_config()])
    rclpy.init()
    h = Harness()
    try:
        extra = ready(h)
    except AssertionError as exc:
        h.close()
        rclpy.shutdown()
        node.stop()
        pytest.fail(f'{what}: {exc}\n{node.log()[-3000:]}')
    try:
        yield h, node, extra
    finally:
        h.close()
        rclpy.shutdown()
        node.stop()


@contextmanager
def task_action_graph(checkpoint: Path, log_dir: Path, params: dict[str, str]
                      ) -> Iterator[tuple[Harness, GoalClient, NodeProcess]]:
    """``action_node_graph`` with a RunInstruction client and a success topic (``h.success_pub`` on test/success)."""
    def goal_client(h: Harness) -> GoalClient:
        h.success_pub = h.node.create_publisher(Bool, 'test/success', reliable_qos(10))
        return GoalClient(h)

    with action_node_graph(checkpoint, log_dir, {'success_topic': 'test/success', **params}, goal_client,
                           'the action node offers no task action') as (h, node, goals):
        yield h, goals, node


class GoalClient:
    """An action client on the harness node; every time is taken in the harness's executor thread,
    in the same order as the commands it records."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        deep = reliable_qos(1000)  # the answers to a burst of requests are queued here, not overwritten
        self.client = SpinningSafeActionClient(h.node, RunInstruction, 'worldvla/run_instruction',
                                               goal_service_qos_profile=deep, result_service_qos_profile=deep,
                                               cancel_service_qos_profile=deep)
        self.feedback: list[RunInstruction.Feedback] = []
        assert self.client.wait_for_server(timeout_sec=30), 'no worldvla/run_instruction server'

    def send(self, instruction: str, max_steps: int = 0, time_limit: float = 0.0):
        """(goal handle, monotonic time the accept/reject answer arrived)."""
        answered: list[float] = []
        goal = RunInstruction.Goal(instruction=instruction, max_steps=max_steps, time_limit=time_limit)
        future = self.client.send_goal_async(goal, feedback_callback=lambda m: self.h._add(self.feedback, m.feedback))
        future.add_done_callback(lambda _f: answered.append(time.monotonic()))
        assert wait_until(lambda: bool(answered), 20), 'no answer to the goal request'
        return future.result(), answered[0]

    def cancel(self, handle) -> float:
        answered: list[float] = []
        handle.cancel_goal_async().add_done_callback(lambda _f: answered.append(time.monotonic()))
        assert wait_until(lambda: bool(answered), 20), 'no answer to the cancel request'
        return answered[0]

    def result(self, handle, timeout: float = 60.0):
        """(result, status, monotonic time it arrived); camera frames keep coming meanwhile."""
        arrived: list[float] = []
        future = handle.get_result_async()
        future.add_done_callback(lambda _f: arrived.append(time.monotonic()))
        assert self.h.wait_for(lambda: bool(arrived), timeout), 'no goal result'
        response = future.result()
        return response.result, response.status, arrived[0]
