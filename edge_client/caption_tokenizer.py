"""The decoder's tokenizer on the device: the bundle's Hugging Face tokenizer.json read with the
`tokenizers` library (no transformers, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer


class CaptionTokenizer:
    """Text <-> decoder token ids; encoded captions end with EOS, decoding stops at it."""

    def __init__(self, path: Path, eos_id: int, pad_id: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(path))
        self.eos_id, self.pad_id = eos_id, pad_id

    def encode(self, text: str) -> list[int]:
        return [*self.tokenizer.encode(text, add_special_tokens=False).ids, self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]
