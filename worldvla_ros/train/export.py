"""Write a fine-tuned backbone as a checkpoint in the published layout, next to its source's
tokenizer files, with the new WorldVLA settings (action ranges) in config.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import ChameleonForConditionalGeneration

from worldvla_ros.model.checkpoint import CheckpointFiles, release_norm_layout
from worldvla_ros.model.config import WorldVLAConfig


def write_finetuned(out: Path, lm: ChameleonForConditionalGeneration, source: CheckpointFiles,
                    source_config: dict[str, Any], settings: WorldVLAConfig, dtype: torch.dtype,
                    max_shard_bytes: int = 5 * 2**30, extra: dict[str, Any] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to('cpu', dtype).contiguous() for k, v in lm.state_dict().items()
             if not k.startswith('model.vqmodel.')}
    state, parallel = release_norm_layout(state, lm.config.num_attention_heads, lm.config.num_key_value_heads)
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(state):
        n = state[name].numel() * state[name].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    for old in out.glob('model-*.safetensors'):  # an earlier export with another shard count
        old.unlink()
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        save_file({k: state[k] for k in names}, str(out / fname), metadata={'format': 'pt'})
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))
    cfg = {**source_config, 'torch_dtype': str(dtype).removeprefix('torch.'), 'worldvla': settings.to_dict(),
           'model_parallel_size': parallel, **(extra or {})}
    (out / 'config.json').write_text(json.dumps(cfg, indent=2))
    tok = out / 'tokenizer'
    tok.mkdir(exist_ok=True)
    for f in (source.text_tokenizer, source.vqgan_yaml, source.vqgan_ckpt):
        if f.resolve() != (tok / f.name).resolve():
            shutil.copy2(f, tok / f.name)
    return out
