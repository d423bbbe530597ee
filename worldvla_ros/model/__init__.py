"""WorldVLA model core: plain PyTorch + transformers, no ROS.

Public names (stable): ``ActionTokenizer``, ``ImageTokenizer``, ``TextTokenizer``,
``action_attention_mask``, ``make_tiny_checkpoint``, ``load_policy``, ``WorldVLAPolicy``.
They are imported on first use, so that torch-free parts (``tokens``, ``action_tokenizer``,
used by the simulator) do not pull in torch and transformers (seconds of start-up).
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    'ActionTokenizer': 'action_tokenizer',
    'action_attention_mask': 'attention_mask',
    'CheckpointError': 'errors',
    'BackboneConfig': 'config',
    'VQGANConfig': 'config',
    'WorldVLAConfig': 'config',
    'DecodeCancelled': 'generate',
    'ImageSampling': 'generate',
    'NonFiniteLogits': 'generate',
    'generate_chunk_batched': 'generate',
    'generate_chunk_sequential': 'generate',
    'generate_image_block': 'generate',
    'ImageTokenizer': 'image_tokenizer',
    'image_block_length': 'image_tokenizer',
    'to_model_frame': 'image_tokenizer',
    'ActionPrediction': 'policy',
    'Timing': 'policy',
    'WorldVLAPolicy': 'policy',
    'load_policy': 'policy',
    'TextTokenizer': 'text_tokenizer',
    'make_tiny_checkpoint': 'tiny',
    'tokens': 'tokens',
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    module = importlib.import_module(f'{__name__}.{_WHERE[name]}')
    value = module if name == 'tokens' else getattr(module, name)
    globals()[name] = value
    return value
