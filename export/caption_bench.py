"""`fedprompt bench caption BUNDLE`: captions per second and latency per caption of the ONNX
decoder (onnxruntime) against torch generation (transformers' T5 on the bundle's tensors), with the
same search (greedy and beam) on the same inputs, and whether the two wrote the same tokens."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import torch

from edge_client.bundle import Bundle, BundleError
from edge_client.caption_search import Decoding, generate
from edge_client.captioner import TorchStepper
from edge_client.torch_threads import torch_threads
from export.caption_parity import random_image_inputs


def bench_captions(
    bundle: Bundle, batch_sizes: list[int], beams: list[int], max_tokens: int, runs: int, threads: int | None
) -> list[dict]:
    """One row per (decoding, batch, engine): captions/s, ms per caption (median of `runs`)."""
    captioner = bundle.captioner()
    engines = {
        "onnxruntime": bundle.caption_stepper(providers=["cpu"], threads=threads),
        "torch": TorchStepper(captioner),
    }
    spec = bundle.decoder_spec
    start, eos = int(spec["decoder_start_token_id"]), int(spec["eos_token_id"])
    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch_threads(threads):
        for beam in beams:
            for batch in batch_sizes:
                features, patches = random_image_inputs(captioner, batch, generator)
                outputs = {}
                for engine, stepper in engines.items():
                    decoding = Decoding(max_tokens=max_tokens, beams=beam)
                    generate(stepper, None, features, patches, start, eos, decoding)  # warm-up
                    times = []
                    for _ in range(runs):
                        began = time.perf_counter()
                        outputs[engine] = generate(stepper, None, features, patches, start, eos, decoding)
                        times.append(time.perf_counter() - began)
                    median = statistics.median(times)
                    rows.append(
                        {
                            "decoding": "greedy" if beam == 1 else f"beam {beam}",
                            "batch": batch,
                            "engine": engine,
                            "captions_per_s": batch / median,
                            "ms_per_caption": 1000 * median / batch,
                            "tokens_per_caption": sum(map(len, outputs[engine])) / batch,
                        }
                    )
                for row in rows[-2:]:
                    row["same_tokens"] = outputs["onnxruntime"] == outputs["torch"]
    return rows


@click.command("caption")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated image batch sizes.")
@click.option(
    "--beams", "beam_list", default="1,3", show_default=True, help="Comma-separated beam counts (1 = greedy)."
)
@click.option("--max-tokens", type=click.IntRange(1), default=24, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True)
@click.option(
    "--threads", type=click.IntRange(1), default=1, show_default=True, help="torch and onnxruntime threads."
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the rows here.")
def bench_caption(
    bundle_dir: Path,
    batch_sizes: str,
    beam_list: str,
    max_tokens: int,
    runs: int,
    threads: int,
    json_path: Path | None,
) -> None:
    """Caption generation: the ONNX decoder in onnxruntime against torch (transformers' T5), same
    search, same random image features; captions/s and ms per caption (median of --runs)."""
    try:
        bundle = Bundle.open(bundle_dir)
        bundle.require("captioning")
    except BundleError as error:
        raise click.ClickException(str(error)) from None
    rows = bench_captions(
        bundle,
        [int(b) for b in batch_sizes.split(",")],
        [int(b) for b in beam_list.split(",")],
        max_tokens,
        runs,
        threads,
    )
    header = f"{'decoding':<9}{'batch':>6}  {'engine':<12}{'captions/s':>11}{'ms/caption':>12}{'tokens':>8}"
    click.echo(f"{header}  same tokens")
    for row in rows:
        same = "yes" if row["same_tokens"] else "NO"
        click.echo(
            f"{row['decoding']:<9}{row['batch']:>6}  {row['engine']:<12}{row['captions_per_s']:>11.1f}"
            f"{row['ms_per_caption']:>12.2f}{row['tokens_per_caption']:>8.1f}  {same}"
        )
    if json_path is not None:
        json_path.write_text(
            json.dumps({"bundle": str(bundle_dir), "threads": threads, "rows": rows}, indent=2)
        )
