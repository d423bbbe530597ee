"""The release's BPE text tokenizer (``text_tokenizer.json``) through the tokenizers library."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from . import tokens as T

# Tokens whose ids the WorldVLA layout relies on; a tokenizer.json that disagrees is not ours.
REQUIRED_IDS = {
    '<s>': T.BOS,
    '<eoss>': T.IMAGE_END,
    '<racm3:break>': T.IMAGE_START,
    T.reserved_name(T.END_OF_TURN): T.END_OF_TURN,
    T.reserved_name(T.IMAGE_NEWLINE): T.IMAGE_NEWLINE,
    T.reserved_name(T.ACTION_START): T.ACTION_START,
    T.reserved_name(T.ACTION_END): T.ACTION_END,
}


class TextTokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        from worldvla_ros.files import MB, check_regular

        check_regular(path, 256 * MB, 'text tokenizer')  # FileRefused is a ValueError
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f'{path}: not a readable tokenizers JSON file ({exc})') from exc
        for name, expected in REQUIRED_IDS.items():
            got = self.tokenizer.token_to_id(name)
            if got != expected:
                raise ValueError(f'{path}: token {name} has id {got}, WorldVLA needs {expected}')
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)
