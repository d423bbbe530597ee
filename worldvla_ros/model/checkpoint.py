"""Loading released (HF ``save_pretrained``) WorldVLA checkpoints, failing early and clearly.

Layout of the release::

    model_256/libero_goal/config.json, model-0000x-of-0000n.safetensors, model.safetensors.index.json
    chameleon/tokenizer/text_tokenizer.json, vqgan.yaml, vqgan.ckpt

The tokenizer directory is found beside the checkpoint (``tokenizer/``) or as
``chameleon/tokenizer`` in the checkpoint directory or one of its ancestors.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

from worldvla_ros.files import MB, FileRefused, check_regular

from .config import BackboneConfig, VQGANConfig, WorldVLAConfig
from .errors import CheckpointError
from .vqgan import VQGAN


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    config: Path
    weights: tuple[Path, ...]
    text_tokenizer: Path
    vqgan_yaml: Path
    vqgan_ckpt: Path


TEXT_TOKENIZER_NAMES = ('text_tokenizer.json', 'tokenizer.json')
CONFIG_MAX_BYTES = 64 * MB  # a config.json holds the 65536-entry vocabulary map: a few MB


def _tokenizer_dir_candidates(root: Path) -> list[Path]:
    out = [root / 'tokenizer', root / 'chameleon' / 'tokenizer']
    out += [parent / 'chameleon' / 'tokenizer' for parent in list(root.parents)[:3]]
    return out


def find_checkpoint_files(checkpoint_dir: str | Path, tokenizer_dir: str | Path | None = None) -> CheckpointFiles:
    root = Path(checkpoint_dir).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f'checkpoint directory {root} does not exist')
    config = root / 'config.json'
    if not config.is_file():
        raise CheckpointError(f'{root}: no config.json (expected a HF save_pretrained directory)')

    index = root / 'model.safetensors.index.json'
    if index.exists():
        try:
            weight_map = json.loads(_read(index, 64 * MB, 'weight index'))['weight_map']
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f'{index}: not a safetensors index ({type(exc).__name__}: {exc})') from exc
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise CheckpointError(f'{index}: shard names must be file names in the checkpoint directory')
        weights = tuple(root / name for name in names)
        missing = [w.name for w in weights if not w.is_file()]
        if missing:
            raise CheckpointError(f'{root}: shards named in the index are missing: {missing}')
    else:
        weights = tuple(sorted(root.glob('*.safetensors')))
        if not weights:
            raise CheckpointError(f'{root}: no *.safetensors weights (.bin/.pt checkpoints are not loaded)')

    candidates = [Path(tokenizer_dir).expanduser().resolve()] if tokenizer_dir else _tokenizer_dir_candidates(root)
    for tok_dir in candidates:
        if (tok_dir / 'vqgan.ckpt').is_file() or (tok_dir / 'vqgan.yaml').is_file():
            break
    else:
        where = ', '.join(str(c) for c in candidates)
        raise CheckpointError(f'no tokenizer directory with vqgan.yaml/vqgan.ckpt found (looked in {where})')
    text = next((tok_dir / n for n in TEXT_TOKENIZER_NAMES if (tok_dir / n).is_file()), None)
    if text is None:
        raise CheckpointError(f'{tok_dir}: no text tokenizer ({" or ".join(TEXT_TOKENIZER_NAMES)})')
    for name in ('vqgan.yaml', 'vqgan.ckpt'):
        if not (tok_dir / name).is_file():
            raise CheckpointError(f'{tok_dir}: {name} is missing')
    return CheckpointFiles(root, config, weights, text, tok_dir / 'vqgan.yaml', tok_dir / 'vqgan.ckpt')


def _read(path: Path, max_bytes: int, what: str) -> str:
    """A checkpoint file read whole: a regular file of bounded size (else CheckpointError naming it)."""
    from worldvla_ros.files import FileRefused, read_text

    try:
        return read_text(path, max_bytes, what)
    except FileRefused as exc:
        raise CheckpointError(str(exc)) from exc


def read_config(files: CheckpointFiles) -> dict[str, Any]:
    text = _read(files.config, CONFIG_MAX_BYTES, 'config.json')
    try:
        cfg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f'{files.config}: invalid JSON ({type(exc).__name__}: {str(exc)[:200]})') from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f'{files.config}: a JSON {type(cfg).__name__}, expected an object of settings')
    if cfg.get('model_type') != 'chameleon':
        raise CheckpointError(f"{files.config}: model_type is {cfg.get('model_type')!r}, expected 'chameleon'")
    return cfg


def worldvla_settings(cfg: dict[str, Any], root: Path, overrides: dict[str, Any] | None = None) -> WorldVLAConfig:
    """Our ``worldvla`` key when present, else the release's values read off the directory names."""
    try:
        if 'worldvla' in cfg:
            if not isinstance(cfg['worldvla'], dict):
                raise TypeError(f'"worldvla" is a JSON {type(cfg["worldvla"]).__name__}, expected an object')
            base = WorldVLAConfig.from_dict(cfg['worldvla'])
        else:
            m = re.search(r'model_(256|512)', str(root))
            base = WorldVLAConfig.for_release(resolution=int(m.group(1)) if m else 256, suite=root.name)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f'{root / "config.json"}: invalid "worldvla" settings: {exc}') from exc
    try:
        return base.replace(**(overrides or {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f'invalid WorldVLA setting: {exc}') from exc


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else torch.float32
    table = {'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16, 'float16': torch.float16,
             'fp16': torch.float16, 'float32': torch.float32, 'fp32': torch.float32}
    if dtype not in table:
        raise ValueError(f'unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32')
    return table[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f'device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)') from exc
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise CheckpointError(f'device {device!r} requested but CUDA is not available (use device:=cpu)')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CheckpointError(f'device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    if dev.type not in ('cpu', 'cuda'):
        raise CheckpointError(f'device {device!r}: only cpu and cuda are supported')
    return dev


def _open_shard(path: Path, device: torch.device):
    try:
        return safe_open(str(path), framework='pt', device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f'{path}: unreadable or truncated safetensors file ({exc})') from exc


NORM_NAME = re.compile(r'\.(q|k)_norm\.(weight|bias)$')


def release_norm_layout(state: dict[str, torch.Tensor], heads: int, kv_heads: int
                        ) -> tuple[dict[str, torch.Tensor], int]:
    """q/k-norm rows as the release's model class stores them, and its ``model_parallel_size``.

    transformers keeps one LayerNorm row per head ([heads, head_dim]); the release's class keeps
    ``model_parallel_size`` rows, each shared by consecutive heads (q: heads/mp of them, k: kv_heads/mp), and
    sizes them by ``model_parallel_size`` from config.json (default 1). The smallest such count that holds these
    weights exactly is chosen (1 when every head has the same row, as in the released checkpoints); ValueError
    when none does (grouped-query attention with q rows that differ within a key group)."""
    norms = {k: v for k, v in state.items() if NORM_NAME.search(k)}
    candidates = [mp for mp in range(1, math.gcd(heads, kv_heads) + 1) if heads % mp == 0 and kv_heads % mp == 0]
    for mp in candidates:
        reduced = {}
        for name, t in norms.items():
            per = (heads if '.q_norm.' in name else kv_heads) // mp
            rows = t.reshape(mp, per, -1)
            if not torch.equal(rows, rows[:, :1].expand_as(rows)):
                break
            reduced[name] = rows[:, 0].contiguous()
        else:
            return {**state, **reduced}, mp
    raise ValueError(f'q/k-norm rows that differ within a group of heads sharing a key ({heads} heads, {kv_heads} '
                     'key heads) cannot be written in the release\'s layout')


def load_backbone(
    files: CheckpointFiles, cfg: dict[str, Any], vocab: dict[str, int], device: torch.device, dtype: torch.dtype
) -> ChameleonForConditionalGeneration:
    """Build on the meta device, check every tensor's name and shape, then assign the weights."""
    cfg = {k: v for k, v in cfg.items() if k != 'worldvla'}
    cfg['vocabulary_map'] = vocab
    try:
        BackboneConfig.from_hf_dict(cfg)  # sizes that fit together (heads dividing the hidden size …)
        hf_config = ChameleonConfig.from_dict(cfg)
        with torch.device('meta'):
            lm = ChameleonForConditionalGeneration._from_config(hf_config, attn_implementation='sdpa')
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f'{files.config}: not a valid Chameleon config ({type(exc).__name__}: {exc})') from exc
    del lm.model.vqmodel  # the VQGAN ships separately (vqgan.ckpt); the LM never runs it
    expected = {k: v.shape for k, v in lm.state_dict().items()}
    parallel = cfg.get('model_parallel_size', 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise CheckpointError(f'{files.config}: model_parallel_size must be a whole number ≥ 1, got {parallel!r}')

    state: dict[str, torch.Tensor] = {}
    for shard in files.weights:
        with _open_shard(shard, device) as f:
            for name in f.keys():
                if name.startswith('model.vqmodel.'):
                    continue
                if name not in expected:
                    raise CheckpointError(f'{shard.name}: unexpected tensor {name}')
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as exc:
                    raise CheckpointError(f'{shard.name}: tensor {name} unreadable ({exc})') from exc
                want = expected[name]
                if NORM_NAME.search(name) and tensor.shape != want:
                    # the release stores model_parallel_size rows (default 1), each shared by heads/mp heads
                    if tensor.ndim == 2 and tensor.shape[0] == parallel and want[0] % parallel == 0 \
                            and tensor.shape[1] == want[1]:
                        tensor = tensor.repeat_interleave(want[0] // parallel, dim=0)
                if tensor.shape != want:
                    raise CheckpointError(
                        f'{shard.name}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(want)}'
                    )
                if not torch.is_floating_point(tensor):
                    raise CheckpointError(f'{shard.name}: {name} is {tensor.dtype}, expected a float tensor')
                state[name] = tensor.to(device=device, dtype=dtype).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ', '.join(missing[:5]) + (' …' if len(missing) > 5 else '')
        raise CheckpointError(f'{files.root}: {len(missing)} tensors missing from the weights: {shown}')
    lm.load_state_dict(state, strict=True, assign=True)
    lm.model.rotary_emb = ChameleonRotaryEmbedding(config=hf_config).to(device)  # buffers were meta
    return lm.eval().requires_grad_(False)


def load_vqgan(files: CheckpointFiles, device: torch.device) -> VQGAN:
    """The VQGAN in float32: it is small, and fp32 keeps its codes identical on every device."""
    try:
        vq_cfg = VQGANConfig.from_yaml_dict(yaml.safe_load(_read(files.vqgan_yaml, MB, 'vqgan.yaml')))
        vqgan = VQGAN(vq_cfg)
    except CheckpointError:
        raise
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, KeyError, TypeError, RuntimeError, RecursionError) as exc:
        raise CheckpointError(f'{files.vqgan_yaml}: {type(exc).__name__}: {exc}') from exc
    try:
        check_regular(files.vqgan_ckpt, 8 * 1024 * MB, 'vqgan.ckpt')
        ckpt = torch.load(files.vqgan_ckpt, map_location='cpu', weights_only=True)
    except FileRefused as exc:
        raise CheckpointError(str(exc)) from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f'{files.vqgan_ckpt}: holds Python objects beyond tensors; refusing to unpickle arbitrary code '
            f'(re-save it as {{"state_dict": model.state_dict()}}): {exc}'
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f'{files.vqgan_ckpt}: unreadable or truncated ({exc})') from exc
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f'{files.vqgan_ckpt}: no state_dict inside')
    wanted = vqgan.state_dict()
    state = {k: v for k, v in state.items() if k in wanted or not k.startswith('loss.')}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        kinds = ', '.join(f'{k} ({type(state[k]).__name__})' for k in not_tensors[:3])
        raise CheckpointError(f'{files.vqgan_ckpt}: values that are not tensors: {kinds}')
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f'{files.vqgan_ckpt}: does not match vqgan.yaml (missing {missing[:4]}, unexpected {unexpected[:4]})'
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(wanted[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f'{files.vqgan_ckpt}: {k} has shape {tuple(state[k].shape)}, vqgan.yaml implies {tuple(wanted[k].shape)}'
        )
    vqgan.load_state_dict(state, strict=True)
    return vqgan.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def weights_fingerprint(files: CheckpointFiles, samples: int = 32, block: int = 4096) -> str:
    """Which weights these are, read in milliseconds whatever their size: each weight file's name, size and
    ``samples`` blocks at evenly spaced offsets. Two checkpoints with one config.json (a fine-tune that kept the
    action statistics, the weights before a revision) differ here, since training moves every tensor."""
    h = hashlib.sha256()
    for path in sorted(files.weights, key=lambda p: p.name):
        size = path.stat().st_size
        h.update(f'{path.name}:{size};'.encode())
        with open(path, 'rb') as f:
            for k in range(samples):
                f.seek(max(size - block, 0) * k // max(samples - 1, 1))
                h.update(f.read(block))
    return h.hexdigest()[:12]


def model_id_of(files: CheckpointFiles) -> str:
    digest = hashlib.sha256(_read(files.config, CONFIG_MAX_BYTES, 'config.json').encode()).hexdigest()[:8]
    return f'{files.root.name}@{digest}'
