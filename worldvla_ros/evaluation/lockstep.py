"""Lockstep replay: every frame of an episode, in order, through the action node's own control loop.

Frames were decoded by ``image_msg_to_rgb`` (the node's conversion); the controller is the node's
(``worldvla_ros.control``), with the YAML's settings and limits, driven one control period per frame by
``SynchronousLoop``: the frame, the model if the controller asks for a chunk (greedy, answering within the
period), then the tick's command — what the node sends, holds included, merging and limits at send time.
Deterministic, as fast as the model runs, no frame dropped.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from worldvla_ros.control import Chunk, Controller, ControlSettings, Tally
from worldvla_ros.control.loop import SynchronousLoop
from worldvla_ros.image_conversion import to_model_frame
from worldvla_ros.metrics import psnr, ssim
from worldvla_ros.model.policy import WorldVLAPolicy
from worldvla_ros.safety import SafetyLimits

from .episode import Episode
from .scoring import ChunkRecord, ExecutedAction, ImaginedFrame, RunRecord


@dataclass
class LockstepSettings:
    batched: bool = True
    world_model: bool = True
    wm_horizon: int = 1  # imagined frames per rollout (recorded actions, scored against recorded frames)
    wm_every: int = 1  # roll out from every n-th chunk's frame
    strip_frames: int = 6  # real/imagined pairs kept for the report


def evaluate_lockstep(policy: WorldVLAPolicy, episode: Episode, limits: SafetyLimits, control: ControlSettings,
                      settings: LockstepSettings, progress: Callable[[int], None] | None = None) -> RunRecord:
    """``control``: the action node's settings (its YAML, with any override: replanning, chunk merge)."""
    n = len(episode.frames)
    run = RunRecord(episode.name, 'lockstep', episode.actions, times_s=episode.times_s)
    tally = Tally()
    ctrl = Controller(replace(control, history_frames=policy.config.history_frames, enabled=True), limits, tally)
    ctrl.set_instruction(episode.instruction)
    ctrl.activate()
    index = {int(t): i for i, t in enumerate(episode.frame_ns)}

    def infer(request):
        pred = policy.predict(request.frames, request.instruction, batched=settings.batched)
        return pred.actions, pred.timing.total_s

    def on_chunk(chunk: Chunk) -> None:
        f = index[chunk.stamp_ns]
        run.chunks.append(ChunkRecord(f, chunk.safe, chunk.raw, chunk.latency_s))
        if settings.world_model and (len(run.chunks) - 1) % settings.wm_every == 0:
            _rollout(policy, episode, f, settings, run)

    loop = SynchronousLoop(ctrl, infer, on_chunk=on_chunk)
    for i in range(n):
        cmd = loop.step(episode.frames[i], int(episode.frame_ns[i]))
        if cmd is not None:
            seam = not cmd.hold and cmd.index == 0 and cmd.chunk_sequence > 0
            run.executed.append(ExecutedAction(i, np.asarray(cmd.action, dtype=np.float64), seam))
            run.commands.append(cmd)
        if progress:
            progress(1)
    c = tally.counts
    run.counts = {'frames': n, 'frames_dropped': c['frames_dropped'], 'frames_stale': c['rejected_stale'],
                  'values_limited': c['values_limited'], 'unsafe_chunks': c['rejected_unsafe_chunk'],
                  'holds': sum(v for k, v in c.items() if k.startswith('holds_')),
                  **{f'frames_rejected_{k}': v for k, v in episode.rejected_frames.items()}}
    return run


def _rollout(policy: WorldVLAPolicy, episode: Episode, f: int, settings: LockstepSettings, run: RunRecord) -> None:
    """Imagine frames f+1 … f+H from frame f and the recorded actions, score them against the bag."""
    h = min(settings.wm_horizon, len(episode.frames) - 1 - f)
    actions = episode.actions[f : f + h]
    if h <= 0 or np.isnan(actions[:, :6]).any():
        return
    actions = np.nan_to_num(actions)
    imagined = policy.imagine_rollout(episode.frames[f], actions)
    res = policy.config.resolution
    observed = to_model_frame(episode.frames[f], res, rotate_180=False)
    for step, frame in enumerate(imagined, start=1):
        real = to_model_frame(episode.frames[f + step], res, rotate_180=False)
        run.imagined.append(ImaginedFrame(step, psnr(real, frame), ssim(real, frame),
                                          psnr(real, observed), ssim(real, observed)))
        if step == 1 and len(run.strip) < settings.strip_frames:
            run.strip.append((f + 1, real, frame))
