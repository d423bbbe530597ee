"""Lockstep replay: every frame of an episode, in order, through the action node's own pipeline.

Frames were decoded by ``image_msg_to_rgb`` (the node's conversion), the history window and the
call are the node's (``policy.predict`` on the newest ``history_frames``), and the node's
``SafetyFilter`` with the YAML's limits turns the model output into commands. Deterministic:
one chunk is computed at its frame, executed until the next chunk, and no frame is dropped.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from worldvla_ros.metrics import psnr, ssim
from worldvla_ros.model.image_tokenizer import to_model_frame
from worldvla_ros.model.policy import WorldVLAPolicy
from worldvla_ros.safety import SafetyFilter, UnsafeChunk, at_rest

from .episode import Episode
from .scoring import ChunkRecord, ImaginedFrame, RunRecord, executed_from_chunks


@dataclass
class LockstepSettings:
    replan_every: int = 0  # frames between chunks; 0 = when the chunk's actions run out
    batched: bool = True
    world_model: bool = True
    wm_horizon: int = 1  # imagined frames per rollout (recorded actions, scored against recorded frames)
    wm_every: int = 1  # roll out from every n-th chunk's frame
    strip_frames: int = 6  # real/imagined pairs kept for the report
    chunk_merge: str = 'replace'  # a new chunk vs the queued actions: replace | ensemble (chunk_merge.py)
    ensemble_decay: float = 0.01


def evaluate_lockstep(
    policy: WorldVLAPolicy,
    episode: Episode,
    safety: SafetyFilter,
    settings: LockstepSettings,
    progress: Callable[[int], None] | None = None,
) -> RunRecord:
    n = len(episode.frames)
    hist = policy.config.history_frames
    run = RunRecord(episode.name, 'lockstep', episode.actions, times_s=episode.times_s)
    run.counts = {'frames': n, 'frames_dropped': 0, 'frames_stale': 0,
                  **{f'frames_rejected_{k}': v for k, v in episode.rejected_frames.items()}}
    previous = at_rest()  # as the node: the first command ramps up from no motion
    next_query = 0
    for f in range(n):
        if f == next_query:
            window = episode.frames[max(0, f - hist + 1) : f + 1]
            pred = policy.predict(window, episode.instruction, batched=settings.batched)
            try:
                safe, changed = safety.apply(pred.actions, previous)
            except UnsafeChunk:
                run.counts['unsafe_chunks'] = run.counts.get('unsafe_chunks', 0) + 1
                next_query = f + 1
                continue
            run.counts['values_limited'] = run.counts.get('values_limited', 0) + changed
            run.chunks.append(ChunkRecord(f, safe, pred.actions, pred.timing.total_s))
            step = settings.replan_every or len(safe)
            previous = safe[min(step, len(safe)) - 1]
            next_query = f + step
            if settings.world_model and (len(run.chunks) - 1) % settings.wm_every == 0:
                _rollout(policy, episode, f, settings, run)
        if progress:
            progress(1)
    run.executed = executed_from_chunks(run.chunks, n, settings.chunk_merge, settings.ensemble_decay)
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
