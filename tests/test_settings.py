"""The settings both halves parse: the core section's defaults, round trip and one-line errors, and
the per-method sections: what tasks carry, settings of other methods, the run's identity."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedprompt.common.methods import METHOD_SPECS, RunSettings, TaskSettings
from fedprompt.common.methods.promptfl import PromptFLServer
from fedprompt.common.settings import SettingsError, TrainingSettings

EDGE_CLIENT = Path(__file__).parents[1] / "edge_client"


def test_defaults_follow_coop_and_round_trip_through_json() -> None:
    settings = TrainingSettings()
    assert settings.n_ctx == 16 and settings.dp == "none" and settings.accountant == "prv"
    changed = TrainingSettings.from_dict({"dp": "client", "clip": 2, "epsilon_budget": 8, "n_ctx": 4})
    again = TrainingSettings.from_dict(json.loads(json.dumps(changed.to_dict())))
    assert again == changed and again.clip == 2.0 and isinstance(again.clip, float)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"n_ctxx": 4}, "unknown setting(s) n_ctxx"),
        ({"dp": "central"}, "'dp' must be one of none, client, sample"),
        ({"lr": "fast"}, "'lr' must be a finite number"),
        ({"lr": float("nan")}, "'lr' must be a finite number"),
        ({"batch_size": 3.5}, "'batch_size' must be an integer"),
        ({"batch_size": True}, "'batch_size' must not be a boolean"),
        ({"batch_size": 0}, "'batch_size' must be at least 1"),
        ({"dp": "sample", "noise_multiplier": 0}, "'noise_multiplier' must be positive when dp is on"),
        ({"delta": 1}, "'delta' must be in (0, 1)"),
        ({"accountant": "gdp"}, "'accountant' must be one of prv, rdp"),
        ({"clip": None}, "'clip' must not be null"),
    ],
)
def test_bad_values_are_one_clear_line(values: dict, fragment: str) -> None:
    with pytest.raises(SettingsError) as error:
        TrainingSettings.from_dict(values)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_round_tasks_carry_the_core_and_the_methods_client_section_only() -> None:
    settings = RunSettings.from_flat(
        "dpfpl", {"n_ctx": 4, "dp": "sample", "rank": 2, "global_noise_multiplier": 1.0}
    )
    sent = json.loads(json.dumps(settings.task.to_dict()))
    assert set(sent) == {"core", "client"} and sent["client"] == {"rank": 2}  # no server section
    parsed = TaskSettings.from_dict("dpfpl", sent)  # what a device reads
    assert parsed == settings.task and parsed.core.n_ctx == 4 and parsed.client.rank == 2
    assert RunSettings.from_flat("promptfl", {"n_ctx": 4}).task.to_dict()["client"] == {}


def test_a_setting_of_another_method_is_one_clear_line() -> None:
    with pytest.raises(SettingsError, match="setting 'rank' belongs to method dpfpl, not to promptfl"):
        RunSettings.from_flat("promptfl", {"rank": 2})
    with pytest.raises(SettingsError, match="unknown setting"):
        TaskSettings.from_dict("promptfl", {"core": {}, "client": {"rank": 2}})


def test_the_run_identity_keeps_only_values_that_differ_from_the_defaults() -> None:
    """A later version's new setting with a default leaves existing runs' identity unchanged."""
    settings = RunSettings.from_flat("promptfl", {"n_ctx": 4, "lr": 0.002, "server_lr": 0.5})
    assert settings.identity() == {
        "method": "promptfl",
        "core": {"n_ctx": 4},
        "client": {},
        "server": {"server_lr": 0.5},
    }

    @dataclass(frozen=True)
    class NewerServer(PromptFLServer):  # the server section of a later version
        server_momentum: float = 0.0

    newer = RunSettings(settings.task, NewerServer(server_lr=0.5))
    assert newer.identity() == settings.identity()


def test_no_client_code_reads_a_server_setting() -> None:
    """Devices never get the server sections, so reading one there would be a bug."""
    server_only = {name for spec in METHOD_SPECS.values() for name in spec.server_settings.names()}
    assert server_only >= {"server_lr", "global_clip", "global_noise_multiplier", "split_gain"}
    readers = [
        f"{path.relative_to(EDGE_CLIENT)}:{node.lineno} .{node.attr}"
        for path in sorted(EDGE_CLIENT.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in server_only
    ]
    assert readers == []
