"""The training settings both halves parse: defaults, round trip, and one-line errors for bad values."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path

import pytest

from fedprompt.common.settings import SERVER_ONLY_SETTINGS, SettingsError, TrainingSettings

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


def test_round_tasks_carry_every_setting_but_the_server_only_ones() -> None:
    assert {f.name for f in fields(TrainingSettings)} >= SERVER_ONLY_SETTINGS
    settings = TrainingSettings(server_lr=0.5, global_noise_multiplier=1.0, n_ctx=4, dp="client")
    sent = settings.for_clients()
    assert set(sent) == {f.name for f in fields(TrainingSettings)} - SERVER_ONLY_SETTINGS
    parsed = TrainingSettings.from_dict(json.loads(json.dumps(sent)))  # what a device reads
    assert parsed.n_ctx == 4 and parsed.dp == "client" and parsed.server_lr == 1.0


def test_no_client_code_reads_a_server_only_setting() -> None:
    """Devices get the defaults for server-only settings, so reading one there would be a bug."""
    readers = [
        f"{path.relative_to(EDGE_CLIENT)}:{node.lineno} .{node.attr}"
        for path in sorted(EDGE_CLIENT.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in SERVER_ONLY_SETTINGS
    ]
    assert readers == []
