"""WorldVLA model core: plain PyTorch + transformers, no ROS.

Public names (stable): ``ActionTokenizer``, ``ImageTokenizer``, ``TextTokenizer``,
``action_attention_mask``, ``make_tiny_checkpoint``, ``load_policy``, ``WorldVLAPolicy``.
"""
from . import tokens
from .action_tokenizer import ActionTokenizer
from .attention_mask import action_attention_mask
from .checkpoint import CheckpointError
from .config import BackboneConfig, VQGANConfig, WorldVLAConfig
from .generate import (
    ImageSampling,
    NonFiniteLogits,
    generate_chunk_batched,
    generate_chunk_sequential,
    generate_image_block,
)
from .image_tokenizer import ImageTokenizer, image_block_length, to_model_frame
from .policy import ActionPrediction, Timing, WorldVLAPolicy, load_policy
from .text_tokenizer import TextTokenizer
from .tiny import make_tiny_checkpoint

__all__ = [
    'ActionPrediction',
    'ActionTokenizer',
    'BackboneConfig',
    'CheckpointError',
    'ImageSampling',
    'ImageTokenizer',
    'NonFiniteLogits',
    'TextTokenizer',
    'Timing',
    'VQGANConfig',
    'WorldVLAConfig',
    'WorldVLAPolicy',
    'action_attention_mask',
    'generate_chunk_batched',
    'generate_chunk_sequential',
    'generate_image_block',
    'image_block_length',
    'load_policy',
    'make_tiny_checkpoint',
    'to_model_frame',
    'tokens',
]
