"""Configuration: backbone sizes, VQGAN sizes and the WorldVLA settings of a checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import tokens as T
from .action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN, MAX_ACTION_UNITS

ACTION_PROMPT = 'What action should the robot take to {instruction}?'
WORLD_MODEL_PROMPT = (
    'Generate the next image based on the provided sequence of historical images and corresponding actions.'
)


@dataclass(frozen=True)
class BackboneConfig:
    """Chameleon decoder sizes; ``to_hf_dict`` gives transformers' ``ChameleonConfig`` keys."""

    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    vocab_size: int = T.VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError('hidden_size must be divisible by num_attention_heads')
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError('num_attention_heads must be a multiple of num_key_value_heads')
        if self.vocab_size != T.VOCAB_SIZE:
            raise ValueError(f'WorldVLA token ids need vocab_size {T.VOCAB_SIZE}, got {self.vocab_size}')

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        """The inverse of ``to_hf_dict``: the sizes of a checkpoint's config.json."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            'model_type': 'chameleon',
            'architectures': ['ChameleonForConditionalGeneration'],
            'hidden_size': self.hidden_size,
            'num_hidden_layers': self.num_hidden_layers,
            'num_attention_heads': self.num_attention_heads,
            'num_key_value_heads': self.num_key_value_heads,
            'intermediate_size': self.intermediate_size,
            'rms_norm_eps': self.rms_norm_eps,
            'rope_theta': self.rope_theta,
            'max_position_embeddings': self.max_position_embeddings,
            'vocab_size': self.vocab_size,
            'hidden_act': 'silu',
            'tie_word_embeddings': False,
            'attention_bias': False,
            'mlp_bias': False,
            'swin_norm': False,
            'bos_token_id': T.BOS,
            'eos_token_id': T.END_OF_TURN,
            'pad_token_id': T.PAD,
        }


@dataclass(frozen=True)
class VQGANConfig:
    """The ``model.params`` of ``vqgan.yaml`` (taming-transformers VQModel)."""

    embed_dim: int = 256
    n_embed: int = T.NUM_IMAGE_CODES
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embed != T.NUM_IMAGE_CODES:
            raise ValueError(f'the vocabulary holds {T.NUM_IMAGE_CODES} image codes, vqgan has {self.n_embed}')
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ValueError('VQGAN channels must be multiples of 32 (GroupNorm with 32 groups)')

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_yaml_dict(cls, data: dict[str, Any]) -> VQGANConfig:
        try:
            params = data['model']['params']
            dd = params['ddconfig']
        except (KeyError, TypeError) as exc:
            raise ValueError('vqgan.yaml has no model.params.ddconfig section') from exc
        if dd.get('double_z', False):
            raise ValueError('vqgan.yaml: double_z is not a VQGAN setting')
        return cls(
            embed_dim=int(params['embed_dim']),
            n_embed=int(params['n_embed']),
            z_channels=int(dd['z_channels']),
            resolution=int(dd['resolution']),
            in_channels=int(dd['in_channels']),
            out_ch=int(dd['out_ch']),
            ch=int(dd['ch']),
            ch_mult=tuple(int(m) for m in dd['ch_mult']),
            num_res_blocks=int(dd['num_res_blocks']),
            attn_resolutions=tuple(int(r) for r in dd.get('attn_resolutions') or ()),
            dropout=float(dd.get('dropout', 0.0)),
        )

    def to_yaml_dict(self) -> dict[str, Any]:
        return {
            'model': {
                'target': 'taming.models.vqgan.VQModel',
                'params': {
                    'embed_dim': self.embed_dim,
                    'n_embed': self.n_embed,
                    'ddconfig': {
                        'double_z': False,
                        'z_channels': self.z_channels,
                        'resolution': self.resolution,
                        'in_channels': self.in_channels,
                        'out_ch': self.out_ch,
                        'ch': self.ch,
                        'ch_mult': list(self.ch_mult),
                        'num_res_blocks': self.num_res_blocks,
                        'attn_resolutions': list(self.attn_resolutions),
                        'dropout': self.dropout,
                    },
                },
            }
        }

    def to_hf_dict(self) -> dict[str, Any]:
        """Keys of transformers' ``ChameleonVQVAEConfig`` (its encoder is reused as is)."""
        return {
            'embed_dim': self.embed_dim,
            'num_embeddings': self.n_embed,
            'double_latent': False,
            'latent_channels': self.z_channels,
            'resolution': self.resolution,
            'in_channels': self.in_channels,
            'base_channels': self.ch,
            'channel_multiplier': list(self.ch_mult),
            'num_res_blocks': self.num_res_blocks,
            'attn_resolutions': list(self.attn_resolutions),
            'dropout': self.dropout,
            'attn_type': 'vanilla',
        }


