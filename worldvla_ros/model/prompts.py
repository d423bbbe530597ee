"""Token sequences of the two tasks, as in the release (spec §5)."""
from __future__ import annotations

from collections.abc import Sequence

from . import tokens as T
from .text_tokenizer import TextTokenizer


def action_prompt(
    text: TextTokenizer, image_blocks: Sequence[Sequence[int]], instruction: str, template: str
) -> list[int]:
    """``BOS, "What action should the robot take to …?", IMG(t-1), IMG(t), 8710``."""
    ids = [T.BOS, *text.encode(template.format(instruction=instruction))]
    for block in image_blocks:
        ids.extend(block)
    ids.append(T.END_OF_TURN)
    return ids


def world_model_prompt(
    text: TextTokenizer, image_block: Sequence[int], action_ids: Sequence[int], template: str
) -> list[int]:
    """``BOS, "Generate the next image …", IMG(t), ACT(t), 8710``."""
    return [T.BOS, *text.encode(template), *image_block, *action_ids, T.END_OF_TURN]
