"""CLIP's byte-level BPE tokenizer, read from the vocabulary file in the bundle.

open_clip's `SimpleTokenizer` imports all of open_clip (torchvision, timm: hundreds of MB and
seconds at start-up) for a few hundred lines of work. This is the same algorithm on the same
vocabulary file (`bpe_simple_vocab_16e6.txt.gz`, copied into every bundle by `fedprompt export`):
text cleaned as open_clip's 'lower' cleaning does (`edge_client.text_cleaning`), split into
pieces (the special tokens, contractions, runs of letters, single digits, runs of other
symbols), each piece's UTF-8 bytes mapped to printable characters and merged pair by pair in the
order of the merge list. Ids equal open_clip's (tests/test_tokenizer.py).
"""

from __future__ import annotations

import gzip
import itertools
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

from edge_client.text_cleaning import clean_lower

START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
SPECIAL_TOKENS = (START_OF_TEXT, END_OF_TEXT)
END_OF_WORD = "</w>"
MERGES = (
    49152 - 256 - 2
)  # CLIP's merge rules: vocabulary = 256 bytes x 2 (in a word, at its end) + merges + 2
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
PRINTABLE_BYTES = (
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
)


class TokenizerError(ValueError):
    """The vocabulary file cannot be read as a CLIP BPE vocabulary."""


def byte_characters() -> dict[int, str]:
    """byte -> the printable character standing for it, in vocabulary order: printable Latin-1
    bytes stand for themselves, the others (controls, space, ...) for chr(256 + k) in byte order."""
    characters = {byte: chr(byte) for byte in PRINTABLE_BYTES}
    others = [byte for byte in range(256) if byte not in characters]
    characters.update({byte: chr(256 + k) for k, byte in enumerate(others)})
    return characters


def split_pieces(text: str) -> list[str]:
    """Pieces of cleaned text: a special token, a contraction ('s 't 're 've 'm 'll 'd), a run of
    letters, one number character, or a run of anything else but spaces (CLIP's split pattern)."""
    pieces, position = [], 0
    while position < len(text):
        char = text[position]
        end = position + 1
        fixed = next((t for t in (*SPECIAL_TOKENS, *CONTRACTIONS) if _starts_with(text, position, t)), None)
        if fixed is not None:
            end = position + len(fixed)
        elif _is_space(char):
            position = end
            continue
        elif _kind(char) == "L":
            while end < len(text) and _kind(text[end]) == "L":
                end += 1
        elif _kind(char) != "N":
            while end < len(text) and _kind(text[end]) not in "LN" and not _is_space(text[end]):
                end += 1
        pieces.append(text[position:end])
        position = end
    return pieces


def _starts_with(text: str, position: int, token: str) -> bool:
    """Case-insensitive, as CLIP's pattern is: 'ſ' (long s) matches 's'."""
    return text[position : position + len(token)].casefold() == token


def _is_space(char: str) -> bool:
    """Unicode White_Space (str.isspace() also counts the separators U+001C-U+001F), and U+0345,
    a combining mark that CLIP's case-insensitive pattern matches nowhere (it case-folds to a letter)."""
    return (char.isspace() and char not in "\x1c\x1d\x1e\x1f") or char == "\u0345"


def _kind(char: str) -> str:
    """'L' for a letter, 'N' for a number, the first letter of the Unicode category otherwise."""
    return unicodedata.category(char)[0]


class ClipTokenizer:
    """texts -> int64 token ids [N, context_length]: [SOT] tokens [EOT], zero padded; a text too long
    for the context keeps its first context_length - 1 tokens and ends with EOT (as open_clip)."""

    def __init__(self, vocab_file: Path, context_length: int) -> None:
        try:
            with gzip.open(vocab_file, "rt", encoding="utf-8") as handle:
                lines = handle.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise TokenizerError(f"cannot read the BPE vocabulary {vocab_file}: {error}") from error
        merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
        if len(merges) != MERGES or any(len(merge) != 2 for merge in merges):
            raise TokenizerError(f"{vocab_file} is not a CLIP BPE vocabulary ({MERGES} merge rules)")
        self._bytes = byte_characters()
        singles = list(self._bytes.values())
        vocabulary = [*singles, *(c + END_OF_WORD for c in singles), *("".join(m) for m in merges)]
        vocabulary += SPECIAL_TOKENS
        self.encoder = {token: index for index, token in enumerate(vocabulary)}
        self.vocab_size = len(self.encoder)
        self.sot_token_id, self.eot_token_id = (self.encoder[t] for t in SPECIAL_TOKENS)
        self.context_length = context_length
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._words: dict[str, list[str]] = {t: [t] for t in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT and EOT."""
        ids = []
        for piece in split_pieces(clean_lower(text)):
            characters = "".join(self._bytes[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._merge(characters))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        result = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = [*ids[: length - 1], self.eot_token_id]
            result[row, : len(ids)] = torch.tensor(ids)
        return result

    def _merge(self, word: str) -> list[str]:
        """BPE of one piece: start from its characters (the last one marked as the end of the word)
        and apply the best-ranked merge present, all its occurrences left to right, until none applies."""
        if word in self._words:
            return self._words[word]
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pair = min(itertools.pairwise(parts), key=lambda p: self._ranks.get(p, MERGES))
            if pair not in self._ranks:
                break
            merged, index = [], 0
            while index < len(parts):
                if index + 1 < len(parts) and (parts[index], parts[index + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    index += 2
                else:
                    merged.append(parts[index])
                    index += 1
            parts = merged
        self._words[word] = parts
        return parts
