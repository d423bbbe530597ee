"""Token ids of the WorldVLA / Chameleon vocabulary (65536 entries)."""
from __future__ import annotations

VOCAB_SIZE = 65536

BOS = 0
PAD = 1
EOS = 2
UNK = 3
IMAGE_CODE_FIRST = 4  # the 8192 VQ codes live on ids 4 … 8195, permuted by name
IMAGE_CODE_LAST = 8195
NUM_IMAGE_CODES = 8192
IMAGE_END = 8196  # <eoss>
IMAGE_START = 8197  # <racm3:break>
END_OF_TURN = 8710  # <reserved08706>: end of prompt and generation stop
IMAGE_NEWLINE = 8803  # <reserved08799>
GRID_BASE = 8804  # grid-size token = GRID_BASE + side // 32
ACTION_START = 10004  # <reserved10000>
ACTION_END = 15004  # <reserved15000>
ACTION_BIN_FIRST = 10006
ACTION_BIN_LAST = 10261
ACTION_DIMS = 7
TOKENS_PER_ACTION = ACTION_DIMS + 2

RESERVED_OFFSET = 4  # <reservedNNNNN> has id NNNNN + 4


def reserved_name(token_id: int) -> str:
    return f'<reserved{token_id - RESERVED_OFFSET:05d}>'


def grid_token(side_px: int) -> int:
    if side_px % 32:
        raise ValueError(f'image side {side_px} px is not a multiple of 32')
    return GRID_BASE + side_px // 32

MAX_INSTRUCTION_CHARS = 4096  # no checkpoint may allow longer instructions (its max_instruction_chars is capped)
