"""The device decides its privacy: its policy floor, kept in its state folder, DP settings pinned
per run, and refusals before any training, told to the aggregator, which goes on without it.
The end-to-end tests run a real aggregator (honest, or drifting after round 1) and real
`fedprompt client run` processes and check the aggregator's store: nothing was uploaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from aggregator_process import AggregatorProcess, LoggedProcess, write_config
from test_federated import client_command, write_image_folder

from aggregator.store import SQLiteStore
from edge_client.local_privacy import LocalAccountant, round_cost
from edge_client.privacy_policy import (
    POLICY_FILE,
    PolicyError,
    PolicyGuard,
    PolicyRefusal,
    PrivacyPolicy,
    install_policy,
)
from fedprompt.common.settings import TrainingSettings

EXAMPLE = Path(__file__).parents[1] / "edge_client" / "privacy-policy.example.toml"
DRIFTING = (sys.executable, str(Path(__file__).with_name("drifting_aggregator.py")))
ROUNDS = {
    "rounds": 3,
    "min_clients": 2,
    "min_fit": 2,
    "min_updates": 2,
    "round_timeout_s": 120.0,
    "poll_interval_s": 0.2,
    "heartbeat_interval_s": 1.0,
    "client_timeout_s": 30.0,
}


def dp(**values: object) -> TrainingSettings:
    return TrainingSettings.from_dict({"dp": "client", "noise_multiplier": 1.0, "clip": 0.5, **values})


def test_the_example_file_is_the_documented_default() -> None:
    assert PrivacyPolicy.from_toml(EXAMPLE) == PrivacyPolicy()
    assert "none" not in PrivacyPolicy().dp_modes  # dp = "none" only when the owner opts in


def test_bad_policy_files_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("min_noise = 1.0\n")
    with pytest.raises(PolicyError, match=r"unknown keys \['min_noise'\]"):
        PrivacyPolicy.from_toml(bad)
    bad.write_text('dp_modes = ["local"]\n')
    with pytest.raises(PolicyError, match="dp_modes must be"):
        PrivacyPolicy.from_toml(bad)


def test_a_weaker_policy_is_refused_at_a_later_start_unless_the_owner_says_so(tmp_path: Path) -> None:
    strict = PrivacyPolicy(min_noise_multiplier=1.0, max_epsilon_lifetime=20.0)
    assert install_policy(tmp_path, strict) == []
    assert (tmp_path / POLICY_FILE).exists()
    assert install_policy(tmp_path, strict.with_overrides(min_noise_multiplier=2.0)) == []  # stronger: fine
    weaker = PrivacyPolicy(dp_modes=("client", "sample", "none"), min_noise_multiplier=0.5)
    with pytest.raises(PolicyError, match="weaker than the one this device keeps") as error:
        install_policy(tmp_path, weaker)
    assert "dp_modes adds ['none']" in str(error.value) and "max_epsilon_lifetime None > 20.0" in str(
        error.value
    )
    assert len(install_policy(tmp_path, weaker, accept_weaker=True)) == 3
    assert install_policy(tmp_path, weaker) == []  # now the kept one


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        (TrainingSettings(), 'dp = "none" asked, this device\'s floor: one of client, sample'),
        (dp(noise_multiplier=0.3), "noise_multiplier = 0.3 asked, this device's floor: at least 0.5"),
        (dp(clip=2.0), "clip = 2.0 asked, this device's floor: at most 1"),
        (dp(delta=1e-3), "delta = 0.001 asked, this device's floor: at most 1e-05"),
        (dp(accountant="rdp"), 'accountant = "rdp" asked, this device\'s floor: "prv"'),
    ],
)
def test_a_task_below_the_floor_is_refused_with_one_line(
    settings: TrainingSettings, line: str, tmp_path: Path
) -> None:
    guard = PolicyGuard(tmp_path, PrivacyPolicy(max_clip=1.0), num_examples=100)
    with pytest.raises(PolicyRefusal) as refusal:
        guard.admit("run-a", 1, settings)
    assert str(refusal.value).startswith(line) and "\n" not in str(refusal.value)
    assert not (tmp_path / "privacy-pins.json").exists()  # nothing pinned, nothing spent


def test_dp_settings_are_pinned_at_the_first_round_of_a_run(tmp_path: Path) -> None:
    guard = PolicyGuard(tmp_path, PrivacyPolicy(), num_examples=100)
    guard.admit("run-a", 1, dp(clip=0.2))
    guard.admit("run-a", 2, dp(clip=0.2))
    with pytest.raises(PolicyRefusal, match=r"clip = 0.4 asked, .*: 0.2 \(pinned at round 1 of this run\)"):
        guard.admit("run-a", 3, dp(clip=0.4))
    with pytest.raises(PolicyRefusal, match=r"epsilon_budget = 100\.0 asked"):
        PolicyGuard(tmp_path, PrivacyPolicy(), 100).admit("run-a", 3, dp(clip=0.2, epsilon_budget=100.0))
    guard.admit("run-b", 1, dp(clip=0.4))  # another run pins its own


def test_epsilon_per_run_and_over_the_devices_life(tmp_path: Path) -> None:
    guard = PolicyGuard(tmp_path, PrivacyPolicy(max_epsilon_per_run=7.0), num_examples=100)
    sigma2 = dp(noise_multiplier=2.0)  # replace-one: 1.0 per round, epsilon 4.39, 6.58, 8.40 (PRV)
    guard.admit("run-a", 1, sigma2)
    guard.admit("run-a", 2, sigma2)
    with pytest.raises(
        PolicyRefusal, match=r"epsilon of this run = 8\.\d+ after this round asked, .*at most 7"
    ):
        guard.admit("run-a", 3, sigma2)
    guard.admit("run-b", 1, sigma2)  # a new run starts its own count
    lifetime = PolicyGuard(tmp_path / "device", PrivacyPolicy(max_epsilon_lifetime=7.0), num_examples=100)
    accountant = LocalAccountant(tmp_path / "device", sigma2)  # what the method spends, across runs
    for run in ("run-a", "run-b"):
        lifetime.admit(run, 1, sigma2)
        accountant.spend(round_cost(sigma2, 100))
    with pytest.raises(PolicyRefusal, match=r"epsilon over the device's life = 8\.\d+ after this round"):
        lifetime.admit("run-c", 1, sigma2)


def serve(
    tmp_path: Path, bundle: Path, training: str, command: tuple[str, ...] | None = None, *args: str
) -> AggregatorProcess:
    config = write_config(tmp_path / "aggregator.toml", ROUNDS, bundle=bundle)
    config.write_text(config.read_text() + f"\n[training]\nn_ctx = 4\nbatch_size = 8\n{training}")
    return AggregatorProcess(config, *args, **({"command": command} if command else {}))


def devices(tmp_path: Path, server: AggregatorProcess, bundle: Path, *policy: str) -> list[LoggedProcess]:
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token(f"device {i}") for i in range(2)]
    store.close()
    return [
        LoggedProcess(
            client_command(
                server.address,
                bundle,
                write_image_folder(tmp_path / f"d{i}", seed=i, per_class=4),
                tmp_path / f"device{i}",
                "--token",
                token,
                "--connect-timeout",
                "60",
                *policy,
            )
        )
        for i, token in enumerate(tokens)
    ]


def assert_refused_and_nothing_uploaded(
    tmp_path: Path, server: AggregatorProcess, clients: list[LoggedProcess], round_id: int, line: str
) -> None:
    try:
        server.wait_for_log(
            rf"round {round_id}: c-\w+ refused the task under its privacy policy", 120, times=2
        )
        for client in clients:
            client.wait_for_log(rf"round {round_id}: refused by this device's privacy policy: {line}", 10)
    finally:
        for process in (*clients, server):
            process.kill()
    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    assert [r.round_id for r in store.rounds()] == list(range(1, round_id))
    open_round = store.open_round()
    assert open_round.round_id == round_id and open_round.updates == []  # nothing arrived for it
    assert server.count(rf"round {round_id}: update from") == 0
    assert all(c.count(rf"round {round_id}: training") == 0 for c in clients)  # refused before training


@pytest.mark.parametrize(
    ("training", "policy", "line"),
    [
        ('dp = "none"\n', (), 'dp = "none" asked, this device\'s floor: one of client, sample'),
        (
            'dp = "client"\nnoise_multiplier = 0.8\n',
            ("--privacy-policy", str(EXAMPLE), "--min-noise-multiplier", "1.0"),
            "noise_multiplier = 0.8 asked, this device's floor: at least 1",
        ),
    ],
)
def test_devices_refuse_an_aggregator_below_their_floor(
    training: str, policy: tuple[str, ...], line: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    server = serve(tmp_path, tiny_bundle, training)
    assert_refused_and_nothing_uploaded(
        tmp_path, server, devices(tmp_path, server, tiny_bundle, *policy), 1, line
    )


def test_devices_refuse_an_aggregator_that_changes_clip_mid_run(tiny_bundle: Path, tmp_path: Path) -> None:
    server = serve(
        tmp_path,
        tiny_bundle,
        'dp = "client"\nclip = 0.2\nnoise_multiplier = 1.0\n',
        DRIFTING,
        "--drift",
        "clip=0.4",
    )
    clients = devices(tmp_path, server, tiny_bundle)
    server.wait_for_log(r"round 1/3 committed: 2 clients", 180)
    line = r"clip = 0.4 asked, this device's floor: 0.2 \(pinned at round 1 of this run\)"
    assert_refused_and_nothing_uploaded(tmp_path, server, clients, 2, line)
