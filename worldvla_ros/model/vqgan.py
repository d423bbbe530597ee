"""Chameleon's VQGAN (taming-transformers VQModel) with state-dict keys of ``vqgan.ckpt``.

transformers ships the encoder side only; the decoder is built here from transformers' own
resnet and attention blocks, mirroring the encoder, so the release's ``decoder.*`` and
``post_quant_conv.*`` weights load by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAEEncoder,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
    ChameleonVQVAEVectorQuantizer,
)

from .config import VQGANConfig


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class VQGANDecoder(nn.Module):
    def __init__(self, cfg: VQGANConfig, hf: ChameleonVQVAEConfig) -> None:
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(hf, block_in, block_in)
        self.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(block_in)
        self.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(hf, block_in, block_in)
        up_levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(self.num_res_blocks + 1):
                block.append(ChameleonVQVAEEncoderResnetBlock(hf, block_in, block_out))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(ChameleonVQVAEEncoderAttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = _Upsample(block_in)
                curr_res *= 2
            up_levels.insert(0, up)  # index by level, as the checkpoint does
        self.up = nn.ModuleList(up_levels)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        h = F.silu(self.norm_out(h))
        return self.conv_out(h)


class VQGAN(nn.Module):
    """Pixels in [-1, 1] (B, 3, H, W) ↔ VQ codes (B, H/16, W/16)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hf = ChameleonVQVAEConfig(**cfg.to_hf_dict())
        self.encoder = ChameleonVQVAEEncoder(hf)
        self.quantize = ChameleonVQVAEVectorQuantizer(hf)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = VQGANDecoder(cfg, hf)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        z = self.quant_conv(self.encoder(pixels))
        _, _, indices = self.quantize(z)
        f = self.cfg.downsample
        return indices.view(b, h // f, w // f)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.quantize.embedding(codes).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(z))
