"""Train the VQGAN image tokenizer on model-resolution frames (reconstruction + VQ losses)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from worldvla_ros.model.config import VQGANConfig
from worldvla_ros.model.vqgan import VQGAN


def _pixels(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vqgan(
    frames: np.ndarray,  # (N, R, R, 3) uint8, already at the model's resolution
    cfg: VQGANConfig,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | str = 'cpu',
) -> tuple[VQGAN, list[float]]:
    """Codes that go unused are restarted on encoder outputs of the current batch, so the
    codebook stays in use (the images of a small scene need few codes, but more than collapse leaves)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VQGAN(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    usage = torch.zeros(cfg.n_embed, device=device)
    losses = []
    for step in range(steps):
        x = _pixels(frames[rng.integers(0, len(frames), batch_size)]).to(device)
        z = model.quant_conv(model.encoder(x))
        quant, vq_loss, idx = model.quantize(z)
        recon = model.decoder(model.post_quant_conv(quant))
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(idx.detach(), minlength=cfg.n_embed).float()
        if step % 100 == 99 and step < steps * 0.8:
            with torch.no_grad():
                dead = torch.nonzero(usage == 0).flatten()
                flat = z.detach().permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
                n = min(len(dead), len(flat))
                if n:
                    pick = torch.randperm(len(flat))[:n]
                    jitter = 0.01 * torch.randn(n, cfg.embed_dim, device=device)
                    model.quantize.embedding.weight[dead[:n]] = flat[pick] + jitter
            usage.zero_()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    return model.eval().requires_grad_(False), losses


@torch.inference_mode()
def reconstruction_psnr(model: VQGAN, frames: np.ndarray) -> float:
    x = _pixels(frames).to(next(model.parameters()).device)
    codes = model.encode(x)
    y = model.decode(codes).clamp(-1, 1)
    mse = float(((y - x) / 2).pow(2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))