@dataclass(frozen=True)
class WorldVLAConfig:
    """What a checkpoint needs beyond the backbone: resolution, chunking, prompts, decoding limits.

    Stored under the ``worldvla`` key of ``config.json``; released checkpoints lack it and get
    the release's values (``for_release``).
    """

    resolution: int = 256
    chunk_size: int = 5
    min_actions: int = 1  # the model may end a chunk early (release); = chunk_size for fixed chunks
    history_frames: int = 2
    action_min: tuple[float, ...] = LIBERO_ACTION_MIN
    action_max: tuple[float, ...] = LIBERO_ACTION_MAX
    rotate_180: bool = True
    action_prompt: str = ACTION_PROMPT
    world_model_prompt: str = WORLD_MODEL_PROMPT
    max_tokens_per_action: int = 12
    max_image_tokens: int = 1200
    max_instruction_chars: int = 512
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resolution % 32 or self.resolution < 32:
            raise ValueError(f'resolution must be a positive multiple of 32, got {self.resolution}')
        if not 1 <= self.chunk_size <= 64:
            raise ValueError(f'chunk_size must be in 1 … 64, got {self.chunk_size}')
        if not 1 <= self.min_actions <= self.chunk_size:
            raise ValueError(f'min_actions must be in 1 … chunk_size, got {self.min_actions}')
        if self.history_frames not in (1, 2):
            raise ValueError(f'history_frames must be 1 or 2, got {self.history_frames}')
        if len(self.action_min) != T.ACTION_DIMS or len(self.action_max) != T.ACTION_DIMS:
            raise ValueError('action_min/action_max need 7 values')
        lo, hi = np.asarray(self.action_min, dtype=np.float64), np.asarray(self.action_max, dtype=np.float64)
        both = np.r_[lo, hi]
        if not np.all(np.isfinite(both)) or np.any(np.abs(both) > MAX_ACTION_UNITS):
            raise ValueError(f'action_min/action_max must be finite and within ±{MAX_ACTION_UNITS:g} action units, '
                             f'got {lo.tolist()} … {hi.tolist()}')
        if np.any(hi <= lo):
            raise ValueError(f'action_max must exceed action_min in every dimension, got {lo.tolist()} … {hi.tolist()}')
        if '{instruction}' not in self.action_prompt:
            raise ValueError('action_prompt must contain {instruction}')
        if not 1 <= self.max_instruction_chars <= T.MAX_INSTRUCTION_CHARS:
            raise ValueError(f'max_instruction_chars must be in 1 … {T.MAX_INSTRUCTION_CHARS}, got '
                             f'{self.max_instruction_chars}')
        if self.max_tokens_per_action < T.TOKENS_PER_ACTION:
            raise ValueError(f'max_tokens_per_action must be at least {T.TOKENS_PER_ACTION}')

    def replace(self, **changes: Any) -> WorldVLAConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['action_min'] = list(self.action_min)
        d['action_max'] = list(self.action_max)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldVLAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f'unknown worldvla settings: {sorted(unknown)}')
        data = dict(data)
        for key in ('action_min', 'action_max'):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)

    @classmethod
    def for_release(cls, resolution: int = 256, suite: str = '') -> WorldVLAConfig:
        """The published LIBERO checkpoints: 5 actions per chunk, 10 for LIBERO-10 (Long)."""
        long_horizon = suite.replace('-', '_').lower().endswith(('libero_10', '10'))
        return cls(resolution=resolution, chunk_size=10 if long_horizon else 5)


RELEASE_7B = BackboneConfig()
RELEASE_VQGAN = VQGANConfig()
TINY_BACKBONE = BackboneConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=128,
    max_position_embeddings=4096,
)
TINY_VQGAN = VQGANConfig(
    embed_dim=32, z_channels=32, resolution=256, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1
)
