"""Text ↔ token ids for the runner: a character tokenizer for the built-in model and a thin
adapter over Hugging Face tokenizers, with one interface (`Codec`)."""

from __future__ import annotations

import json
import string
from pathlib import Path

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


class Codec:
    """What training and decoding need of a tokenizer."""

    pad_id: int
    eos_id: int
    bos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class CharTokenizer(Codec):
    """One token per printable ASCII character, plus <pad>, <bos>, <eos>, <unk>."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, chars: str = string.printable[:95]) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be distinct")
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)
        self._ids = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}
        self.vocab_size = len(self.SPECIALS) + len(chars)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: list[int]) -> str:
        n = len(self.SPECIALS)
        return "".join(self.chars[i - n] for i in ids if n <= i < self.vocab_size)

    def save(self, directory: str | Path) -> None:
        Path(directory, CHAR_TOKENIZER_FILE).write_text(json.dumps({"chars": self.chars}))

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        path = Path(directory, CHAR_TOKENIZER_FILE)
        try:
            return cls(json.loads(path.read_text())["chars"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid character tokenizer ({e})") from None


class HFCodec(Codec):
    """A Hugging Face tokenizer seen through `Codec` (no special tokens inside texts)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the runner needs one to end answers")
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
