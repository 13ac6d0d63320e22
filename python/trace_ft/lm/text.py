"""Text ↔ token ids for the runner: a character tokenizer for the built-in model and a thin
adapter over Hugging Face tokenizers, with one interface (`Codec`)."""

from __future__ import annotations

import functools
import hashlib
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

    @property
    def text_prefix(self) -> list[int]:
        """The ids the tokenizer itself puts before a plain text (Gemma's: bos; SmolLM2's:
        none): what perplexity windows and benchmark contexts start with, as lm-eval does
        by following the tokenizer's default (Gemma scores far worse without its bos)."""
        return []

    def prompt_ids(self, prompt: str) -> list[int]:
        """A task's prompt as the model reads it: bos (where there is one), then the text."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(prompt)

    def answer_ids(self, answer: str) -> list[int]:
        """A task's answer as the model writes it: the text, then the token that ends it."""
        return self.encode(answer) + [self.eos_id]

    def answer_text(self, ids: list[int]) -> str:
        """A generated answer's text, as a task's scorer reads it."""
        return self.decode(ids)

    def fingerprint(self) -> str:
        """sha256 of what decides the ids of any text (kept scores are filed under it)."""
        return hashlib.sha256(json.dumps(self._identity(), sort_keys=True).encode()).hexdigest()

    def _identity(self) -> dict:
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

    def _identity(self) -> dict:
        return {"kind": "char", "chars": self.chars}

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
    """A Hugging Face tokenizer seen through `Codec` (no special tokens inside texts).

    chat: wrap each prompt as a user turn of the tokenizer's chat template (with the
    template's default system turn, if it has one) and end each answer, the assistant's
    turn, with the template's end-of-turn token, which is then `eos_id` (where decoding
    stops). None: on where the tokenizer has a chat template. Without chat (a base model),
    the plain framing: bos, the prompt, then `PLAIN_SEPARATOR`; the answer after a space,
    ended by the tokenizer's eos token, where decoding stops; a generated answer is read up
    to the end of its first line (`answer_text`)."""

    PLAIN_SEPARATOR = "\nAnswer:"

    def __init__(self, tokenizer, chat: bool | None = None) -> None:
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the runner needs one to end answers")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("chat: the tokenizer has no chat template (turn chat off)")
        self.chat = has_template if chat is None else bool(chat)
        self.eos_id = self._end_of_turn() if self.chat else tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @functools.cached_property
    def text_prefix(self) -> list[int]:  # (once: an encoding set reads it for every example)
        probe = "a"
        default, plain = self.tok(probe)["input_ids"], self.encode(probe)
        if len(default) <= len(plain) or default[len(default) - len(plain):] != plain:
            return []
        return list(default[:len(default) - len(plain)])

    def _identity(self) -> dict:
        backend = getattr(self.tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else sorted(self.tok.get_vocab().items())
        return {"kind": "hf", "tokenizer": vocab, "chat": self.chat,
                "template": getattr(self.tok, "chat_template", None) if self.chat else None,
                "eos": self.eos_id, "bos": self.bos_id, "pad": self.pad_id}

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _end_of_turn(self) -> int:
        """The special token the template writes right after an assistant message (e.g.
        ``<|im_end|>``, ``<|eot_id|>``), else the eos token."""
        mark = "Zq9 answer mark"
        text = self._template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], False)
        after = self.encode(text[text.index(mark) + len(mark):]) if mark in text else []
        special = set(self.tok.all_special_ids) | set(getattr(self.tok, "added_tokens_decoder", {}))
        return after[0] if after and after[0] in special else self.tok.eos_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        if not self.chat:
            return super().prompt_ids(prompt + self.PLAIN_SEPARATOR)
        return self.encode(self._template([{"role": "user", "content": prompt}], True))

    def answer_ids(self, answer: str) -> list[int]:
        return super().answer_ids(answer if self.chat else " " + answer)

    def answer_text(self, ids: list[int]) -> str:
        """Plain framing stops at eos or at the end of the answer's first line (leading
        blank space skipped): a base model that has not learned to write eos goes on to the
        next "Question:" (lm-eval's generation tasks stop at a newline for the same reason)."""
        text = self.decode(ids)
        return text if self.chat else text.lstrip().split("\n", 1)[0]
