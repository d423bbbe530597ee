"""The one backbone training loop: training from scratch (``worldvla_train``) and fine-tuning
(``worldvla_finetune``) both step a ``Trainer``.

A step draws one global batch of sample indices from a seeded generator that every process holds
alike, splits it into ``accumulation`` micro-batches and each of those across the ``world``
processes, and normalizes every token's loss by the token count of the whole global batch (times
``world``, which DDP's gradient mean divides out again). So one process, or N under torchrun, or
any accumulation, computes the same gradient for the same seed and global batch.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonForConditionalGeneration

from worldvla_ros.model import tokens as T

from .sequences import Sample, collate


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 24  # global: over accumulation and processes
    lr: float = 2e-3
    seed: int = 0
    bf16: bool = True  # autocast the forward pass; weights and optimizer stay float32
    bin_sigma: float = 0.0  # > 0: Gaussian targets over neighbouring action bins (σ in bins)
    world_fraction: float | None = None  # share of world-model samples per batch; None: as the data holds them
    accumulation: int = 1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    zero_other_rows: bool = True  # from scratch: output rows of tokens never emitted stay zero


class EmitHead(nn.Module):
    """The backbone's forward for training: hidden states, then logits over the emittable tokens only
    (one module, so that DDP/FSDP wrap exactly what runs)."""

    def __init__(self, lm: ChameleonForConditionalGeneration, emit: torch.Tensor) -> None:
        super().__init__()
        self.lm = lm
        self.register_buffer('emit', emit, persistent=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, b: torch.Tensor,
                q: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        return F.linear(hidden[b, q], self.lm.lm_head.weight[self.emit]).float()


def soft_targets(token_ids: torch.Tensor, labels: torch.Tensor, to_emit: torch.Tensor, n_emit: int,
                 sigma: float) -> torch.Tensor:
    """(N,) target ids → (N, n_emit) distributions: one-hot, but a Gaussian over the bins for action bins."""
    soft = F.one_hot(labels, n_emit).float()
    is_bin = (token_ids >= T.ACTION_BIN_FIRST) & (token_ids <= T.ACTION_BIN_LAST)
    if is_bin.any():
        bins = to_emit[T.ACTION_BIN_FIRST : T.ACTION_BIN_LAST + 1]
        centre = (token_ids[is_bin] - T.ACTION_BIN_FIRST).float()[:, None]
        gauss = torch.exp(-0.5 * ((torch.arange(len(bins), device=soft.device)[None] - centre) / sigma) ** 2)
        rows = torch.nonzero(is_bin)[:, 0]
        soft[rows] = 0.0
        soft[rows[:, None], bins[None]] = gauss / gauss.sum(1, keepdim=True)
    return soft


def sample_drawer(samples: Sequence[Sample], batch_size: int, world_fraction: float | None,
                  rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """Indices of one batch: uniform over ``samples``, or ``world_fraction`` of it world-model samples."""
    if world_fraction is None:
        return lambda: rng.integers(0, len(samples), batch_size)
    if not 0.0 <= world_fraction <= 1.0:
        raise ValueError(f'world_fraction must lie in [0, 1], got {world_fraction}')
    world = np.array([i for i, s in enumerate(samples) if s.kind == 'world'], dtype=np.int64)
    action = np.array([i for i, s in enumerate(samples) if s.kind == 'action'], dtype=np.int64)
    n_world = round(world_fraction * batch_size)
    if (n_world and not len(world)) or (n_world < batch_size and not len(action)):
        raise ValueError(f'world_fraction {world_fraction} needs both kinds of samples; '
                         f'have {len(world)} world-model and {len(action)} action samples')
    return lambda: np.concatenate([rng.choice(world, n_world), rng.choice(action, batch_size - n_world)])


def n_targets(s: Sample) -> int:
    return int(s.target[1:].sum())


class Trainer:
    """``module`` runs the forward (an ``EmitHead``, or it wrapped in DDP/FSDP); ``lm`` is the model under it."""

    def __init__(self, module: nn.Module, lm: ChameleonForConditionalGeneration, samples: Sequence[Sample],
                 emit: torch.Tensor, settings: TrainSettings, rank: int = 0, world: int = 1) -> None:
        s = settings
        per_step = s.accumulation * world
        if s.batch_size % per_step:
            raise ValueError(f'batch size {s.batch_size} is not a multiple of accumulation × processes ({per_step})')
        self.module, self.lm, self.samples, self.s, self.rank, self.world = module, lm, samples, s, rank, world
        self.device = lm.lm_head.weight.device
        self.emit = emit.to(self.device)
        self.to_emit = torch.full((T.VOCAB_SIZE,), -1, dtype=torch.long, device=self.device)
        self.to_emit[self.emit] = torch.arange(len(self.emit), device=self.device)
        if s.zero_other_rows:
            self.keep = torch.zeros(lm.lm_head.weight.shape[0], dtype=torch.bool, device=self.device)
            self.keep[self.emit] = True
            self._zero_other_rows()
        self.params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.opt = torch.optim.AdamW([{'params': decay, 'weight_decay': s.weight_decay},
                                      {'params': no_decay, 'weight_decay': 0.0}], lr=s.lr, betas=(0.9, 0.95))
        warmup = max(1, round(s.steps * s.warmup_fraction))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / s.steps))))
        torch.manual_seed(s.seed)
        self.rng = np.random.default_rng(s.seed)
        self.draw = sample_drawer(samples, s.batch_size, s.world_fraction, self.rng)
        self.step_done = 0

    def _zero_other_rows(self) -> None:
        with torch.no_grad():
            self.lm.lm_head.weight[~self.keep] = 0.0

    def _losses(self, batch: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token loss, logits, labels and the sample row of each predicted token."""
        ids, mask, positions, target = (t.to(self.device, non_blocking=True) for t in collate(batch))
        b, q = torch.nonzero(target[:, 1:], as_tuple=True)  # hidden at i predicts token i + 1
        labels = self.to_emit[ids[b, q + 1]]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.bf16):
            logits = self.module(ids, mask, positions, b, q)
        if self.s.bin_sigma > 0:
            each = -(soft_targets(ids[b, q + 1], labels, self.to_emit, len(self.emit), self.s.bin_sigma)
                     * F.log_softmax(logits, -1)).sum(-1)
        else:
            each = F.cross_entropy(logits, labels, reduction='none')
        return each, logits, labels, b

    def step(self) -> dict[str, float]:
        self.module.train()
        idx = self.draw()
        total = sum(n_targets(self.samples[i]) for i in idx)
        sums = torch.zeros(3, dtype=torch.float64)  # loss, action-token loss, world-token loss
        counts = torch.zeros(3, dtype=torch.float64)
        self.opt.zero_grad(set_to_none=True)
        n_micro = self.s.accumulation
        for a in range(n_micro):
            mine = idx[a::n_micro][self.rank::self.world]
            batch = [self.samples[i] for i in mine]
            sync = a == n_micro - 1 or not hasattr(self.module, 'no_sync')
            with contextlib.nullcontext() if sync else self.module.no_sync():
                each, _, _, b = self._losses(batch)
                (each.sum() * self.world / total).backward()
            with torch.no_grad():
                kind = np.array([batch[i].kind for i in b.tolist()])
                sums[0] += float(each.sum())
                counts[0] += len(each)
                for j, k in ((1, 'action'), (2, 'world')):
                    sel = torch.from_numpy(kind == k).to(each.device)
                    sums[j] += float(each[sel].sum())
                    counts[j] += int(sel.sum())
        if self.world > 1:
            both = torch.cat([sums, counts])
            torch.distributed.all_reduce(both)
            sums, counts = both[:3], both[3:]
        torch.nn.utils.clip_grad_norm_(self.params, self.s.clip_norm)  # with FSDP's sharded (DTensor) grads too
        self.opt.step()
        self.sched.step()
        if self.s.zero_other_rows:
            self._zero_other_rows()
        entry = {'step': self.step_done, 'loss': float(sums[0] / counts[0]), 'lr': self.sched.get_last_lr()[0]}
        for j, k in ((1, 'action'), (2, 'world')):
            if counts[j]:
                entry[f'loss_{k}'] = float(sums[j] / counts[j])
        self.step_done += 1
        return entry

    @torch.no_grad()
    def evaluate(self, samples: Sequence[Sample], decode: Callable[[np.ndarray], np.ndarray] | None = None,
                 batch_size: int = 16) -> dict[str, Any]:
        """Teacher-forced validation: loss per kind, accuracy on action-bin tokens, and with ``decode``
        (bin token ids (K, 7) → actions (K, 7)) the L1 error of the argmax actions per dimension."""
        self.module.eval()
        sums, counts, correct, n_bins = {'action': 0.0, 'world': 0.0}, {'action': 0, 'world': 0}, 0, 0
        l1, n_l1 = np.zeros(T.ACTION_DIMS), 0
        for start in range(0, len(samples), batch_size):
            batch = list(samples[start : start + batch_size])
            each, logits, labels, b = self._losses(batch)
            guess = self.emit[logits.argmax(-1)]
            truth = self.emit[labels]
            rows = b.cpu().numpy()
            for i, s in enumerate(batch):
                sel = torch.from_numpy(rows == i).to(each.device)
                sums[s.kind] += float(each[sel].sum())
                counts[s.kind] += int(sel.sum())
                if s.kind != 'action':
                    continue
                g, t = guess[sel].cpu().numpy(), truth[sel].cpu().numpy()
                bins = (t >= T.ACTION_BIN_FIRST) & (t <= T.ACTION_BIN_LAST)
                correct += int((g[bins] == t[bins]).sum())
                n_bins += int(bins.sum())
                if decode is not None and bins.sum() % T.ACTION_DIMS == 0:
                    g, t = g[bins].reshape(-1, T.ACTION_DIMS), t[bins].reshape(-1, T.ACTION_DIMS)
                    l1 += np.abs(decode(g) - decode(t)).sum(0)  # a non-bin guess decodes to the nearest bin
                    n_l1 += len(t)
        out: dict[str, Any] = {f'loss_{k}': sums[k] / counts[k] for k in sums if counts[k]}
        total = sum(counts.values())
        out['loss'] = sum(sums.values()) / total if total else float('nan')
        if n_bins:
            out['action_token_accuracy'] = correct / n_bins
        if n_l1:
            out['action_l1'] = (l1 / n_l1).tolist()
        return out

    def state_dict(self, optimizer: bool = True) -> dict[str, Any]:
        """Step, schedule and the generators' states (the data position); ``optimizer=False`` for a caller that
        keeps the optimizer's state its own way (FSDP gathers it)."""
        out = {'step': self.step_done, 'scheduler': self.sched.state_dict(), 'rng': self.rng.bit_generator.state,
               'torch_rng': torch.get_rng_state()}
        if optimizer:
            out['optimizer'] = self.opt.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any], optimizer: bool = True) -> None:
        self.step_done = int(state['step'])
        if optimizer:
            self.opt.load_state_dict(state['optimizer'])
        self.sched.load_state_dict(state['scheduler'])
        self.rng.bit_generator.state = state['rng']
        torch.set_rng_state(state['torch_rng'])

