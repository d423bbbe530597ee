"""Train the Chameleon backbone from scratch on mixed action-model and world-model sequences
(the loop itself is ``trainer.Trainer``, shared with fine-tuning).

The loss is the release's next-token cross-entropy on the answer tokens, with the softmax taken
over the tokens the decoders can emit (image codes, action tokens, structure tokens) instead of
all 65536: the same argmax among those, at a fraction of the cost on a CPU. Output rows of the
other tokens are zero, so their logits stay at 0.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import ChameleonForConditionalGeneration

from worldvla_ros.model import tokens as T

from .sequences import Sample
from .trainer import EmitHead, Trainer, TrainSettings, sample_drawer, soft_targets

__all__ = ['deepen', 'emit_ids', 'init_image_embeddings', 'sample_drawer', 'soft_targets', 'train_lm']


def emit_ids(image_token_ids: np.ndarray, grid_token: int) -> torch.Tensor:
    action = list(range(T.ACTION_BIN_FIRST, T.ACTION_BIN_LAST + 1))
    structure = [T.ACTION_START, T.ACTION_END, T.END_OF_TURN, T.IMAGE_START, T.IMAGE_END, T.IMAGE_NEWLINE, grid_token]
    return torch.as_tensor(sorted(set(image_token_ids.tolist()) | set(action) | set(structure)), dtype=torch.long)


def init_image_embeddings(lm: ChameleonForConditionalGeneration, codebook: torch.Tensor, img2bpe: np.ndarray,
                          seed: int = 0, random: bool = False) -> None:
    """Start every image token's input and output embedding at a fixed random projection of its VQ code vector
    (``random``: at independent random vectors of the same scale).

    Only the initialization changes (the architecture and checkpoint layout are the release's):
    with a few thousand frames most codes are seen a handful of times, and codes that look alike
    (the same block on a neighbouring patch) start out alike instead of as unrelated random vectors.
    """
    g = torch.Generator().manual_seed(seed)
    code = codebook.detach().float()
    code = (code - code.mean(0)) / (code.std(0) + 1e-6)
    proj = torch.randn(code.shape[1], lm.config.hidden_size, generator=g) / code.shape[1] ** 0.5
    rows = torch.as_tensor(img2bpe, dtype=torch.long)
    with torch.no_grad():
        for weight in (lm.get_input_embeddings().weight, lm.lm_head.weight):
            scale = weight.std()
            init = torch.randn(len(rows), weight.shape[1], generator=g) if random else code @ proj
            weight[rows] = (init * scale).to(weight.device, weight.dtype)


def deepen(lm: ChameleonForConditionalGeneration, layers: int, seed: int = 0) -> ChameleonForConditionalGeneration:
    """The same function with ``layers`` decoder layers: new ones after the old, spread evenly, each an identity.

    A new layer starts with its attention output and MLP down projections at zero, so under the
    pre-norm residual it adds nothing until training moves them; its other weights are freshly
    initialized so that gradients reach them from the first step. Everything else is copied.
    """
    old = len(lm.model.layers)
    if not old <= layers:
        raise ValueError(f'deepen: {layers} layers would remove some of the {old} the model has')
    if lm.config.swin_norm:
        raise ValueError('deepen: an identity layer needs the pre-norm residual (swin_norm is set)')
    cfg = lm.config.to_dict()
    cfg['num_hidden_layers'] = layers
    torch.manual_seed(seed)
    grown = ChameleonForConditionalGeneration(type(lm.config).from_dict(cfg)).to(lm.device)
    del grown.model.vqmodel
    # old layer i goes to place[i]; the new ones fill the gaps, after the old layer before them
    place = [round(i * layers / old) for i in range(old)]
    state = {}
    for name, tensor in lm.state_dict().items():
        parts = name.split('.')
        if parts[:2] == ['model', 'layers']:
            parts[2] = str(place[int(parts[2])])
        state['.'.join(parts)] = tensor
    for name, tensor in grown.state_dict().items():
        if name not in state and name.endswith(('self_attn.o_proj.weight', 'mlp.down_proj.weight')):
            state[name] = torch.zeros_like(tensor)
    grown.load_state_dict(state, strict=False)
    return grown.train(lm.training)


def train_lm(
    lm: ChameleonForConditionalGeneration,
    samples: Sequence[Sample],
    emit: torch.Tensor,
    steps: int,
    batch_size: int = 24,
    lr: float = 2e-3,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    bf16: bool = True,
    bin_sigma: float = 0.0,
    world_fraction: float | None = None,
) -> list[dict[str, float]]:
    """``bf16``: autocast the forward pass (fp32 weights and optimizer), ~1.5× faster on a CPU with AVX512-BF16.

    ``bin_sigma`` > 0 (not the release's loss): an action-bin target becomes a Gaussian over the
    neighbouring bins (σ in bins). With one-hot targets the 256 bins are unrelated classes, each
    rarely the answer, and `benchmarks/position_readout.py --continuous` learns nothing in 900 steps;
    with σ = 6 it does.

    ``world_fraction``: share of world-model samples in every batch (``None``: draw uniformly from
    ``samples``, so the mixture is whatever the data holds — one world-model sample per transition,
    one action sample per chunk start; with many short snippets that is mostly world-model data).
    """
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16, bin_sigma=bin_sigma,
                             world_fraction=world_fraction)
    lm.train()
    trainer = Trainer(EmitHead(lm, emit), lm, samples, emit, settings)
    log = []
    for step in range(steps):
        entry = trainer.step()
        log.append(entry)
        if on_step:
            on_step(step, entry)
    return log
