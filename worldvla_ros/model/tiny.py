"""Tiny random checkpoints in the exact published layout, for tests and benchmarks.

Same vocabulary (65536), same token ids, same file names and tensor key names as the release;
only the sizes shrink. The q/k-norm rows are stored as ``[1, head_dim]`` as in the release.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from . import tokens as T
from .checkpoint import release_norm_layout
from .config import TINY_BACKBONE, TINY_VQGAN, BackboneConfig, VQGANConfig, WorldVLAConfig
from .vqgan import VQGAN


def image_token_name(code: int) -> str:
    """Chameleon names VQ code 1234 ``IMGIMGBCDEZ`` (digits written as letters A…J)."""
    return 'IMGIMG' + ''.join(chr(ord('A') + int(d)) for d in str(code)) + 'Z'


def build_vocab(seed: int = 0) -> dict[str, int]:
    """The 65536-entry vocabulary with every id WorldVLA relies on at its real place.

    Image codes sit on ids 4 … 8195 in a shuffled order, so that code ↔ id goes through the
    name mapping as in the release, never through a constant offset.
    """
    vocab = {'<s>': T.BOS, '<pad>': T.PAD, '</s>': T.EOS, '<unk>': T.UNK}
    perm = np.random.default_rng(seed).permutation(T.NUM_IMAGE_CODES)
    for i, code in enumerate(perm):
        vocab[image_token_name(int(code))] = T.IMAGE_CODE_FIRST + i
    vocab['<eoss>'] = T.IMAGE_END
    vocab['<racm3:break>'] = T.IMAGE_START
    next_id = T.IMAGE_START + 1
    for next_id in range(T.IMAGE_START + 1, 16388):  # reserved tokens cover grid, actions, bins
        vocab[T.reserved_name(next_id)] = next_id
    next_id += 1
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set underneath: its order changes per process
        vocab[ch] = next_id
        next_id += 1
    while next_id < T.VOCAB_SIZE:
        vocab[f'<unused{next_id}>'] = next_id
        next_id += 1
    return vocab


def build_text_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ['<s>', '<pad>', '</s>', '<unk>', '<eoss>', '<racm3:break>']
    specials += [T.reserved_name(i) for i in (T.END_OF_TURN, T.IMAGE_NEWLINE, T.ACTION_START, T.ACTION_END)]
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok


def make_tiny_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    backbone: BackboneConfig = TINY_BACKBONE,
    vq: VQGANConfig = TINY_VQGAN,
    settings: WorldVLAConfig | None = None,
    shards: int = 2,
) -> Path:
    """Write ``config.json``, sharded safetensors + index and ``tokenizer/`` under ``path``."""
    torch.manual_seed(seed)
    vocab = build_vocab(seed)
    lm = build_lm(backbone, vq, vocab)
    return write_checkpoint(path, lm, backbone, VQGAN(vq), vocab,
                            settings or WorldVLAConfig(resolution=vq.resolution), shards=shards)


def hf_config(backbone: BackboneConfig, vq: VQGANConfig, vocab: dict[str, int]) -> dict:
    cfg = backbone.to_hf_dict()
    cfg.update(vq_config=vq.to_hf_dict(), vocabulary_map=vocab, torch_dtype='float32', z_loss_weight=1e-5,
               dropout=0.0, mask_image_logits=False)
    return cfg


def build_lm(backbone: BackboneConfig, vq: VQGANConfig, vocab: dict[str, int]) -> ChameleonForConditionalGeneration:
    """A randomly initialized backbone (without the unused built-in VQ model)."""
    lm = ChameleonForConditionalGeneration(ChameleonConfig.from_dict(hf_config(backbone, vq, vocab)))
    del lm.model.vqmodel
    return lm.eval()


def write_checkpoint(
    path: str | Path,
    lm: ChameleonForConditionalGeneration,
    backbone: BackboneConfig,
    vqgan: VQGAN,
    vocab: dict[str, int],
    settings: WorldVLAConfig,
    *,
    dtype: torch.dtype = torch.float32,
    shards: int = 2,
) -> Path:
    """The published layout: config.json, sharded safetensors + index, tokenizer/ (text, vqgan)."""
    root = Path(path)
    tok_dir = root / 'tokenizer'
    tok_dir.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(backbone, vqgan.cfg, vocab)
    cfg.update(torch_dtype=str(dtype).removeprefix('torch.'), worldvla=settings.to_dict())
    state = {k: v.detach().to('cpu', dtype).contiguous() for k, v in lm.state_dict().items()
             if not k.startswith('model.vqmodel.')}
    # the release's layout: one shared row when every head has the same (a fresh model), else a row per head
    state, cfg['model_parallel_size'] = release_norm_layout(state, backbone.num_attention_heads,
                                                            backbone.num_key_value_heads)
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
        save_file({k: state[k] for k in group}, str(root / fname), metadata={'format': 'pt'})
        weight_map.update({k: fname for k in group})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (root / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2)
    )
    (root / 'config.json').write_text(json.dumps(cfg, indent=2))
    build_text_tokenizer(vocab).save(str(tok_dir / 'text_tokenizer.json'))
    (tok_dir / 'vqgan.yaml').write_text(yaml.safe_dump(vqgan.cfg.to_yaml_dict(), sort_keys=False))
    torch.save({'state_dict': {k: v.detach().cpu() for k, v in vqgan.state_dict().items()}}, tok_dir / 'vqgan.ckpt')
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Write a tiny random WorldVLA checkpoint (published layout).')
    parser.add_argument('path', type=Path)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--resolution', type=int, default=TINY_VQGAN.resolution)
    parser.add_argument('--chunk-size', type=int, default=5)
    args = parser.parse_args(argv)
    vq = VQGANConfig(**{**TINY_VQGAN.__dict__, 'resolution': args.resolution})
    settings = WorldVLAConfig(resolution=args.resolution, chunk_size=args.chunk_size)
    root = make_tiny_checkpoint(args.path, seed=args.seed, vq=vq, settings=settings)
    print(root)
    return 0
