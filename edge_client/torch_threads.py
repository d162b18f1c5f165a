"""Scoped torch thread count: small prompt steps run fastest on few threads, and oversubscribed
threads on a busy machine slow them down many times over, so benchmarks and the experiment
harness pick a count for their duration and leave the caller's setting as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` torch threads (None: unchanged), restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
