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
class Objective:
    """What a step minimises. ``RELEASE``: the WorldVLA release's fine-tuning (xllmx ``pretrain_ck``, its
    "w004" runs): cross-entropy over the whole vocabulary, image-code tokens (ids 3 … 8194, as the release
    indexes them) weighted 0.04 in a weighted mean, plus 1e-5 × the mean squared log-partition (z-loss), with
    residual dropout 0.05, and world-model answers labelled whole (structure tokens and the end of turn too).
    ``COMPACT``: the embedded default's own training, an unweighted mean over the tokens the decoders can emit
    (softmax restricted to them), no z-loss, no dropout, only the image codes of world-model answers."""

    softmax: str = 'emittable'  # 'full' (all 65536 logits) or 'emittable' (the tokens a decoder can emit)
    image_weight: float = 1.0  # weight of image-code labels in the weighted mean
    z_loss: float = 0.0
    dropout: float = 0.0  # residual dropout on every decoder layer's attention and MLP output (training only)
    label_structure: bool = False  # world-model answers: every token (release) or the codes only

    def __post_init__(self) -> None:
        if self.softmax not in ('full', 'emittable'):
            raise ValueError(f'softmax must be full or emittable, got {self.softmax!r}')
        if not (0.0 <= self.image_weight <= 1e3 and 0.0 <= self.z_loss <= 1.0 and 0.0 <= self.dropout < 1.0):
            raise ValueError('image weight in [0, 1000], z-loss in [0, 1], dropout in [0, 1)')

    def token_weights(self) -> np.ndarray:
        """(vocabulary,) weight of each label id: the release's ``loss_weights[3:8195] = image_weight``."""
        w = np.ones(T.VOCAB_SIZE, dtype=np.float64)
        w[IMAGE_WEIGHT_IDS] = self.image_weight
        return w


IMAGE_WEIGHT_IDS = slice(3, 8195)  # the release's slice (its image codes are ids 4 … 8195)
RELEASE_OBJECTIVE = Objective(softmax='full', image_weight=0.04, z_loss=1e-5, dropout=0.05, label_structure=True)
COMPACT_OBJECTIVE = Objective()
OBJECTIVES = {'release': RELEASE_OBJECTIVE, 'compact': COMPACT_OBJECTIVE}


