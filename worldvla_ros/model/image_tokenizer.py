"""RGB frames ↔ image token blocks: preprocessing, VQGAN codes, vocabulary mapping, layout."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

from worldvla_ros.image_conversion import to_model_frame  # the model's crop, used here and re-exported

from . import tokens as T
from .vqgan import VQGAN


def image_block_length(side_px: int, downsample: int = 16) -> int:
    """Tokens of one square image block: start, 2 grid tokens, rows of codes + newline, end."""
    n = side_px // downsample
    return 3 + n * (n + 1) + 1


class ImageTokenizer:
    """Frames → token blocks (and back) through the VQGAN and the BPE ``IMGIMG…`` name mapping."""

    def __init__(
        self, vqgan: VQGAN, vocab: Mapping[str, int], resolution: int, rotate_180: bool = True
    ) -> None:
        if resolution % vqgan.cfg.downsample:
            raise ValueError(f'resolution {resolution} is not a multiple of {vqgan.cfg.downsample}')
        self.vqgan = vqgan
        self.resolution = resolution
        self.rotate_180 = rotate_180
        self.grid = resolution // vqgan.cfg.downsample
        mapping = ChameleonImageVocabularyMapping(dict(vocab))
        bpe2img = mapping.bpe2img
        if len(bpe2img) != T.NUM_IMAGE_CODES or sorted(bpe2img.values()) != list(range(T.NUM_IMAGE_CODES)):
            raise ValueError(
                f'the text tokenizer must name {T.NUM_IMAGE_CODES} image tokens IMGIMG…, one per VQ code'
            )
        img2bpe = np.zeros(T.NUM_IMAGE_CODES, dtype=np.int64)
        bpe2img_arr = np.full(T.VOCAB_SIZE, -1, dtype=np.int64)
        for bpe, code in bpe2img.items():
            img2bpe[code] = bpe
            bpe2img_arr[bpe] = code
        self.img2bpe = img2bpe
        self.bpe2img = bpe2img_arr
        self.image_token_ids = np.sort(img2bpe)

    @property
    def block_length(self) -> int:
        return image_block_length(self.resolution, self.vqgan.cfg.downsample)

    @property
    def device(self) -> torch.device:
        return next(self.vqgan.parameters()).device

    def preprocess(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """List of H×W×3 uint8 RGB → (B, 3, R, R) float in [-1, 1] on the VQGAN's device."""
        batch = np.stack([to_model_frame(f, self.resolution, self.rotate_180) for f in frames])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
        dtype = next(self.vqgan.parameters()).dtype
        return x.to(dtype) / 127.5 - 1.0

    def encode_codes(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """(B, grid, grid) VQ codes."""
        return self.vqgan.encode(self.preprocess(frames)).cpu().numpy()

    def codes_to_block(self, codes: np.ndarray) -> list[int]:
        codes = np.asarray(codes)
        if codes.shape != (self.grid, self.grid):
            raise ValueError(f'expected a {self.grid}×{self.grid} code grid, got {codes.shape}')
        grid_tok = T.grid_token(self.resolution)
        rows = np.concatenate(
            [self.img2bpe[codes], np.full((self.grid, 1), T.IMAGE_NEWLINE, dtype=np.int64)], axis=1
        )
        return [T.IMAGE_START, grid_tok, grid_tok, *rows.reshape(-1).tolist(), T.IMAGE_END]

    def encode(self, frames: Sequence[np.ndarray]) -> list[list[int]]:
        """Frames → one token block each (``block_length`` tokens)."""
        return [self.codes_to_block(c) for c in self.encode_codes(frames)]

    def block_to_codes(self, block: Sequence[int]) -> np.ndarray:
        ids = np.asarray(block, dtype=np.int64)
        if len(ids) != self.block_length:
            raise ValueError(f'image block has {len(ids)} tokens, expected {self.block_length}')
        grid_tok = T.grid_token(self.resolution)
        if ids[0] != T.IMAGE_START or ids[1] != grid_tok or ids[2] != grid_tok or ids[-1] != T.IMAGE_END:
            raise ValueError('image block does not start with 8197, grid, grid and end with 8196')
        rows = ids[3:-1].reshape(self.grid, self.grid + 1)
        if np.any(rows[:, -1] != T.IMAGE_NEWLINE):
            raise ValueError('image block rows do not end with the newline token 8803')
        codes = self.bpe2img[rows[:, :-1]]
        if np.any(codes < 0):
            raise ValueError('image block holds tokens that are not image codes')
        return codes

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """(B, grid, grid) codes → (B, R, R, 3) uint8 RGB in the camera's orientation."""
        x = self.vqgan.decode(torch.as_tensor(np.asarray(codes), device=self.device).long())
        img = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        out = img.cpu().numpy()
        if self.rotate_180:
            out = out[:, ::-1, ::-1]
        return np.ascontiguousarray(out)

    def decode(self, block: Sequence[int]) -> np.ndarray:
        return self.decode_codes(self.block_to_codes(block)[None])[0]
