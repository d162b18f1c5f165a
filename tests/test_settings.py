"""The training settings both halves parse: defaults, round trip, and one-line errors for bad values."""

from __future__ import annotations

import json

import pytest

from fedprompt.common.settings import SettingsError, TrainingSettings


def test_defaults_follow_coop_and_round_trip_through_json() -> None:
    settings = TrainingSettings()
    assert settings.n_ctx == 16 and settings.dp == "none" and settings.accountant == "rdp"
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
        ({"accountant": "gdp"}, "'accountant' must be one of rdp, prv"),
        ({"clip": None}, "'clip' must not be null"),
    ],
)
def test_bad_values_are_one_clear_line(values: dict, fragment: str) -> None:
    with pytest.raises(SettingsError) as error:
        TrainingSettings.from_dict(values)
    assert fragment in str(error.value) and "\n" not in str(error.value)