def residual_dropout(lm: ChameleonForConditionalGeneration, p: float) -> list:
    """The release's ``hidden = residual + dropout(sublayer(hidden))`` on every decoder layer, as forward hooks
    (active in training mode only); returns the hook handles."""
    def drop(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not _module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    handles = []
    swin = getattr(lm.config, 'swin_norm', False)
    for layer in lm.model.layers:  # swin: the sublayer output is normalised before the residual sum
        parts = (layer.input_layernorm, layer.post_attention_layernorm) if swin else (layer.self_attn, layer.mlp)
        handles += [m.register_forward_hook(drop) for m in parts]
    return handles


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
    objective: Objective = COMPACT_OBJECTIVE


class EmitHead(nn.Module):
    """The backbone's forward for training: hidden states, then logits over the emittable tokens only, or
    over the whole vocabulary when ``emit`` is None (one module, so that DDP/FSDP wrap exactly what runs)."""

    def __init__(self, lm: ChameleonForConditionalGeneration, emit: torch.Tensor | None) -> None:
        super().__init__()
        self.lm = lm
        self.full = emit is None
        self.register_buffer('emit', torch.zeros(0, dtype=torch.long) if emit is None else emit, persistent=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, b: torch.Tensor,
                q: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        weight = self.lm.lm_head.weight if self.full else self.lm.lm_head.weight[self.emit]
        return F.linear(hidden[b, q], weight).float()


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


def target_weight(s: Sample, weights: np.ndarray) -> float:
    """The summed label weight of a sample's predicted tokens (the denominator of a weighted mean)."""
    return float(weights[s.ids[1:][s.target[1:]]].sum())


class Trainer:
    """``module`` runs the forward (an ``EmitHead``, or it wrapped in DDP/FSDP); ``lm`` is the model under it."""

    def __init__(self, module: nn.Module, lm: ChameleonForConditionalGeneration, samples: Sequence[Sample],
                 emit: torch.Tensor, settings: TrainSettings, rank: int = 0, world: int = 1) -> None:
        s = settings
        per_step = s.accumulation * world
        if s.batch_size % per_step:
            raise ValueError(f'batch size {s.batch_size} is not a multiple of accumulation × processes ({per_step})')
        self.module, self.lm, self.samples, self.s, self.rank, self.world = module, lm, samples, s, rank, world
        self.objective = s.objective
        self.full = s.objective.softmax == 'full'
        if self.full and (s.bin_sigma > 0 or s.zero_other_rows):
            raise ValueError('the full-vocabulary softmax takes neither bin_sigma nor zero_other_rows')
        self.device = lm.lm_head.weight.device
        self.emit = emit.to(self.device)
        self.to_emit = torch.full((T.VOCAB_SIZE,), -1, dtype=torch.long, device=self.device)
        self.to_emit[self.emit] = torch.arange(len(self.emit), device=self.device)
        self.weights_np = s.objective.token_weights()
        self.weights = torch.as_tensor(self.weights_np, dtype=torch.float32, device=self.device)
        self.dropout_hooks = residual_dropout(lm, s.objective.dropout) if s.objective.dropout > 0 else []
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

    def _losses(self, batch: Sequence[Sample]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy, logits, labels (indices into the logits), the sample row of each predicted
        token, and each label's weight."""
        ids, mask, positions, target = (t.to(self.device, non_blocking=True) for t in collate(batch))
        b, q = torch.nonzero(target[:, 1:], as_tuple=True)  # hidden at i predicts token i + 1
        tokens = ids[b, q + 1]
        labels = tokens if self.full else self.to_emit[tokens]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.bf16):
            logits = self.module(ids, mask, positions, b, q)
        if self.s.bin_sigma > 0:
            each = -(soft_targets(tokens, labels, self.to_emit, len(self.emit), self.s.bin_sigma)
                     * F.log_softmax(logits, -1)).sum(-1)
        else:
            each = F.cross_entropy(logits, labels, reduction='none')
        return each, logits, labels, b, self.weights[tokens]

    def objective_loss(self, batch: Sequence[Sample]) -> torch.Tensor:
        """The objective on one batch alone: Σ w·CE / Σ w + z · mean(logsumexp(logits)²) (the release's formula)."""
        each, logits, _, _, w = self._losses(batch)
        loss = (w * each).sum() / w.sum()
        if self.objective.z_loss:
            loss = loss + self.objective.z_loss * torch.logsumexp(logits, -1).pow(2).mean()
        return loss

    def step(self) -> dict[str, float]:
        self.module.train()
        idx = self.draw()
        chosen = [self.samples[i] for i in idx]
        count = sum(n_targets(s) for s in chosen)  # normalised over the whole global batch (see the module doc)
        weight = sum(target_weight(s, self.weights_np) for s in chosen)
        z = self.objective.z_loss
        sums = torch.zeros(4, dtype=torch.float64)  # objective, loss, action-token loss, world-token loss
        counts = torch.zeros(4, dtype=torch.float64)
        self.opt.zero_grad(set_to_none=True)
        n_micro = self.s.accumulation
        for a in range(n_micro):
            mine = idx[a::n_micro][self.rank::self.world]
            batch = [self.samples[i] for i in mine]
            sync = a == n_micro - 1 or not hasattr(self.module, 'no_sync')
            with contextlib.nullcontext() if sync else self.module.no_sync():
                each, logits, _, b, w = self._losses(batch)
                part = (w * each).sum() / weight
                if z:
                    part = part + z * torch.logsumexp(logits, -1).pow(2).sum() / count
                (part * self.world).backward()
            with torch.no_grad():
                kind = np.array([batch[i].kind for i in b.tolist()])
                sums[0] += float(part)
                sums[1] += float(each.sum())
                counts[1] += len(each)
                for j, k in ((2, 'action'), (3, 'world')):
                    sel = torch.from_numpy(kind == k).to(each.device)
                    sums[j] += float(each[sel].sum())
                    counts[j] += int(sel.sum())
        if self.world > 1:
            both = torch.cat([sums, counts])
            torch.distributed.all_reduce(both)
            sums, counts = both[:4], both[4:]
        torch.nn.utils.clip_grad_norm_(self.params, self.s.clip_norm)  # with FSDP's sharded (DTensor) grads too
        self.opt.step()
        self.sched.step()
        if self.s.zero_other_rows:
            self._zero_other_rows()
        entry = {'step': self.step_done, 'loss': float(sums[1] / counts[1]), 'lr': self.sched.get_last_lr()[0]}
        if self.objective != COMPACT_OBJECTIVE:
            entry['objective'] = float(sums[0])  # the weighted mean and z-loss the step minimised
        for j, k in ((2, 'action'), (3, 'world')):
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
            each, logits, labels, b, _ = self._losses(batch)
            guess = logits.argmax(-1) if self.full else self.emit[logits.argmax(-1)]
            truth = labels if self.full else self.emit[labels]
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

