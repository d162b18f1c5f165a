"""The real `fedprompt aggregator serve` and `fedprompt client run` commands as child processes on
loopback, each logging to its own file, so that the demo runs exactly what a deployment runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click

LISTENING = re.compile(r"listening on [\w.\-\[\]:]*?:(\d+)")
# Many clients share one machine here: one math thread each avoids oversubscribing the cores
# (with torch's default of one thread per core, eight clients on two cores ran ~10x slower).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fedprompt_command() -> list[str]:
    """How to start the `fedprompt` CLI with this interpreter (works without the console script)."""
    return [sys.executable, "-c", "from fedprompt.cli import main; main()"]


def last_line(path: Path) -> str:
    """The last non-empty line of a log (the one-line error of a failed command)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class ChildProcess:
    """A `fedprompt` subcommand whose stdout and stderr go to `log`."""

    def __init__(self, name: str, args: Sequence[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._stream = open(log, "w")  # noqa: SIM115  (closed in stop/wait)
        self.proc = subprocess.Popen(
            [*fedprompt_command(), *args],
            stdout=self._stream,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"},
        )

    def failed(self) -> str | None:
        """None while running or after a clean exit; else what went wrong, in one line."""
        code = self.proc.poll()
        if code in (None, 0):
            return None
        return f"{self.name} exited with status {code}: {last_line(self.log)} (log: {self.log})"

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit within `timeout`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stream.close()
        return self.proc.returncode


class Aggregator(ChildProcess):
    """`fedprompt aggregator serve --config FILE`; the port it listens on is read from its log."""

    def __init__(self, config: Path, log: Path) -> None:
        super().__init__("aggregator", ["aggregator", "serve", "--config", str(config)], log)

    def wait_for_port(self, timeout: float = 120.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = LISTENING.search(self.log.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise click.ClickException(self.failed() or f"the aggregator exited early (log: {self.log})")
            time.sleep(0.2)
        self.stop()
        raise click.ClickException(
            f"the aggregator did not start listening in {timeout:.0f} s (log: {self.log})"
        )


def issue_tokens(config: Path, count: int, log: Path) -> list[str]:
    """Enrolment tokens through the real `fedprompt aggregator token issue` command."""
    result = subprocess.run(
        [
            *fedprompt_command(),
            "aggregator",
            "token",
            "issue",
            "--config",
            str(config),
            "--count",
            str(count),
        ],
        capture_output=True,
        text=True,
    )
    log.write_text(result.stderr)
    if result.returncode != 0:
        raise click.ClickException(f"could not issue enrolment tokens: {last_line(log)}")
    return result.stdout.split()
