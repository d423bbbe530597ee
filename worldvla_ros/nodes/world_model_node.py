"""World-model node: imagines the frames a chunk's actions lead to, and scores them against reality.

Runs in its own process by default so it can never slow the action node. For every new
ActionChunk (newest wins) it rolls the world model out ``horizon`` steps from the camera frame
the chunk was computed from, publishes each imagined frame stamped at the time it predicts,
and when the real frame of that time arrives publishes real | imagined | difference and the
surprise score (PSNR, SSIM).

The monitor scores what really happened: for every executed command (``worldvla/ee_command``, not
dry-run) the frame before it, the command and the frame before the next command form a transition,
and one teacher-forced forward pass gives the world model's own surprise at the real next frame
(``worldvla_ros.monitor``). With a calibration file (``evaluate_bag --calibrate-monitor``) sustained
surprise raises /diagnostics to WARN, then ERROR, and, if ``hold_on_surprise``, latches the e-stop.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.time import Time
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Float64MultiArray, Header, MultiArrayDimension, String
from worldvla.msg import ActionChunk, EndEffectorCommand

from worldvla_ros.image_conversion import ImageRejected, fill_image_msg
from worldvla_ros.metrics import psnr, side_by_side, ssim
from worldvla_ros.monitor import (
    CALIBRATION_FILE,
    LIKELIHOOD_SIGNALS,
    MOTION_SIGNALS,
    AlertState,
    Calibration,
    CalibrationError,
    excess_map,
    motion_signals,
    transition_condition,
    transition_signals,
    world_model_evidence,
)
from worldvla_ros.motion_check import counterfactual_actions, motion_features, motion_frame
from worldvla_ros.nodes.common import (
    CAMERA_PARAMETERS,
    MODEL_PARAMETERS,
    CameraInput,
    GuardedNode,
    Param,
    StartupError,
    declare_all,
    diagnostic_status,
    diagnostics_msg,
    latched_qos,
    load_node_policy,
    reject_changes_of,
    reliable_qos,
    spin_node,
)

MAX_PENDING = 256  # imagined frames waiting for their real frame (older ones are dropped first)
MAX_TRANSITIONS = 8  # real transitions waiting for the monitor (older ones are dropped first, counted)
MAX_DELIVERY_NS = 2_000_000_000  # a source timestamp further back than this is a clock apart, not a delivery
BLIND_AFTER_S = 5.0  # commands within this long, and no transition scored for this long: the monitor is blind
MONITOR_FIELDS = (*LIKELIHOOD_SIGNALS, 'frame_change', 'wm_evidence', *MOTION_SIGNALS, 'alarm', 'level')

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
    'image_decoding': Param('drafted', 'drafted: the current frame checked as a draft in long runs (the '
                            'fastest on a GPU or a small model); engine: one token a step on a static cache '
                            '(a large model on CPU); reference: transformers forward. All give the same greedy '
                            'frame (sampled: the same distribution); guidance uses the engine', read_only=True,
                            choices=('drafted', 'engine', 'reference')),
    'monitor': Param(True, "score every executed command's real outcome by the world model's likelihood (one "
                     'forward pass per transition, no generation) on worldvla/monitor and worldvla/surprise_map'),
    'monitor_counterfactuals': Param(False, 'score the real next frame under the counterfactual actions too (no '
                                     'motion, opposite, turned ±90° about z, one axis flipped, the last two '
                                     'commands) in the same forward batch: wm_evidence and the best explanation '
                                     '(about 5× the cost of the two rows; the motion check does this at a fraction '
                                     'and sees what the world model misses)'),
    'monitor_calibration': Param('', 'thresholds file from evaluate_bag --calibrate-monitor; empty: the '
                                 "checkpoint's monitor_calibration.json if it has one, else the signals are "
                                 'published but never alert', read_only=True),
    'surprise_warn_after': Param(2, 'transitions in a row above the calibrated thresholds before WARN', 1, 10000),
    'surprise_error_after': Param(5, 'transitions in a row above the calibrated thresholds before ERROR', 1, 10000),
    'hold_on_surprise': Param(False, 'at ERROR, latch the e-stop (worldvla/estop): the robot holds until '
                              'worldvla/reset_estop is called'),
}


class WorldModelNode(GuardedNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('worldvla_world_model', **kwargs)
        p = declare_all(self, PARAMETERS)
        self._guard_params = reject_changes_of({n for n, q in PARAMETERS.items() if q.read_only}, {})
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if p['surprise_error_after'] < p['surprise_warn_after']:
            raise StartupError(f'parameter surprise_error_after ({p["surprise_error_after"]}) must be ≥ '
                               f'surprise_warn_after ({p["surprise_warn_after"]}): ERROR comes after WARN')
        # the calibration before the model: a bad file fails the start at once, not after the model loaded
        self._calibration: Calibration | None = None
        calibration = p['monitor_calibration'] or ''
        shipped = Path(p['checkpoint']) / CALIBRATION_FILE
        if not calibration and shipped.is_file():
            calibration = str(shipped)
        if calibration:
            try:
                self._calibration = Calibration.load(calibration)
            except CalibrationError as exc:
                what = 'parameter monitor_calibration' if p['monitor_calibration'] else "the checkpoint's calibration"
                raise StartupError(f'{what}: {exc}') from exc
        self.policy = load_node_policy(p)
        self.policy.image_decoding = p['image_decoding']
        if self._calibration is not None:
            self.get_logger().info(f'monitor calibrated from {calibration}: false alarms '
                                   f'{self._calibration.false_alarm_rate:g} per transition')
            if not self._calibration.fits(self.policy.model_id, self.policy.weights_digest):
                self.get_logger().warning(
                    f'the monitor was calibrated for {self._calibration.model_id} (weights '
                    f'{self._calibration.weights or "?"}), not {self.policy.model_id} (weights '
                    f'{self.policy.weights_digest}): recalibrate, its false-alarm rate does not hold')
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
        # (arrival number, model-resolution crop, header, gray motion crop or None)
        self._latest: tuple[int, np.ndarray, Header, np.ndarray | None] | None = None
        self._arrivals = 0
        # (action, frame arrival, frame, motion crop, received ns), and the chain's commands before it
        self._command: tuple[np.ndarray, int, np.ndarray, np.ndarray | None, int] | None = None
        self._recent: deque[np.ndarray] = deque(maxlen=3)  # the transition's command and the two before it
        self._chain = 0  # a new chain (after a reset or a gap) restarts the sequential evidence
        self._transitions: deque[tuple] = deque(maxlen=MAX_TRANSITIONS)
        self._cusum = self._calibration.sequential() if self._calibration is not None else None
        self._cusum_chain = 0
        self._explained: dict[str, str] = {}
        # a monitor that scores nothing while the robot moves (no frames, stale frames, an instruction flood ending
        # every chain) must say so: its silence is not "as expected"
        self._last_command_at = self._last_scored_at = time.monotonic()
        self._transition_event = threading.Event()
        self._monitoring = False
        self._alerts = AlertState(int(p['surprise_warn_after']), int(p['surprise_error_after']))
        self._alert_signals: list[str] = []
        self._held_on_surprise = False
        self._last_signals: dict[str, float] = {}

        self.imagined_pub = self.create_publisher(Image, 'worldvla/imagined_image', reliable_qos(10))
        self.compare_pub = self.create_publisher(Image, 'worldvla/imagined_comparison', reliable_qos(5))
        self.surprise_pub = self.create_publisher(Float64MultiArray, 'worldvla/surprise', reliable_qos(10))
        self.monitor_pub = self.create_publisher(Float64MultiArray, 'worldvla/monitor', reliable_qos(10))
        self.map_pub = self.create_publisher(Image, 'worldvla/surprise_map', reliable_qos(5))
        # latched, so that both of the action node's e-stop readers match it; a `false` once the surprise is over
        # replaces the latched `true` (a `false` never unlatches an e-stop, a restarted action node is not stopped)
        self.estop_pub = self.create_publisher(Bool, 'worldvla/estop', latched_qos())
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', reliable_qos())
        sensors = MutuallyExclusiveCallbackGroup()
        CameraInput(self, p['use_compressed'], self._on_frame, self._on_reject, sensors)
        self.create_subscription(ActionChunk, 'worldvla/action_chunk', self._on_chunk, reliable_qos(1),
                                 callback_group=sensors)
        # a new instruction (the sims publish one per episode) ends the chain: no transition spans a reset
        self.create_subscription(String, 'instruction', self._on_instruction, latched_qos())
        self.create_subscription(EndEffectorCommand, 'worldvla/ee_command', self._on_command, reliable_qos(50),
                                 callback_group=sensors)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        self._worker = threading.Thread(target=self._serve, args=(self._chunk_event, self._next_chunk,
                                        self._imagine_next), name='worldvla-imagine', daemon=True)
        self._worker.start()
        self._monitor = threading.Thread(target=self._serve, args=(self._transition_event, self._next_transition,
                                         self._score_transition), name='worldvla-monitor', daemon=True)
        self._monitor.start()
        self.get_logger().info(f'ready: world model {self.policy.model_id} on {self.policy.device}')

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        result = self._guard_params(params)
        if not result.successful:
            return result
        new = {q.name: q.value for q in params}
        warn = new.get('surprise_warn_after', self.get_parameter('surprise_warn_after').value)
        error = new.get('surprise_error_after', self.get_parameter('surprise_error_after').value)
        if error < warn:
            return SetParametersResult(successful=False, reason=f'surprise_error_after ({error}) must be ≥ '
                                                                 f'surprise_warn_after ({warn})')
        if {'surprise_warn_after', 'surprise_error_after'} & set(new):
            with self._lock:
                self._alerts.warn_after, self._alerts.error_after = int(warn), int(error)
        return result

    def _on_reject(self, exc: ImageRejected) -> None:
        self.stats.count(f'rejected_{exc.reason}')
        self.get_logger().warning(f'rejected frame: {exc}', throttle_duration_sec=2.0)

    def _on_frame(self, rgb: np.ndarray, header: Header, _received: float) -> None:
        stamp = Time.from_msg(header.stamp).nanoseconds
        frame = self.policy.model_frame(rgb)
        gray = motion_frame(rgb) if self._cusum is not None else None
        with self._lock:
            self._frames.append((stamp, frame))
            self._arrivals += 1
            self._latest = (self._arrivals, frame, header, gray)
        self._score(stamp, frame, header)

    def _on_command(self, msg: EndEffectorCommand, info: Any) -> None:
        """A transition ends where the next command is sent: (frame before the last command, that command, the
        newest frame now), if that frame was captured after the last command was sent (its stamp, against this
        node's clock less the command's delivery time, from the publisher's source timestamp): an older one
        cannot show the command's result (a camera seeing late, with honest stamps) and is counted, not scored.
        Commands the robot does not execute (dry run) end the chain."""
        action = np.asarray(msg.action, dtype=np.float64)
        source = int(info.get('source_timestamp', 0) or 0) if isinstance(info, dict) else 0
        delivery = min(max(time.time_ns() - source, 0), MAX_DELIVERY_NS) if source > 0 else 0
        received = self.get_clock().now().nanoseconds - delivery
        self.stats.count('commands_received')
        if msg.dry_run or not np.all(np.isfinite(action)) or not self.get_parameter('monitor').value:
            with self._lock:
                self._end_chain()
            return
        self._last_command_at = time.monotonic()  # an executed command: the monitor should be scoring
        with self._lock:
            latest, last = self._latest, self._command
            self._command = None if latest is None else (action, latest[0], latest[1], latest[3], received)
            recent = list(self._recent)
            if latest is None:
                self._end_chain()
            else:
                self._recent.append(action)
        if last is None or latest is None:
            return
        if latest[0] == last[1]:
            self.stats.count('transitions_without_frame')  # no frame between the two commands
            return
        if Time.from_msg(latest[2].stamp).nanoseconds < last[4] - self._tolerance_ns():
            self.stats.count('transitions_stale_frame')  # captured before the command it should show arrived
            return
        with self._lock:
            if len(self._transitions) == self._transitions.maxlen:
                self.stats.count('transitions_dropped')
            self._transitions.append((last[2], last[0], latest[1], latest[2], last[3], latest[3], recent[:-1],
                                      self._chain))
        self._transition_event.set()

    def _end_chain(self) -> None:
        """No transition pairs what came before with what comes after (under the lock)."""
        self._command = None
        self._recent.clear()
        self._chain += 1

    def _on_instruction(self, _msg: String) -> None:
        with self._lock:
            if self._command is not None:
                self.stats.count('transitions_across_reset')  # its next frame may show another scene
            self._end_chain()

    def _next_transition(self) -> tuple | None:
        with self._lock:
            job = self._transitions.popleft() if self._transitions else None
            self._monitoring = job is not None
        return job

    def _score_transition(self, job: tuple) -> None:
        try:
            self._monitor_transition(*job)
        except Exception as exc:  # a failed score must not kill the monitor
            if self.context.ok() and self._running:
                self.stats.count('monitor_errors')
                self.get_logger().error(f'monitor failed: {exc!r}', throttle_duration_sec=2.0)
        finally:
            self._monitoring = False

    def _monitor_transition(self, frame: np.ndarray, action: np.ndarray, real: np.ndarray, header: Header,
                            gray: np.ndarray | None, gray_real: np.ndarray | None, recent: list[np.ndarray],
                            chain: int) -> None:
        """Score one real transition, publish its signals and excess-bits map, update the alert (and hold)."""
        t = time.perf_counter()
        explained: dict[str, str] = {}
        if self.get_parameter('monitor_counterfactuals').value:
            hypotheses = counterfactual_actions(action, recent)
            lik = self.policy.transition_likelihood(frame, action, real, rows=list(hypotheses.values()))
            signals = transition_signals(lik, frame, real, list(hypotheses))
            explained['world_model'] = world_model_evidence(lik, list(hypotheses))[1]
        else:
            lik = self.policy.transition_likelihood(frame, action, real)
            signals = transition_signals(lik, frame, real)
        cal = self._calibration
        if self._cusum is not None and cal is not None and cal.motion is not None and gray is not None \
                and gray_real is not None:
            if chain != self._cusum_chain:  # a new episode, instruction or chain: the evidence starts again
                self._cusum.reset()
                self._cusum_chain = chain
            found, explained['motion'] = motion_signals(cal.motion, self._cusum, motion_features(gray, gray_real),
                                                        action, recent)
            signals.update(found)
        self.stats.duration('monitor', time.perf_counter() - t)
        condition = transition_condition(action, recent[-1] if recent else None)
        above = self._calibration.alarm(signals, condition) if self._calibration is not None else []
        with self._lock:
            level = self._alerts.update(bool(above))
            self._alert_signals = above  # a raised level means this transition alarmed too
            self._last_signals = signals
            self._explained = explained
            # every transition at ERROR latches again: an e-stop reset while the surprise persists lasts until the
            # next alarmed transition; the run ends (and a `false` replaces the latched `true`) at a normal one
            hold = level == 2 and self.get_parameter('hold_on_surprise').value
            first = hold and not self._held_on_surprise
            over = level == 0 and self._held_on_surprise
            if hold:
                self._held_on_surprise = True
            elif over:
                self._held_on_surprise = False
        self.stats.count('transitions_scored')
        self._last_scored_at = time.monotonic()
        if above:
            self.stats.count('transitions_alarmed')
        out = Float64MultiArray(data=[*(signals.get(k, float('nan')) for k in MONITOR_FIELDS[:-2]),
                                      float(bool(above)), float(level)])
        out.layout.dim = [MultiArrayDimension(label=','.join(MONITOR_FIELDS), size=len(MONITOR_FIELDS),
                                              stride=len(MONITOR_FIELDS))]
        self.monitor_pub.publish(out)
        heat = fill_image_msg(Image(), excess_map(lik.bits[0], lik.expected_bits[0], self.policy.resolution))
        heat.header = header
        self.map_pub.publish(heat)
        if over:
            self.estop_pub.publish(Bool(data=False))  # clears the latched `true`; the e-stop stays latched
        if hold:
            self.estop_pub.publish(Bool(data=True))
            self.stats.count('surprise_estops_sent')
        if first:
            self.stats.count('surprise_holds')
            self.get_logger().error(f'sustained surprise ({", ".join(above)}): e-stop latched, and latched again at '
                                    'every alarmed transition while it lasts; call worldvla/reset_estop after '
                                    'checking the robot')

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

    def _serve(self, event: threading.Event, take: Callable[[], Any], handle: Callable[[Any], None]) -> None:
        """A worker thread: woken by ``event``, handles what ``take`` returns until it returns None."""
        self.policy.use_cpu_threads(self.get_parameter('cpu_threads').value)
        while self._running:
            if not event.wait(timeout=0.1):
                continue
            event.clear()
            while self._running and (job := take()) is not None:
                handle(job)

    def _next_chunk(self) -> ActionChunk | None:
        with self._lock:
            chunk, self._chunk = self._chunk, None
            self._imagining = chunk is not None
        return chunk

    def _imagine_next(self, chunk: ActionChunk) -> None:
        try:
            self._imagine_chunk(chunk)
        finally:
            self._imagining = False

    def _imagine_chunk(self, chunk: ActionChunk) -> None:
        """Roll the world model out from the chunk's frame; each imagined frame is published and scored."""
        from worldvla_ros.model import ImageSampling

        t0 = Time.from_msg(chunk.header.stamp).nanoseconds
        with self._lock:
            camera_frame = self._latest[2].frame_id if self._latest is not None and self._latest[2].frame_id \
                else 'camera'
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
                msg.header.frame_id = camera_frame  # an image of the camera: its frame, not the command's
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
            idle = self._chunk is None and not self._imagining and not self._transitions and not self._monitoring
            level, streak = self._alerts.level, self._alerts.streak
            above, last, explained = self._alert_signals, self._last_signals, self._explained
        values = {'model': self.policy.model_id, 'device': str(self.policy.device), 'idle': str(idle).lower(),
                  'frame_memory_bytes': str(held), **self.stats.snapshot()}
        msg = diagnostics_msg(self, 'worldvla: world model node', 0, 'running', values)
        cal = self._calibration
        now = time.monotonic()
        blind = now - self._last_command_at < BLIND_AFTER_S and now - self._last_scored_at > BLIND_AFTER_S
        if blind and self.get_parameter('monitor').value:
            level = max(level, 1)
            message = (f'blind: commands executed but no transition scored for {now - self._last_scored_at:.0f} s '
                       '(no frames between commands, frames stamped before their command, or instructions '
                       'ending every chain)')
            self.stats.count('blind_reports')
        elif cal is None:
            message = 'uncalibrated: signals published, no alerts (evaluate_bag --calibrate-monitor)'
        elif level:
            message = f'sustained surprise: {streak} transitions in a row above threshold ({", ".join(above)})'
        else:
            message = 'as expected'
        kv = {'calibrated': str(cal is not None).lower(), 'streak': str(streak),
              **({'false_alarm_rate': str(cal.false_alarm_rate)} if cal else {}),
              **{k: f'{v:.4g}' for k, v in last.items()},
              **{f'best_explanation_{k}': v for k, v in explained.items()},  # which action the frames show
              **({'motion_check': 'on'} if cal is not None and cal.motion is not None else {}),
              **({f'threshold_{k}': f'{v:.4g}' for k, v in cal.thresholds.items()} if cal else {})}
        msg.status.append(diagnostic_status(self, 'worldvla: world model monitor', level, message, kv))
        self.diag_pub.publish(msg)

    def close(self) -> bool:
        self._running = False
        self._cancel.set()  # an imagination in progress stops within one token
        self._chunk_event.set()
        self._transition_event.set()
        self._worker.join(timeout=2.0)
        self._monitor.join(timeout=2.0)
        return not self._worker.is_alive() and not self._monitor.is_alive()


def main(args: list[str] | None = None) -> int:
    return spin_node(WorldModelNode, args)


if __name__ == '__main__':
    raise SystemExit(main())

