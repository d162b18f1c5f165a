"""The device's CLIP tokenizer (no open_clip, ftfy or regex) gives open_clip's ids: on many texts,
on its cleaning of every BMP character, and on its split of every assigned BMP character; and the
edge client imports nothing of open_clip."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
from open_clip.tokenizer import SimpleTokenizer, _clean_lower, default_bpe

from edge_client.bundle import Bundle
from edge_client.text_cleaning import clean_lower
from edge_client.tokenizer import ClipTokenizer, TokenizerError, split_pieces
from export.verify import TOKENIZER_PROBES

CLIP_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
CLASS_NAMES = [
    "golden_retriever",
    "Welsh Springer Spaniel",
    "jack-o'-lantern",
    "yellow lady's slipper",
    "T-shirt/top",
    "crêpe",
    "Ankle boot",
    "soccer ball (football)",
    "7-Eleven store",
    "mañana",
    "Pokémon",
    "piñata",
    "Ʃigma",
    "O'Neill's",
    "ROCK 'N' ROLL",
    "e-mail",
    "Dvořák",
    "naïve café",
    "北京烤鸭",
    "ramen 🍜",
    "&amp;",
    "C++",
    "50% off!!!",
    "",
]


def _assigned_in_this_python(text: str) -> bool:
    """Characters unassigned in this Python's Unicode database (newer than it) may split differently."""
    return all(unicodedata.category(c) != "Cn" for c in text)


def _random_texts(count: int) -> list[str]:
    generator = random.Random(0)
    pool = [chr(c) for c in [*range(32, 127)] * 8 + [*range(0xA0, 0x3000, 5), *range(0x1F300, 0x1F650, 3)]]
    texts = ["".join(generator.choice(pool) for _ in range(generator.randint(0, 60))) for _ in range(count)]
    return [t for t in texts if _assigned_in_this_python(t)]


@pytest.fixture(scope="module")
def tokenizers(tiny_bundle: Path) -> tuple[ClipTokenizer, SimpleTokenizer]:
    bundle = Bundle.open(tiny_bundle)
    return bundle.tokenizer(), SimpleTokenizer(context_length=bundle.context_length)


def test_ids_equal_open_clips_on_many_texts(tokenizers: tuple[ClipTokenizer, SimpleTokenizer]) -> None:
    ours, theirs = tokenizers
    texts = [*TOKENIZER_PROBES, *CLASS_NAMES, *(f"a photo of a {name}." for name in CLASS_NAMES)]
    texts += _random_texts(2000)
    mine, reference = ours(texts), theirs(texts)
    differing = [t for t, a, b in zip(texts, mine, reference, strict=True) if not torch.equal(a, b)]
    assert not differing, differing[:5]
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (49406, 49407, 49408)


def test_long_text_is_cut_at_the_context_length_and_ends_with_eot(
    tokenizers: tuple[ClipTokenizer, SimpleTokenizer],
) -> None:
    ours, theirs = tokenizers
    ids = ours(["many words " * 100], context_length=12)
    assert ids.shape == (1, 12) and int(ids[0, -1]) == ours.eot_token_id
    assert torch.equal(ids, theirs(["many words " * 100], context_length=12))


def test_cleaning_of_every_bmp_character_equals_open_clips() -> None:
    differing = []
    for code in range(0x10000):
        text = f"a{chr(code)}b {chr(code)}{chr(code)}"
        if clean_lower(text) != _clean_lower(text):
            differing.append(hex(code))
    assert not differing, differing[:20]


def test_split_of_every_assigned_bmp_character_equals_clips_pattern() -> None:
    differing = []
    for code in range(0x10000):
        char = chr(code)
        if unicodedata.category(char) in ("Cn", "Cs"):
            continue
        for text in (f"a{char}b", f"'{char}x {char}{char}1", f"!{char}!"):
            if split_pieces(text) != CLIP_PATTERN.findall(text):
                differing.append(hex(code))
                break
    assert not differing, differing[:20]


def test_a_damaged_vocabulary_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not-gzip.gz").write_bytes(b"plain")
    with pytest.raises(TokenizerError, match="cannot read the BPE vocabulary"):
        ClipTokenizer(tmp_path / "not-gzip.gz", 77)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    with gzip.open(tmp_path / "short.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines[:1000]))
    with pytest.raises(TokenizerError, match="is not a CLIP BPE vocabulary"):
        ClipTokenizer(tmp_path / "short.gz", 77)


def test_the_edge_client_tokenizes_without_importing_open_clip(tiny_bundle: Path) -> None:
    code = (
        "import sys; from edge_client.bundle import Bundle; import edge_client.workspace; "
        f"ids = Bundle.open({str(tiny_bundle)!r}).tokenizer()(['a photo of a cat.']); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'ftfy', 'regex')); "
        "assert not heavy, heavy; print(ids[0, :7].tolist())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = SimpleTokenizer()(["a photo of a cat."])[0, :7].tolist()
    assert result.stdout.strip() == str(expected)
