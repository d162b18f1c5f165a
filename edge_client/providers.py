"""Which onnxruntime execution providers to use on this device.

onnxruntime-gpu lists the CUDA and TensorRT providers even on machines without a GPU (it then
falls back to CPU with error logs), so a GPU provider counts as usable only when a CUDA device is
actually present.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PREFERENCE = (*GPU_PROVIDERS, CPU)
SHORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": CPU,
}


class ProviderError(ValueError):
    """A requested execution provider is unknown or not usable on this device."""


def usable_providers() -> list[str]:
    """Providers that can really run here, best first (TensorRT, then CUDA, then CPU)."""
    available = set(ort.get_available_providers())
    gpu_present = cuda_device_present()
    return [p for p in PREFERENCE if p in available and (p == CPU or gpu_present)]


def cuda_device_present() -> bool:
    """torch's answer when torch is already loaded; otherwise the NVIDIA driver's device list, so
    that inference-only paths (caption generation, the exported classifier) need not import torch."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def resolve_provider(name: str) -> str:
    """Full provider name of `name`, which may be short ('cuda') or full ('CUDAExecutionProvider')."""
    full = SHORT_NAMES.get(name.lower(), name)
    if full not in usable_providers():
        raise ProviderError(
            f"execution provider {name!r} is not usable here; usable: {', '.join(usable_providers())}"
        )
    return full


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The providers for a session: the requested ones (validated) or every usable one, best first.
    CPU is always appended as the fallback for operators a GPU provider does not implement."""
    chosen = [resolve_provider(name) for name in requested] if requested else usable_providers()
    return chosen if CPU in chosen else [*chosen, CPU]


def make_session(
    path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session on the chosen providers (`threads`: intra-op threads, default all cores).

    fp16 graphs on the CPU provider run at ORT_ENABLE_EXTENDED: onnxruntime 1.31's full (layout)
    optimisation level crashes the process on fp16 vision graphs on CPU (measured here)."""
    chosen = choose_providers(providers)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # fallback warnings are noise on the device
    # idle onnxruntime threads must not spin: torch trains prompts in the same process
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if ".fp16." in Path(path).name and chosen[0] == CPU:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
