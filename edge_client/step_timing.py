"""Timing training steps against a reference, shared by every `fedprompt bench train` row.

Each variant is one step returning (loss, gradient). Every variant runs once as a warm-up (whose
values are compared), then all are timed `steps` times interleaved, so they see the same machine
state; the first variant is the reference for the speed-up and the errors.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

Step = Callable[[], tuple[float, torch.Tensor]]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def compare_steps(variants: Mapping[str, Step], steps: int, progress: bool = False) -> list[dict[str, Any]]:
    """One row per variant: median and all timings, speed-up over the first, loss and relative
    errors of loss and gradient against the first."""
    results = [step() for step in variants.values()]
    timings: list[list[float]] = [[] for _ in variants]
    total = steps * len(variants)
    with tqdm(total=total, desc="timing steps", unit="step", leave=False, disable=not progress) as bar:
        for _ in range(steps):
            for index, step in enumerate(variants.values()):
                started = time.perf_counter()
                step()
                timings[index].append(time.perf_counter() - started)
                bar.update()
    reference_loss, reference_grad = results[0]
    return [
        {
            "variant": name,
            "median_s": statistics.median(times),
            "times_s": times,
            "speedup": statistics.median(timings[0]) / statistics.median(times),
            "loss": loss,
            "loss_rel_error": abs(loss - reference_loss) / abs(reference_loss),
            "grad_rel_error": relative_error(grad, reference_grad),
        }
        for name, times, (loss, grad) in zip(variants, timings, results, strict=True)
    ]


def max_rel_error(rows: Sequence[dict[str, Any]]) -> float:
    return max(max(r["loss_rel_error"], r["grad_rel_error"]) for r in rows)
