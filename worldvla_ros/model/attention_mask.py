"""The WorldVLA action attention mask (paper §3.3): actions of a chunk never see each other."""
from __future__ import annotations

import torch

from . import tokens as T


def action_attention_mask_rows(input_ids: torch.Tensor, q_start: int) -> torch.Tensor:
    """Rows ``q_start … L-1`` of the mask: (B, L) ids → (B, L - q_start, L) bool (True = attend).

    Decoding with a KV cache needs only the rows of the new positions.
    """
    if input_ids.ndim != 2:
        raise ValueError(f'input_ids must be (B, L), got {tuple(input_ids.shape)}')
    b, length = input_ids.shape
    pos = torch.arange(length, device=input_ids.device)
    none = torch.full((b, length), -1, dtype=torch.long, device=input_ids.device)
    everywhere = pos.expand(b, length)
    # a block opens at 10004 and runs to its 15004 (or to the next 10004, or to the end)
    block_start = torch.cummax(torch.where(input_ids == T.ACTION_START, everywhere, none), dim=1).values
    is_end = input_ids == T.ACTION_END
    end_before = torch.cummax(torch.where(is_end, everywhere, none), dim=1).values
    end_before = torch.where(is_end, torch.cat([none[:, :1], end_before[:, :-1]], dim=1), end_before)
    in_block = block_start > end_before
    block_id = torch.where(in_block, block_start, none)  # a block is named by its start position
    last_image_end = torch.where(input_ids == T.IMAGE_END, everywhere, none).max(1).values
    restricted = in_block & (block_start > last_image_end[:, None])  # actions of the chunk

    q = slice(q_start, length)
    causal = pos[None, :] <= pos[q, None]  # (Q, L)
    other_action = in_block[:, None, :] & (block_id[:, None, :] != block_id[:, q, None])  # (B, Q, L)
    return causal[None] & ~(restricted[:, q, None] & other_action)


def causal_mask_rows(input_ids: torch.Tensor, q_start: int) -> torch.Tensor:
    """Plain causal rows (the ablation without the action mask): (B, L) → (B, L - q_start, L)."""
    b, length = input_ids.shape
    pos = torch.arange(length, device=input_ids.device)
    return (pos[None, :] <= pos[q_start:, None])[None].expand(b, -1, -1)


def action_attention_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids → (B, L, L) bool, True where query i may attend to key j.

    Start from the causal mask. A token inside an action block (``10004 … 15004``) that starts
    after the end of the last image block may not attend to any other action block, so every
    action of a chunk sees BOS, text and images and its own earlier tokens only. World-model
    sequences, whose action precedes the last image, stay plainly causal.
    """
    return action_attention_mask_rows(input_ids, 0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) bool → (B, 1, Q, K) additive float mask that eager and sdpa attention both take."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)[:, None]
