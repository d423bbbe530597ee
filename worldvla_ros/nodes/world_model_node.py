"""World-model node: imagines the frames a chunk's actions lead to, and scores them against reality.

Runs in its own process by default so it can never slow the action node. For every new
ActionChunk (newest wins) it rolls the world model out ``horizon`` steps from the camera frame
the chunk was computed from, publishes each imagined frame stamped at the time it predicts,
and when the real frame of that time arrives publishes real | imagined | difference and the
surprise score (PSNR, SSIM).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.time import Time
from sensor_msgs.msg import Image
from std_msgs.msg import Float64MultiArray, Header, MultiArrayDimension
from worldvla.msg import ActionChunk

from worldvla_ros.image_conversion import ImageRejected, fill_image_msg
from worldvla_ros.metrics import psnr, side_by_side, ssim
from worldvla_ros.nodes.common import (
    CAMERA_PARAMETERS,
    MODEL_PARAMETERS,
    CameraInput,
    GuardedNode,
    Param,
    declare_all,
    diagnostics_msg,
    load_node_policy,
    reject_changes_of,
    reliable_qos,
    spin_node,
)

MAX_PENDING = 256  # imagined frames waiting for their real frame (older ones are dropped first)

PARAMETERS: dict[str, Param] = {
    **MODEL_PARAMETERS,
    **CAMERA_PARAMETERS,
    'horizon': Param(1, 'imagined frames per chunk (one per action, from the chunk start)', 1, 64),
    'control_rate_hz': Param(10.0, 'rate the chunk is executed at: imagined frame i is stamped t0 + i/rate',
                             0.5, 500.0),
    'match_tolerance': Param(0.05, 'seconds; a real frame this close to a predicted stamp is compared',
                             0.0, 10.0),
    'history_size': Param(64, 'camera frames kept (as model-resolution crops, R×R×3 bytes each) to find '
                          'the frame a chunk was computed from', 2, 10000, read_only=True),
    'temperature': Param(0.0, 'world-model sampling temperature; 0 = greedy (the release)', 0.0, 10.0),
    'top_k': Param(0, 'top-k for sampling; 0 = none', 0, 8192),
    'cfg_scale': Param(1.0, 'classifier-free guidance scale; 1 = none', 0.0, 20.0),
    'image_decoding': Param('drafted', 'drafted: greedy checked against the current frame in long runs (the '
                            'fastest on a GPU or a small model); engine: one token a step on a static cache '
                            '(a large model on CPU); reference: transformers forward. All give the same greedy '
                            'frame; sampling and guidance use the engine', read_only=True,
                            choices=('drafted', 'engine', 'reference')),
}


class WorldModelNode(GuardedNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('worldvla_world_model', **kwargs)
        p = declare_all(self, PARAMETERS)
        self.add_on_set_parameters_callback(reject_changes_of({n for n, q in PARAMETERS.items() if q.read_only}, {}))
        self.policy = load_node_policy(p)
        self.policy.image_decoding = p['image_decoding']
        self._lock = threading.Lock()
        # (stamp ns, model-resolution crop): all the model and the scoring read of a frame, so memory is
        # history_size × R²×3 bytes whatever the camera's resolution
        self._frames: deque[tuple[int, np.ndarray]] = deque(maxlen=int(p['history_size']))
        self._pending: deque[tuple[int, int, np.ndarray]] = deque(maxlen=MAX_PENDING)  # (stamp ns, step, imagined)
        self._chunk: ActionChunk | None = None
        self._chunk_event = threading.Event()
        self._cancel = threading.Event()
        self._running = True
        self._imagining = False

        self.imagined_pub = self.create_publisher(Image, 'worldvla/imagined_image', reliable_qos(10))
        self.compare_pub = self.create_publisher(Image, 'worldvla/imagined_comparison', reliable_qos(5))
        self.surprise_pub = self.create_publisher(Float64MultiArray, 'worldvla/surprise', reliable_qos(10))
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', reliable_qos())
        sensors = MutuallyExclusiveCallbackGroup()
        CameraInput(self, p['use_compressed'], self._on_frame, self._on_reject, sensors)
        self.create_subscription(ActionChunk, 'worldvla/action_chunk', self._on_chunk, reliable_qos(1),
                                 callback_group=sensors)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        self._worker = threading.Thread(target=self._imagine_loop, name='worldvla-imagine', daemon=True)
        self._worker.start()
        self.get_logger().info(f'ready: world model {self.policy.model_id} on {self.policy.device}')

    def _on_reject(self, exc: ImageRejected) -> None:
        self.stats.count(f'rejected_{exc.reason}')
        self.get_logger().warning(f'rejected frame: {exc}', throttle_duration_sec=2.0)

    def _on_frame(self, rgb: np.ndarray, header: Header, _received: float) -> None:
        stamp = Time.from_msg(header.stamp).nanoseconds
        frame = self.policy.model_frame(rgb)
        with self._lock:
            self._frames.append((stamp, frame))
        self._score(stamp, frame, header)

    def _on_chunk(self, msg: ActionChunk) -> None:
        if len(msg.commands) == 0:
            self.stats.count('rejected_empty_chunk')
            return
        with self._lock:
            if self._chunk is not None:
                self.stats.count('chunks_skipped')  # a newer chunk replaces one not yet imagined
            self._chunk = msg
        self._chunk_event.set()

    def _frame_at(self, stamp_ns: int) -> np.ndarray | None:
        tol = int(self._tolerance_ns())
        with self._lock:
            best = min(self._frames, key=lambda f: abs(f[0] - stamp_ns), default=None)
        if best is None or abs(best[0] - stamp_ns) > max(tol, 1):
            return None
        return best[1]

    def _tolerance_ns(self) -> float:
        return self.get_parameter('match_tolerance').value * 1e9

    def _imagine_loop(self) -> None:
        self.policy.use_cpu_threads(self.get_parameter('cpu_threads').value)
        while self._running:
            if not self._chunk_event.wait(timeout=0.1):
                continue
            self._chunk_event.clear()
            with self._lock:
                chunk, self._chunk = self._chunk, None
                self._imagining = chunk is not None
            if chunk is None:
                continue
            try:
                self._imagine_chunk(chunk)
            finally:
                self._imagining = False

    def _imagine_chunk(self, chunk: ActionChunk) -> None:
        """Roll the world model out from the chunk's frame; each imagined frame is published and scored."""
        from worldvla_ros.model import ImageSampling

        t0 = Time.from_msg(chunk.header.stamp).nanoseconds
        start = self._frame_at(t0)
        deadline = time.monotonic() + 0.5  # the chunk may overtake its frame between processes
        while start is None and time.monotonic() < deadline and self._running:
            time.sleep(0.01)
            start = self._frame_at(t0)
        if start is None:
            self.stats.count('chunks_without_frame')
            self.get_logger().warning('no camera frame with the chunk’s stamp; skipping', throttle_duration_sec=2.0)
            return
        g = self.get_parameter
        sampling = ImageSampling(g('temperature').value, g('top_k').value, g('cfg_scale').value)
        period = 1e9 / g('control_rate_hz').value
        actions = np.array([c.action for c in chunk.commands])[: g('horizon').value]
        frame = start
        try:
            for step, action in enumerate(actions, start=1):
                if not self._running:
                    return
                t = time.perf_counter()
                frame = self.policy.imagine(frame, action, sampling, self._cancel)
                self.stats.latency(time.perf_counter() - t)
                stamp_ns = t0 + round(step * period)
                msg = fill_image_msg(Image(), frame)
                msg.header.stamp = Time(nanoseconds=stamp_ns).to_msg()
                msg.header.frame_id = chunk.header.frame_id or 'camera'
                self.imagined_pub.publish(msg)
                self.stats.count('frames_imagined')
                with self._lock:
                    self._pending.append((stamp_ns, step, frame))
                real = self._frame_at(stamp_ns)  # the real frame may already be here
                if real is not None:
                    self._score(stamp_ns, real, msg.header)
        except Exception as exc:  # a failed rollout must not kill the worker
            if not self.context.ok() or not self._running:
                return  # shutting down (a cancelled decoding ends here)
            self.stats.count('imagine_errors')
            self.get_logger().error(f'imagination failed: {exc!r}', throttle_duration_sec=2.0)

    def _score(self, stamp_ns: int, real: np.ndarray, header: Any) -> None:
        tol = self._tolerance_ns()
        horizon_ns = 2 * 1e9  # predictions older than this without a matching frame are dropped
        with self._lock:
            matched = [p for p in self._pending if abs(p[0] - stamp_ns) <= tol]
            kept = [p for p in self._pending if abs(p[0] - stamp_ns) > tol and stamp_ns - p[0] <= horizon_ns]
            self._pending = deque(kept, maxlen=MAX_PENDING)
        for _, step, imagined in matched:  # ``real`` is already the model-resolution crop
            p, s = psnr(real, imagined), ssim(real, imagined)
            score = Float64MultiArray(data=[float(step), p if np.isfinite(p) else 100.0, s])
            score.layout.dim = [MultiArrayDimension(label='horizon_step,psnr_db,ssim', size=3, stride=3)]
            self.surprise_pub.publish(score)
            cmp_msg = fill_image_msg(Image(), side_by_side(real, imagined))
            cmp_msg.header = header
            self.compare_pub.publish(cmp_msg)
            self.stats.count('frames_scored')

    def _publish_diagnostics(self) -> None:
        with self._lock:
            held = sum(f.nbytes for _, f in self._frames) + sum(f.nbytes for *_, f in self._pending)
            idle = self._chunk is None and not self._imagining
        values = {'model': self.policy.model_id, 'device': str(self.policy.device), 'idle': str(idle).lower(),
                  'frame_memory_bytes': str(held), **self.stats.snapshot()}
        self.diag_pub.publish(diagnostics_msg(self, 'worldvla: world model node', 0, 'running', values))

    def close(self) -> bool:
        self._running = False
        self._cancel.set()  # an imagination in progress stops within one token
        self._chunk_event.set()
        self._worker.join(timeout=2.0)
        return not self._worker.is_alive()


def main(args: list[str] | None = None) -> int:
    return spin_node(WorldModelNode, args)


if __name__ == '__main__':
    raise SystemExit(main())

