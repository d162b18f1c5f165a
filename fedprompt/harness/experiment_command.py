"""`fedprompt experiment --config FILE`: compare methods on the same client splits and seeds."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("experiment")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Experiment TOML (see fedprompt/harness/experiments/example.toml for every key).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder  [default: experiment-results/<config file name>]",
)
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the markdown results table to this file.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
def experiment_command(
    config_path: Path, out_dir: Path | None, markdown: Path | None, progress: bool
) -> None:
    """Run every method of the config on the same client splits, seed after seed, through the same
    client and server code as the daemon (in one process). Writes metrics.csv, metrics.json,
    accuracy.png and summary.md to the output folder and prints the results table."""
    from edge_client.bundle import BundleError
    from fedprompt.common.settings import SettingsError
    from fedprompt.harness.experiment import run_experiment
    from fedprompt.harness.experiment_config import ExperimentConfigError, load_experiment_config
    from fedprompt.harness.experiment_plots import plot_experiment
    from fedprompt.harness.experiment_report import markdown_summary, write_metrics

    try:
        config = load_experiment_config(config_path)
        out_dir = out_dir or Path("experiment-results") / config_path.stem
        results = run_experiment(config, out_dir, progress=progress)
    except (ExperimentConfigError, BundleError, SettingsError, FileNotFoundError, ValueError) as error:
        raise click.ClickException(
            str(error).splitlines()[0] if str(error) else type(error).__name__
        ) from None
    csv_path, json_path = write_metrics(results, out_dir)
    plot = plot_experiment(
        results.rows, [e.label for e in config.methods], config.name, out_dir / "accuracy.png"
    )
    summary = markdown_summary(results)
    (out_dir / "summary.md").write_text(summary)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(summary)
    click.echo(summary)
    click.echo(f"wrote {csv_path}, {json_path}, {plot}" + (f", {markdown}" if markdown else ""))
