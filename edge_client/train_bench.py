"""`fedprompt bench train BUNDLE`: one local training step of fedprompt against the computation
pattern of the official prompt-learning codes, in one process, with a check that both compute the
same loss and gradient.

The official codes (CoOp, PromptFL, DP-FPL, pFedMoAP) run the frozen image encoder on every batch
and send every class prompt through the text tower at the full context length at every step.
fedprompt reads cached image features, cuts the prompts after the last EOT, and runs the prefix
shared by all classes (SOS + context) once. Each saving is exact, so loss and gradient must agree.
Variants are timed interleaved (A B C D A B C D ...) so that load from other processes hits all
of them alike; the ratio of medians is reported.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch

from edge_client.afspl_bench import afspl_benchmark
from edge_client.bundle import Bundle, BundleError
from edge_client.fedmvp_bench import fedmvp_benchmark
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.prompts import initial_context, tokenize_class_prompts
from edge_client.step_timing import compare_steps, max_rel_error
from edge_client.torch_threads import torch_threads
from edge_client.training import normalise, prompt_loss

ADJECTIVES = ("red", "small", "wild", "old", "striped", "golden", "wooden", "spotted", "tall", "frozen")
NOUNS = ("fox", "teapot", "sailboat", "mushroom", "violin", "lighthouse", "beetle", "cactus", "kite", "otter")
TOLERANCE = 1e-4


def class_names(count: int) -> list[str]:
    """`count` distinct, realistic two-to-four-token class names."""
    names = [f"{adjective} {noun}" for noun in NOUNS for adjective in ADJECTIVES]
    names += [f"{a} {b} {noun}" for noun in NOUNS for a in ADJECTIVES for b in ADJECTIVES if a != b]
    return names[:count]


@dataclass(frozen=True)
class Variant:
    """One way to take a training step: where image features come from, how prompts are encoded."""

    name: str
    image_encoder_each_step: bool
    encoding: str


VARIANTS = (
    Variant("official: image encoder each step + full-length prompts", True, "full"),
    Variant("cached image features + full-length prompts", False, "full"),
    Variant("cached image features + cut prompts", False, "cut"),
    Variant("fedprompt: cached features + cut + shared prefix", False, "shared"),
)


def make_step(
    variant: Variant,
    bundle: Bundle,
    session: ort.InferenceSession,
    images: np.ndarray,
    cached: torch.Tensor,
    labels: torch.Tensor,
    ctx: torch.Tensor,
    names: list[str],
) -> tuple[Callable[[], tuple[float, torch.Tensor]], int]:
    """A closure that takes one step (forward + backward to ctx) and returns (loss, gradient); also
    the prompt length it encodes."""
    tower = bundle.text_tower()
    eot = int(bundle.manifest["tokenizer"]["eot_token_id"])
    encode = PromptTextEncoder(
        tower, tokenize_class_prompts(bundle.tokenizer(), names, len(ctx), eot), variant.encoding
    )

    def step() -> tuple[float, torch.Tensor]:
        if variant.image_encoder_each_step:
            features = normalise(torch.from_numpy(session.run(["image_features"], {"images": images})[0]))
        else:
            features = cached
        parameter = ctx.clone().requires_grad_(True)
        loss, _ = prompt_loss(parameter, encode, features, labels, bundle.logit_scale)
        loss.backward()
        return float(loss.detach()), parameter.grad

    return step, encode.prompts.length


def run_benchmark(
    bundle_dir: Path,
    classes: int,
    batch_size: int,
    steps: int,
    n_ctx: int,
    precision: str,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Time every variant `steps` times (after one warm-up each), interleaved; compare with the first.
    `threads` (None = the libraries' defaults) applies to torch and onnxruntime alike."""
    with torch_threads(threads):
        return _run_benchmark(bundle_dir, classes, batch_size, steps, n_ctx, precision, threads, seed)


