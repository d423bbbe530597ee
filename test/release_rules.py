"""The release's rules for a checkpoint, as its own model class applies them (no code of the release here)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


def release_layout_problems(checkpoint: Path) -> list[str]:
    """What the release's ``ChameleonXLLMXForConditionalGeneration`` would refuse: it sizes every q/k-norm as
    [model_parallel_size, head_dim] (model_parallel_size from config.json, default 1) and shares each row among
    heads/model_parallel_size heads, so that count must divide the query and the key heads."""
    cfg = json.loads((Path(checkpoint) / 'config.json').read_text())
    mp = cfg.get('model_parallel_size', 1)
    heads, kv = cfg['num_attention_heads'], cfg['num_key_value_heads']
    head_dim = cfg['hidden_size'] // heads
    problems = [] if heads % mp == 0 and kv % mp == 0 else [f'model_parallel_size {mp} divides not {heads}/{kv}']
    for shard in sorted(Path(checkpoint).glob('*.safetensors')):
        with safe_open(str(shard), 'pt') as f:
            for name in f.keys():
                if '_norm.' in name and ('.q_norm.' in name or '.k_norm.' in name):
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != (mp, head_dim):
                        problems.append(f'{shard.name}: {name} is {shape}, the release builds ({mp}, {head_dim})')
    return problems
