"""`fedprompt bench BUNDLE`: speed of the frozen encoders, all in one process so ratios hold on a
busy machine.

Image encoder: throughput and latency of torch eager (open_clip) and of onnxruntime per usable
provider and per precision in the bundle. Text tower: forward+backward through the torch tower for K
CoOp-style class prompts, at full context length and cut after the last EOT.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from edge_client.bundle import Bundle, BundleError
from edge_client.providers import ProviderError, resolve_provider, usable_providers
from edge_client.text_tower import FrozenTextTower
from export.errors import ExportError
from export.verify import rebuild_model, summary

MIN_SECONDS = 1.0  # time each configuration for at least this long...
MIN_RUNS, MAX_RUNS = 3, 50  # ...with at least MIN_RUNS and at most MAX_RUNS timed runs
CONTEXT_TOKENS = 16  # CoOp's learnable context length


def time_runs(run: Callable[[], Any], min_seconds: float = MIN_SECONDS) -> list[float]:
    """Seconds per call after one warm-up call, repeated until min_seconds and MIN_RUNS are reached."""
    run()
    times: list[float] = []
    while len(times) < MAX_RUNS and (len(times) < MIN_RUNS or sum(times) < min_seconds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def latency_row(engine: str, provider: str, precision: str, batch: int, times: list[float]) -> dict[str, Any]:
    p50 = statistics.median(times)
    return {
        "engine": engine,
        "provider": provider,
        "precision": precision,
        "batch": batch,
        "images_per_s": batch / p50,
        "p50_ms": 1e3 * p50,
        "p95_ms": 1e3 * float(np.percentile(times, 95)),
        "runs": len(times),
    }


def class_prompt_tokens(bundle: Bundle, classes: int) -> torch.Tensor:
    """Token ids of CoOp prompts 'X X ... X <class name>.' for `classes` synthetic class names."""
    placeholder = " ".join(["X"] * CONTEXT_TOKENS)
    return bundle.tokenizer()([f"{placeholder} object number {i}." for i in range(classes)])


def text_step(
    tower: FrozenTextTower, ids: torch.Tensor, context: torch.Tensor, length: int
) -> Callable[[], None]:
    """One forward+backward of all class prompts at sequence length `length`, gradient to the context."""
    suffix = tower.embed_tokens(ids[:, 1 + CONTEXT_TOKENS : length])
    prefix = tower.embed_tokens(ids[:, :1])
    eot = tower.eot_positions(ids)

    def step() -> None:
        context.grad = None
        prompts = torch.cat([prefix, context.expand(len(ids), -1, -1), suffix], dim=1)
        tower(prompts, eot).square().mean().backward()

    return step


def bench_text(bundle: Bundle, classes: int) -> dict[str, Any]:
    """Forward+backward over `classes` prompts at full context length and cut after the last EOT."""
    tower = bundle.text_tower()
    ids = class_prompt_tokens(bundle, classes)
    context = torch.randn(1, CONTEXT_TOKENS, tower.spec.width).mul_(0.02).requires_grad_()
    lengths = {"full": bundle.context_length, "cut": tower.cut_length(tower.eot_positions(ids))}
    steps = {name: text_step(tower, ids, context, length) for name, length in lengths.items()}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(MIN_RUNS):  # interleaved, so that a burst of load elsewhere hits both alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    result = {
        name: {"length": lengths[name], "seconds_p50": statistics.median(t), "runs": len(t)}
        for name, t in times.items()
    }
    return {
        "classes": classes,
        **result,
        "speedup": result["full"]["seconds_p50"] / result["cut"]["seconds_p50"],
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "usable_providers": usable_providers(),
    }


@click.command("encoders")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated image batch sizes.")
@click.option(
    "--providers",
    default=None,
    help="Comma-separated onnxruntime providers (cpu, cuda, tensorrt or full names); "
    "default: every provider usable here.",
)
@click.option(
    "--classes",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Class prompts for the text-tower forward+backward timing.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch and onnxruntime (default: all cores). On a machine busy with "
    "other work, 1 gives steadier figures.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results here.")
def bench_encoders(
    bundle_path: Path,
    batch_sizes: str,
    providers: str | None,
    classes: int,
    threads: int | None,
    json_path: Path | None,
) -> None:
    """Benchmark a BUNDLE's frozen encoders: image encoder throughput (images/s) and latency p50/p95 for
    torch eager and onnxruntime (per provider and precision), and text-tower forward+backward time for
    CLASSES prompts at full context vs cut after the last EOT."""
    try:
        sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
        chosen = (
            [resolve_provider(p.strip()) for p in providers.split(",")] if providers else usable_providers()
        )
        bundle = Bundle.open(bundle_path)
        model = rebuild_model(bundle)
    except ValueError as error:  # includes ProviderError
        raise click.ClickException(f"--batch-sizes/--providers: {error}") from None
    except (BundleError, ExportError, ProviderError) as error:
        raise click.ClickException(str(error)) from None
    if not sizes or min(sizes) < 1:
        raise click.ClickException("--batch-sizes needs positive integers, e.g. 1,8,32")
    if threads:
        torch.set_num_threads(threads)
    click.echo(f"bundle: {summary(bundle.manifest)}")
    rows = bench_images(bundle, model, sizes, chosen, threads)
    click.echo("text tower forward+backward ...")
    text = bench_text(bundle, classes)
    _print(rows, text)
    if json_path:
        report = {
            "bundle": str(bundle_path),
            "model": bundle.manifest["model"],
            "machine": machine(),
            "image": rows,
            "text": text,
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


@torch.no_grad()
def bench_images(
    bundle: Bundle, model: torch.nn.Module, sizes: list[int], providers: list[str], threads: int | None = None
) -> list[dict]:
    """One row per (engine, provider, precision, batch). Each onnxruntime session lives only while it is
    measured, so that no idle session competes with the next measurement."""
    configs = [
        ("onnxruntime", provider, precision) for provider in providers for precision in bundle.precisions
    ]
    rng = np.random.default_rng(0)
    batches = {
        b: rng.standard_normal((b, 3, *bundle.manifest["image_size"]), dtype=np.float32) for b in sizes
    }
    rows: list[dict] = []
    with tqdm(total=(len(configs) + 1) * len(sizes), desc="image encoder", unit="config") as bar:
        for batch, images in batches.items():
            bar.set_postfix_str(f"torch eager batch {batch}")
            tensor = torch.from_numpy(images)
            times = time_runs(lambda tensor=tensor: model.encode_image(tensor))
            rows.append(latency_row("torch eager", "cpu", "fp32", batch, times))
            bar.update()
        for engine, provider, precision in configs:
            session = bundle.image_session(precision, providers=[provider], threads=threads)
            if session.get_providers()[0] != provider:
                bar.update(len(sizes))  # onnxruntime fell back to another provider: nothing to measure
                continue
            for batch, images in batches.items():
                bar.set_postfix_str(f"{_short(provider)} {precision} batch {batch}")
                feeds = {"images": images}
                times = time_runs(lambda session=session, feeds=feeds: session.run(None, feeds))
                rows.append(latency_row(engine, _short(provider), precision, batch, times))
                bar.update()
            del session
    return sorted(rows, key=lambda r: (r["batch"], r["engine"] != "torch eager"))


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider").lower()


def _print(rows: list[dict], text: dict[str, Any]) -> None:
    click.echo(
        f"\n{'engine':<12} {'provider':<9} {'precision':<9} {'batch':>5} {'images/s':>9} "
        f"{'p50 ms':>9} {'p95 ms':>9}"
    )
    for r in rows:
        click.echo(
            f"{r['engine']:<12} {r['provider']:<9} {r['precision']:<9} {r['batch']:>5} "
            f"{r['images_per_s']:>9.1f} {r['p50_ms']:>9.2f} {r['p95_ms']:>9.2f}"
        )
    full, cut = text["full"], text["cut"]
    click.echo(
        f"\ntext tower forward+backward, {text['classes']} class prompts: "
        f"full L={full['length']} {1e3 * full['seconds_p50']:.1f} ms, "
        f"cut L={cut['length']} {1e3 * cut['seconds_p50']:.1f} ms, "
        f"cut is {text['speedup']:.2f}x faster"
    )
