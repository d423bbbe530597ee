"""Training sequences of the two tasks, built with the same prompt code the policy decodes with."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worldvla_ros.model import tokens as T
from worldvla_ros.model.action_tokenizer import ActionTokenizer
from worldvla_ros.model.attention_mask import action_attention_mask, additive_mask
from worldvla_ros.model.config import WorldVLAConfig
from worldvla_ros.model.prompts import action_prompt, world_model_prompt
from worldvla_ros.model.text_tokenizer import TextTokenizer


@dataclass
class Sample:
    ids: np.ndarray  # (L,) int64
    target: np.ndarray  # (L,) bool: the token at i is predicted (from position i − 1)
    kind: str  # 'action' or 'world'


def action_samples(blocks: Sequence[list[int]], actions: np.ndarray, instruction: str, text: TextTokenizer,
                   tok: ActionTokenizer, cfg: WorldVLAConfig, finished: bool = True) -> list[Sample]:
    """One per frame: history images + instruction → the next K actions and 8710.

    Near the end of a ``finished`` episode the chunk is completed with holds (zero motion, last
    gripper value), which is what the robot should do once the task is done; an unfinished one (a
    snippet cut off mid-task) gives samples only where a whole chunk was recorded.
    """
    out = []
    n, k = len(actions), cfg.chunk_size
    for t in range(n if finished else n - k + 1):
        history = [blocks[j] for j in range(max(0, t - cfg.history_frames + 1), t + 1)]
        prompt = action_prompt(text, history, instruction, cfg.action_prompt)
        chunk = actions[t : t + k]
        if len(chunk) < k:
            hold = np.zeros((k - len(chunk), 7))
            hold[:, 6] = actions[-1, 6]
            chunk = np.concatenate([chunk, hold])
        answer = [*tok.encode(chunk).tolist(), T.END_OF_TURN]
        ids = np.asarray(prompt + answer, dtype=np.int64)
        target = np.zeros(len(ids), dtype=bool)
        target[len(prompt) :] = True
        out.append(Sample(ids, target, 'action'))
    return out


def world_model_samples(blocks: Sequence[list[int]], actions: np.ndarray, text: TextTokenizer,
                        tok: ActionTokenizer, cfg: WorldVLAConfig, label_structure: bool = False) -> list[Sample]:
    """One per transition: IMG(t), ACT(t) → IMG(t+1).

    ``label_structure`` (the release's sequences): the answer is the whole next image block and the end of turn
    (image start, grid, codes, row ends, image end, 8710), every token of it predicted. Without it (the embedded
    default's training) only the codes are predicted: the decoder places the structure tokens itself."""
    out = []
    for t in range(len(actions) - 1):
        if t + 1 >= len(blocks):
            break
        prompt = world_model_prompt(text, blocks[t], tok.encode(actions[t : t + 1]).tolist(), cfg.world_model_prompt)
        nxt = np.asarray(blocks[t + 1], dtype=np.int64)
        if label_structure:
            nxt = np.append(nxt, T.END_OF_TURN)
        ids = np.concatenate([np.asarray(prompt, dtype=np.int64), nxt])
        target = np.zeros(len(ids), dtype=bool)
        if label_structure:
            target[len(prompt) :] = True
        else:
            body = np.zeros(len(nxt), dtype=bool)
            body[3:-1] = nxt[3:-1] != T.IMAGE_NEWLINE
            target[len(prompt) :] = body
        out.append(Sample(ids, target, 'world'))
    return out


def collate(samples: Sequence[Sample], dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, the action mask (padding masked out), positions, and target flags."""
    length = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), length), T.PAD, dtype=torch.long)
    target = torch.zeros((len(samples), length), dtype=torch.bool)
    valid = torch.zeros((len(samples), length), dtype=torch.bool)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.from_numpy(s.ids)
        target[i, : len(s.ids)] = torch.from_numpy(s.target)
        valid[i, : len(s.ids)] = True
    allowed = action_attention_mask(ids) & valid[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # padded queries attend to themselves
    positions = torch.arange(length)[None].expand(len(samples), length)
    return ids, additive_mask(allowed, dtype), positions, target
