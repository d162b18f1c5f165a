"""The `fedprompt` console script.

Commands are registered by name and imported only when invoked, so `fedprompt --help` stays fast
and a client install never imports the aggregator's code (or the other way round).
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of a click command; each capability adds its own line.
COMMANDS: dict[str, str] = {
    "export": "export.commands:export_command",
    "verify": "export.commands:verify_command",
    "aggregator": "aggregator.cli:aggregator",
    "client": "edge_client.cli:client",
    "caption": "edge_client.caption_cli:caption_command",
    "demo": "fedprompt.harness.demo:demo",
    "experiment": "fedprompt.harness.experiment_command:experiment_command",
    "predict": "edge_client.predict:predict_command",
    "export-classifier": "edge_client.classifier_export:export_classifier_command",
    "caption-experiment": "fedprompt.harness.caption_experiment:caption_experiment_command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            module_name, attribute = self.lazy_commands[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, cmd_name)


class DefaultLazyGroup(LazyGroup):
    """A lazy group that runs `default_command` when the first argument names no subcommand,
    so that `fedprompt bench BUNDLE` and `fedprompt bench train BUNDLE` both work."""

    def __init__(self, *args, default_command: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.list_commands(ctx) and args[0] not in ("-h", "--help")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedprompt")
def main() -> None:
    """Federated prompt learning for CLIP on edge devices, with honest differential privacy."""


@main.group(
    cls=DefaultLazyGroup,
    default_command="encoders",
    lazy_commands={
        "encoders": "export.bench:bench_encoders",
        "train": "edge_client.train_bench:bench_train",
        "caption": "export.caption_bench:bench_caption",
        "classifier": "export.classifier_bench:bench_classifier",
    },
)
def bench() -> None:
    """Benchmarks: `bench BUNDLE` (frozen encoders, the default), `bench train BUNDLE`, `bench
    caption BUNDLE` (caption generation, onnxruntime vs torch) and `bench classifier DIR` (an
    exported classifier)."""


@main.group(
    cls=DefaultLazyGroup,
    default_command="clip",
    lazy_commands={
        "clip": "export.pretrain:pretrain",
        "captioner": "fedprompt.harness.pretrain_captioner:pretrain_captioner_command",
    },
)
def pretrain() -> None:
    """Pretraining of the embedded models: `pretrain` (the tiny CLIP, the default) and `pretrain
    captioner` (the tiny T5 captioner on the frozen tiny CLIP)."""
