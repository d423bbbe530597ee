"""Train the VQGAN image tokenizer on model-resolution frames (reconstruction + VQ losses)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from worldvla_ros.model.config import VQGANConfig
from worldvla_ros.model.vqgan import VQGAN

RETIRED_CODE_VALUE = 100.0  # far from every encoder output, so a retired code is never the nearest


def _pixels(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' ChameleonVQVAEVectorQuantizer (same losses) over the given rows of the codebook."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    idx = torch.cdist(flat, codebook).argmin(1)
    q = codebook[idx].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    loss = torch.mean((q.detach() - z) ** 2) + beta * torch.mean((q - z.detach()) ** 2)
    return z + (q - z).detach(), loss, idx


def train_vqgan(
    frames: np.ndarray,  # (N, R, R, 3) uint8, already at the model's resolution
    cfg: VQGANConfig,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | str = 'cpu',
    active_codes: int = 0,
    next_frame: np.ndarray | None = None,
    stability_weight: float = 1.0,
) -> tuple[VQGAN, list[float]]:
    """Codes that go unused are restarted on encoder outputs of the current batch, so the
    codebook stays in use (the images of a small scene need few codes, but more than collapse leaves).

    ``active_codes`` (0: all of ``cfg.n_embed``): only the first codes are trained and the rest are
    retired far away, never chosen. The codebook keeps the release's size and layout, but a small
    scene with 8192 codes in use splits one look of a patch over many near-identical codes, and
    which one the encoder picks flips when anything else in the frame moves (its receptive field
    is the whole frame). Fewer codes give the backbone the same token for the same patch.

    ``next_frame`` (index of the following frame of the same episode, −1 after the last): half of
    each batch is then pairs of consecutive frames, and the encoder's latents of patches whose
    pixels did not change between the two are pulled together (``stability_weight``), so an
    unchanged patch keeps its code when the gripper moves elsewhere.
    """
    k = active_codes or cfg.n_embed
    if not 0 < k <= cfg.n_embed:
        raise ValueError(f'active_codes must be in 1 … {cfg.n_embed}, got {active_codes}')
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VQGAN(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    usage = torch.zeros(k, device=device)
    losses = []
    has_next = None if next_frame is None else np.flatnonzero(np.asarray(next_frame) >= 0)
    for step in range(steps):
        if has_next is None or not len(has_next):
            pick = rng.integers(0, len(frames), batch_size)
        else:
            first = has_next[rng.integers(0, len(has_next), batch_size // 2)]
            pick = np.concatenate([first, np.asarray(next_frame)[first]])
        x = _pixels(frames[pick]).to(device)
        z = model.quant_conv(model.encoder(x))
        quant, vq_loss, idx = _quantize(z, model.quantize.embedding.weight[:k], model.quantize.beta)
        recon = model.decoder(model.post_quant_conv(quant))
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + vq_loss
        if has_next is not None and len(has_next) and stability_weight:
            n = batch_size // 2
            unchanged = F.max_pool2d((x[:n] - x[n : 2 * n]).abs().amax(1, keepdim=True), cfg.downsample) == 0
            drift = (z[:n] - z[n : 2 * n]).pow(2).mean(1, keepdim=True)
            loss = loss + stability_weight * (drift * unchanged).sum() / unchanged.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(idx.detach(), minlength=k).float()
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
    with torch.no_grad():
        model.quantize.embedding.weight[k:] = RETIRED_CODE_VALUE
    return model.eval().requires_grad_(False), losses


@torch.inference_mode()
def token_stability(model: VQGAN, episodes: list[np.ndarray]) -> dict[str, float]:
    """How consistently the tokenizer names what did not change: the share of codes equal on
    consecutive frames (a moving gripper changes few patches), and the distinct codes used."""
    same, used = [], set()
    for frames in episodes:
        codes = model.encode(_pixels(frames).to(next(model.parameters()).device)).flatten(1)
        same.append(float((codes[1:] == codes[:-1]).float().mean()))
        used |= set(codes.unique().tolist())
    return {'same_code_on_consecutive_frames': float(np.mean(same)), 'codes_used': float(len(used))}


@torch.inference_mode()
def reconstruction_psnr(model: VQGAN, frames: np.ndarray) -> float:
    x = _pixels(frames).to(next(model.parameters()).device)
    codes = model.encode(x)
    y = model.decode(codes).clamp(-1, 1)
    mse = float(((y - x) / 2).pow(2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))
