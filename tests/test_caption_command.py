"""`fedprompt caption` writes captions with the device's prompts in onnxruntime, in a process that
never imports torch, and they equal torch generation with the same prompts; `fedprompt bench
caption` reports both engines and that they wrote the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from edge_client.bundle import Bundle
from edge_client.caption_data import caption_features, open_images
from edge_client.caption_prompts import prompts_for, save_prompt_parts
from edge_client.caption_search import Decoding, generate
from edge_client.captioner import TorchStepper
from fedprompt.cli import main

RUN_CAPTION = """
import json, sys
from fedprompt.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps({"torch_imported": "torch" in sys.modules}))
"""


def write_images(folder: Path, n: int = 3) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def fused_parts(bundle: Bundle, tokens: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    d, dim = int(bundle.decoder_spec["d_model"]), bundle.embed_dim
    return {
        "global": rng.normal(0, 0.5, (tokens, d)),
        "local": rng.normal(0, 0.5, (tokens, d)),
        "gate_weight": rng.normal(0, 0.3, (3, dim)),
        "gate_bias": np.zeros(3),
        "modality_weight": rng.normal(0, 0.05, (tokens * d, dim)),
        "modality_bias": np.zeros(tokens * d),
    }


def test_caption_uses_the_device_prompts_without_torch(caption_bundle: Path, tmp_path: Path) -> None:
    bundle = Bundle.open(caption_bundle)
    images = write_images(tmp_path / "images")
    state = tmp_path / "state"
    parts = fused_parts(bundle)
    save_prompt_parts(state, parts)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_CAPTION,
            "caption",
            "--bundle",
            str(caption_bundle),
            "--state-dir",
            str(state),
            "--max-tokens",
            "10",
            "--json",
            *map(str, images),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    *lines, status = result.stdout.strip().splitlines()
    assert json.loads(status) == {"torch_imported": False}
    written = [row["caption"] for row in json.loads("\n".join(lines))]

    features, patches = caption_features(bundle, open_images(images))
    prompts = prompts_for({k: v.astype(np.float32) for k, v in parts.items()}, features)
    assert prompts.shape == (3, 3, bundle.decoder_spec["d_model"])
    spec = bundle.decoder_spec
    ids = generate(
        TorchStepper(bundle.captioner()),
        prompts,
        features,
        patches,
        spec["decoder_start_token_id"],
        spec["eos_token_id"],
        Decoding(max_tokens=10),
    )
    assert written == bundle.caption_tokenizer().decode_batch(ids)
    without = CliRunner().invoke(
        main, ["caption", "--bundle", str(caption_bundle), "--max-tokens", "10", str(images[0])]
    )
    assert without.exit_code == 0 and without.output.startswith(f"{images[0]}\t")


def test_bench_caption_compares_onnxruntime_with_torch(caption_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "caption",
            str(caption_bundle),
            "--batch-sizes",
            "2",
            "--beams",
            "1,2",
            "--max-tokens",
            "4",
            "--runs",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["decoding"], r["engine"]) for r in rows] == [
        ("greedy", "onnxruntime"),
        ("greedy", "torch"),
        ("beam 2", "onnxruntime"),
        ("beam 2", "torch"),
    ]
    assert all(r["same_tokens"] and r["captions_per_s"] > 0 for r in rows)


def test_caption_features_are_cached_by_content(caption_bundle: Path, tmp_path: Path) -> None:
    from edge_client.caption_data import cached_caption_features

    bundle = Bundle.open(caption_bundle)
    images = write_images(tmp_path / "images", 4)
    features, patches = caption_features(bundle, open_images(images))
    first = cached_caption_features(bundle, images[:3], tmp_path / "cache")
    again = cached_caption_features(bundle, images, tmp_path / "cache")
    assert (first[2].computed, again[2].hits, again[2].computed) == (3, 3, 1)
    np.testing.assert_array_equal(again[0], features)
    np.testing.assert_array_equal(again[1], patches)