def _run_benchmark(
    bundle_dir: Path,
    classes: int,
    batch_size: int,
    steps: int,
    n_ctx: int,
    precision: str,
    threads: int | None,
    seed: int,
) -> dict:
    bundle = Bundle.open(bundle_dir)
    session = bundle.image_session(precision, providers=["cpu"], threads=threads)
    generator = torch.Generator().manual_seed(seed)
    size = bundle.manifest["image_size"]
    images = torch.randn(batch_size, 3, *size, generator=generator).numpy()
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    cached = normalise(torch.from_numpy(session.run(["image_features"], {"images": images})[0]))
    ctx = initial_context(n_ctx, int(bundle.manifest["text_width"]), 0.02, seed)
    names = class_names(classes)
    step_fns, lengths = zip(
        *(make_step(v, bundle, session, images, cached, labels, ctx, names) for v in VARIANTS), strict=True
    )
    steps_by_name = {variant.name: fn for variant, fn in zip(VARIANTS, step_fns, strict=True)}
    rows = compare_steps(steps_by_name, steps, progress=True)
    for row, length in zip(rows, lengths, strict=True):
        row["prompt_length"] = length
    fedprompt = rows[-1]
    return {
        "bundle": str(bundle_dir),
        "model": bundle.manifest["model"],
        "classes": classes,
        "batch_size": batch_size,
        "n_ctx": n_ctx,
        "steps": steps,
        "precision": precision,
        "threads": threads,
        "rows": rows,
        "speedup": fedprompt["speedup"],
        "max_rel_error": max_rel_error(rows),
        "machine": machine_description(),
    }


def machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


@click.command("train")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--classes", type=click.IntRange(min=2), default=100, show_default=True, help="Number of classes."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per step."
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Timed steps per variant (after one warm-up).",
)
@click.option("--n-ctx", type=click.IntRange(min=1), default=16, show_default=True, help="Context vectors.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default="fp32",
    show_default=True,
    help="Image-encoder graph used by the official pattern and to fill the cache.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Threads for torch and onnxruntime alike. One thread each measures work saved rather than "
    "thread scheduling, which on a busy machine hurts the many small operations of the fast path most.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write results here."
)
def bench_train(
    bundle: Path,
    classes: int,
    batch_size: int,
    steps: int,
    n_ctx: int,
    precision: str,
    threads: int,
    json_path: Path | None,
) -> None:
    """Time one local training step of fedprompt (cached image features, prompts cut after the last
    EOT, class-shared prefix computed once) against the official codes' pattern (image encoder every
    step, every class prompt at full length), check that loss and gradient agree (relative error
    < 1e-4), and print the speed-up. CPU only, one process."""
    try:
        report = run_benchmark(bundle, classes, batch_size, steps, n_ctx, precision, threads)
    except BundleError as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"{report['model']}: {classes} classes, batch {batch_size}, n_ctx {n_ctx}, {steps} timed steps"
    )
    click.echo(f"{'variant':58} {'median s':>9} {'speed-up':>9} {'loss rel err':>13} {'grad rel err':>13}")
    for row in report["rows"]:
        click.echo(
            f"{row['variant']:58} {row['median_s']:9.3f} {row['speedup']:8.1f}x "
            f"{row['loss_rel_error']:13.1e} {row['grad_rel_error']:13.1e}"
        )
    if "visual_prompts" in Bundle.open(bundle).capabilities:
        report["fedmvp"] = fedmvp_benchmark(
            bundle, class_names(classes), batch_size, steps, precision, threads
        )
        click.echo(
            f"FedMVP: {report['fedmvp']['sentences']} attribute sentences, PromptFormer through the tower"
        )
        for row in report["fedmvp"]["rows"]:
            click.echo(
                f"{row['variant'][:58]:58} {row['median_s']:9.3f} {row['speedup']:8.1f}x "
                f"{row['loss_rel_error']:13.1e} {row['grad_rel_error']:13.1e}"
            )
        click.echo(
            f"fedprompt's FedMVP step is {report['fedmvp']['speedup']:.1f}x faster than the official pattern"
        )
    if "captioning" in Bundle.open(bundle).capabilities:
        report["afspl"] = afspl_benchmark(bundle, batch_size, steps, threads)
        click.echo("AFSPL: fused caption prompt through the frozen T5 decoder")
        for row in report["afspl"]["rows"]:
            click.echo(
                f"{row['variant'][:58]:58} {row['median_s']:9.3f} {row['speedup']:8.1f}x "
                f"{row['loss_rel_error']:13.1e} {row['grad_rel_error']:13.1e}"
            )
        click.echo(f"fedprompt's AFSPL step is {report['afspl']['speedup']:.1f}x faster than re-encoding")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {json_path}")
    worst = max(
        report["max_rel_error"],
        report.get("fedmvp", {}).get("max_rel_error", 0.0),
        report.get("afspl", {}).get("max_rel_error", 0.0),
    )
    if worst >= TOLERANCE:
        raise click.ClickException(f"loss/gradient differ from the official pattern by {worst:.1e}")
    click.echo(
        f"fedprompt's step is {report['speedup']:.1f}x faster than the official pattern, same loss and grad"
    )
