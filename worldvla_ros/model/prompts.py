"""Token sequences of the two tasks, as in the release (spec §5)."""
from __future__ import annotations

import unicodedata
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


MAX_INSTRUCTION_CHARS = T.MAX_INSTRUCTION_CHARS

# Bidirectional-text controls reorder what a log shows ("Trojan source"); other format characters stay.
_BIDI_CONTROLS = set('\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069')


def check_instruction(instruction: str, max_chars: int) -> str:
    """Whitespace collapsed to single spaces; ValueError for empty or over-long text and for
    control characters (NUL, escape sequences, bidi overrides), which no instruction needs."""
    text = normalize_instruction(instruction)
    if not text:
        raise ValueError('instruction is empty')
    if len(text) > max_chars:
        raise ValueError(f'instruction has {len(text)} characters, at most {max_chars}')
    bad = [ch for ch in text if unicodedata.category(ch) == 'Cc' or ch in _BIDI_CONTROLS]
    if bad:
        raise ValueError(f'instruction contains control characters ({", ".join(sorted({ascii(c) for c in bad}))}): '
                         f'{text[:80]!a}')
    return text


def normalize_instruction(instruction: str) -> str:
    """Whitespace collapsed to single spaces: the text ``check_instruction`` passes on."""
    return ' '.join(str(instruction).split())
