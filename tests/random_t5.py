"""A small random-weight T5 saved to a folder with transformers, as a user's local checkpoint would be."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

WORDS = (
    "<pad>",
    "</s>",
    "<unk>",
    *[
        "a",
        "an",
        "the",
        "bag",
        "shoe",
        "red",
        "blue",
        "on",
        "at",
        "left",
        "right",
        "top",
        "bottom",
        "two",
        "three",
    ],
)


def save_random_t5(folder: Path, seed: int = 0) -> Path:
    """Config, safetensors weights and a word-level fast tokenizer (pad 0, eos 1, unk 2)."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        feed_forward_proj="gated-gelu",
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    return folder
