"""`fedprompt experiment` end to end on the tiny bundle and real Fashion-MNIST images (3 clients,
2 rounds, 2 seeds): its outputs, the split shared by every method of a seed, the bytes that
crossed the in-process wire, the noise calibrated to a target epsilon (checked against opacus'
own analysis), the clustering hook, the claims' verdicts and the config's one-line errors."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from independent_accounting import assert_tight
from PIL import Image

from aggregator.store import ClientRoundRecord
from edge_client.bundle import Bundle
from edge_client.datasets import fashion_mnist_dir
from fedprompt.cli import main
from fedprompt.common.codec import encode_tensor_set
from fedprompt.common.methods import RunSettings
from fedprompt.common.privacy import PrivacyAccountant
from fedprompt.common.settings import TrainingSettings
from fedprompt.harness.calibration import calibrate_noise_multiplier
from fedprompt.harness.client_data import (
    fresh_workspace,
    load_pools,
    local_eval_indices,
    seed_clients,
    split_id,
)
from fedprompt.harness.experiment_config import (
    ExperimentConfigError,
    load_experiment_config,
    parse_experiment_config,
)
from fedprompt.harness.in_process import FederationRules, run_federated
from fedprompt.harness.round_metrics import COLUMNS, round_row
from fedprompt.harness.splits import ClientSplit, make_splits

pytestmark = pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST data absent (install Debian's dataset-fashion-mnist)",
)

N_CTX, ROUNDS, SEEDS, TARGET_EPSILON = 4, 2, (0, 1), 6.0

CONFIG = f"""
name = "tiny"
seeds = {list(SEEDS)}
[bundle]
path = "BUNDLE"
[split]
num_clients = 3
alpha = 0.5
max_train_per_client = 40
eval_per_class = 4
[rounds]
rounds = {ROUNDS}
[training]
n_ctx = {N_CTX}
lr = 0.05
batch_size = 16
[[methods]]
method = "zero-shot"
[[methods]]
method = "local-only"
[[methods]]
label = "PromptFL"
method = "promptfl"
[[methods]]
label = "PromptFL fp32"
method = "promptfl"
task_encoding = "fp32"
update_encoding = "fp32"
[[methods]]
label = "PromptFL int8"
method = "promptfl"
task_encoding = "int8"
update_encoding = "int8"
[[methods]]
label = "PromptFL + client DP"
method = "promptfl"
settings = {{ dp = "client", clip = 0.5 }}
target_epsilon = {TARGET_EPSILON}
[[claims]]
paper = "PromptFL"
claim = "federation beats training alone"
test = "beats"
subject = "PromptFL"
reference = ["local-only"]
"""


@pytest.fixture(scope="module")
def experiment(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("experiment")
    config = root / "tiny.toml"
    config.write_text(CONFIG.replace("BUNDLE", str(tiny_bundle)))
    result = CliRunner().invoke(
        main,
        ["experiment", "--config", str(config), "--out", str(root / "out"), "--markdown", str(root / "t.md")],
    )
    assert result.exit_code == 0, result.output
    with open(root / "out" / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    return {
        "root": root,
        "output": result.output,
        "rows": rows,
        "json": json.loads((root / "out" / "metrics.json").read_text()),
    }


def _number(value: str) -> float | None:
    return None if value == "" else float(value)


def _rows(experiment: dict, method: str, seed: int) -> list[dict]:
    return [r for r in experiment["rows"] if r["method"] == method and int(r["seed"]) == seed]


def test_writes_csv_json_png_and_markdown_with_the_expected_rows(experiment: dict) -> None:
    rows = experiment["rows"]
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == len(SEEDS) * (1 + 5 * ROUNDS)  # zero-shot has round 0 only
    for row in rows:
        assert int(row["participants"]) == 3
        assert 0.0 <= float(row["accuracy"]) <= 1.0
    as_json = [(r["method"], r["seed"], r["round"], r["accuracy"]) for r in experiment["json"]["rows"]]
    assert as_json == [(r["method"], int(r["seed"]), int(r["round"]), float(r["accuracy"])) for r in rows]
    with Image.open(experiment["root"] / "out" / "accuracy.png") as image:
        assert image.format == "PNG"
        assert image.width > 1.5 * image.height  # two panels: per round, and against epsilon (DP is on)
    table = (experiment["root"] / "t.md").read_text()
    assert table in experiment["output"]
    for label in ("zero-shot", "local-only", "PromptFL", "PromptFL + client DP"):
        assert f"| {label} |" in table


def test_every_method_of_a_seed_ran_on_the_same_recorded_split(experiment: dict) -> None:
    document = experiment["json"]
    ids = {seed: document["splits"][str(seed)]["split_id"] for seed in SEEDS}
    assert len(set(ids.values())) == len(SEEDS)
    for row in experiment["rows"]:
        assert row["split_id"] == ids[int(row["seed"])]
    config = load_experiment_config(experiment["root"] / "tiny.toml")
    pools = load_pools(config.data, config.base_dir)
    for seed in SEEDS:  # the recorded id is that of the split the settings define
        splits = make_splits(pools.train.labels, pools.evaluation.labels, config.split.settings(seed))
        assert split_id(splits) == ids[seed]
        recorded = document["splits"][str(seed)]["clients"]
        assert [c["train_examples"] for c in recorded] == [len(s.train_indices) for s in splits]
        assert [c["domain"] for c in recorded] == [s.shift for s in splits]


def test_bytes_are_those_of_the_wire_encoding(experiment: dict) -> None:
    width = Bundle.open(experiment["json"]["bundle"]["path"]).manifest["text_width"]
    prompt = {"ctx": np.zeros((N_CTX, width), np.float32)}
    # the defaults: tasks and updates in fp16; an entry's task_encoding / update_encoding set them
    for label, encoding in (("PromptFL", "fp16"), ("PromptFL fp32", "fp32"), ("PromptFL int8", "int8")):
        size = len(encode_tensor_set(prompt, encoding))
        for seed in SEEDS:
            first, second = _rows(experiment, label, seed)
            assert float(first["bytes_up"]) == float(second["bytes_up"]) == size
            assert (
                float(first["bytes_down"]) == float(second["bytes_down"]) == size
            )  # round 1: the initial prompt
    assert all(float(r["bytes_up"]) == 0.0 for seed in SEEDS for r in _rows(experiment, "local-only", seed))


def test_fp16_on_the_wire_serves_the_accuracy_of_fp32(experiment: dict) -> None:
    """The same split, seed and (noise-free) training with the prompt in fp32 or fp16 both ways:
    fp16 rounding (relative 2**-11) moves no held-out prediction that matters; int8 (one scale per
    tensor) is the opt-in whose cost the README measures on the demo split. Tolerance: one of the
    3 x 40 held-out images."""
    one_image = 1 / 120 + 1e-6
    for seed in SEEDS:
        exact, half = (_rows(experiment, label, seed)[-1] for label in ("PromptFL fp32", "PromptFL"))
        assert float(half["served_accuracy"]) == pytest.approx(float(exact["served_accuracy"]), abs=one_image)
        assert float(half["accuracy"]) == pytest.approx(float(exact["accuracy"]), abs=one_image)


def test_dp_run_spends_the_target_epsilon_and_plain_runs_none(experiment: dict) -> None:
    for seed in SEEDS:
        private = _rows(experiment, "PromptFL + client DP", seed)
        epsilons = [float(r["epsilon"]) for r in private]
        assert epsilons[0] < epsilons[1] <= TARGET_EPSILON
        assert epsilons[1] == pytest.approx(TARGET_EPSILON, rel=2e-3)
        assert all(_number(r["epsilon"]) is None for r in _rows(experiment, "PromptFL", seed))


def test_served_model_is_measured_once_after_the_run_without_spending_privacy(experiment: dict) -> None:
    for seed in SEEDS:
        for method in ("local-only", "PromptFL", "PromptFL + client DP"):
            rows = _rows(experiment, method, seed)
            assert [_number(r["served_accuracy"]) is None for r in rows] == [True] * (ROUNDS - 1) + [False]
            assert 0.0 <= float(rows[-1]["served_accuracy"]) <= 1.0
        last = _rows(experiment, "local-only", seed)[-1]
        assert last["served_accuracy"] == last["accuracy"]  # a client alone keeps its own prompt
    runs = experiment["root"] / "out" / "runs"
    for accountant in runs.glob("seed-*/*client-dp/client-*/privacy_accountant.json"):
        history = json.loads(accountant.read_text())["history"]
        assert sum(steps for _, _, steps in history) == ROUNDS  # the evaluation's round was thrown away
    assert len(list(runs.glob("seed-*/*client-dp/client-*/privacy_accountant.json"))) == 3 * len(SEEDS)


def test_claim_verdict_follows_the_measured_accuracies(experiment: dict) -> None:
    gaps = [
        float(_rows(experiment, "PromptFL", s)[-1]["accuracy"])
        - float(_rows(experiment, "local-only", s)[-1]["accuracy"])
        for s in SEEDS
    ]
    holds = np.mean(gaps) > 0
    agree = sum((g > 0) == holds for g in gaps)
    verdict = f"{'yes' if holds else 'no'}"
    expected = (
        f"{verdict} ({agree}/2 seeds agree)"
        if agree == 2
        else f"inconclusive ({verdict} on the mean, {agree}/2 seeds agree)"
    )
    claim = next(
        line for line in experiment["output"].splitlines() if line.startswith("| PromptFL | federation")
    )
    assert claim.endswith(f"| {expected} |")


def _device_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """What a device's default accountant reports, checked against the independent one."""
    entry = (noise_multiplier, sample_rate, steps)
    epsilon = PrivacyAccountant(history=[entry]).epsilon(delta)
    assert_tight(epsilon, [entry], delta)
    return epsilon


def test_client_level_sigma_gives_the_target_epsilon_per_opacus() -> None:
    settings = TrainingSettings(dp="client", clip=0.5)
    sigma = calibrate_noise_multiplier(settings, [50, 80], rounds=10, target_epsilon=3.0)
    # client-level DP: replacement adjacency, accounted multiplier sigma / 2, q = 1, one step per round
    assert _device_epsilon(sigma / 2, 1.0, 10, settings.delta) == pytest.approx(3.0, rel=2e-3)
    assert _device_epsilon(sigma / 2, 1.0, 10, settings.delta) <= 3.0


def test_sample_level_sigma_holds_the_target_for_the_smallest_client() -> None:
    settings = TrainingSettings(dp="sample", batch_size=10, local_epochs=2)
    sigma = calibrate_noise_multiplier(settings, [40, 200], rounds=3, target_epsilon=4.0)
    epsilons = [
        _device_epsilon(sigma, 10 / n, 3 * 2 * int(np.ceil(n / 10)), settings.delta) for n in (40, 200)
    ]
    assert max(epsilons) == pytest.approx(4.0, rel=2e-3)  # the smallest client (highest rate) binds
    assert epsilons[1] < epsilons[0] <= 4.0


def test_cluster_hook_scores_reported_clusters_against_true_domains() -> None:
    domains = {"a": "invert", "b": "invert", "c": "rotate", "d": "rotate"}

    def records(clusters: dict[str, int]) -> list[ClientRoundRecord]:
        return [ClientRoundRecord(c, 10, {"accuracy": 0.5, "cluster": k}) for c, k in clusters.items()]

    identity = {"round": 1}
    assert round_row(records({"a": 7, "b": 7, "c": 2, "d": 2}), domains, identity)["ari"] == 1.0
    assert round_row(records({"a": 0, "b": 1, "c": 0, "d": 1}), domains, identity)["ari"] < 0.5
    plain = [ClientRoundRecord(c, 10, {"accuracy": 0.5}) for c in domains]
    assert round_row(plain, domains, identity)["ari"] is None


def test_local_evaluation_keeps_classes_in_the_clients_training_proportions() -> None:
    train_labels = np.array([0] * 30 + [1] * 10 + [2] * 5)
    eval_labels = np.repeat(np.arange(4), 12)
    split = ClientSplit(0, np.arange(45), np.arange(48), "clean")
    kept = eval_labels[local_eval_indices(split, train_labels, eval_labels)]
    assert np.bincount(kept, minlength=4).tolist() == [12, 4, 2, 0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"split": {"alhpa": 0.1}}, "unknown key(s) in [split]: alhpa"),
        ({"methods": [{"method": "fedavg"}]}, "method must be one of zero-shot, local-only"),
        ({"methods": [{"method": "promptfl", "target_epsilon": 2.0}]}, "needs settings dp"),
        ({"training": {"seed": 3}, "methods": [{"method": "promptfl"}]}, "seed comes from the experiment"),
        ({"methods": [{"method": "promptfl", "task_encoding": "bf16"}]}, "task_encoding must be one of fp32"),
        ({"methods": [{"method": "local-only", "update_encoding": "int8"}]}, "sends nothing over the wire"),
        (
            {
                "methods": [
                    {
                        "label": "a",
                        "method": "promptfl",
                        "settings": {"dp": "client"},
                        "match_epsilon_of": "b",
                    },
                    {
                        "label": "b",
                        "method": "promptfl",
                        "settings": {"dp": "client"},
                        "match_epsilon_of": "a",
                    },
                ]
            },
            "cycle",
        ),
        (
            {
                "methods": [{"method": "promptfl"}],
                "claims": [
                    {"paper": "p", "claim": "c", "test": "beats", "subject": "x", "reference": ["promptfl"]}
                ],
            },
            "no [[methods]] entry labelled ['x']",
        ),
    ],
)
def test_config_mistakes_are_one_clear_line(data: dict, message: str) -> None:
    with pytest.raises(ExperimentConfigError) as caught:
        parse_experiment_config(data, Path.cwd(), "x")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_settings_of_an_entry_merge_over_training_defaults() -> None:
    config = parse_experiment_config(
        {"training": {"lr": 0.01}, "methods": [{"method": "promptfl", "settings": {"dp": "client"}}]},
        Path.cwd(),
        "x",
    )
    assert config.methods[0].settings.core == replace(TrainingSettings(), lr=0.01, dp="client")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "fedprompt/harness/experiments").glob("*.toml"))
)
def test_committed_experiment_configs_are_valid(path: Path) -> None:
    config = load_experiment_config(path)
    assert config.methods and config.seeds


@pytest.fixture
def one_torch_thread():
    """As the experiment command runs: small prompt steps are many times slower on a busy machine
    with more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_every_run_of_a_seed_samples_the_same_clients_when_fraction_is_below_one(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    split = {"num_clients": 4, "alpha": 1.0, "max_train_per_client": 20, "eval_per_class": 2}
    config = parse_experiment_config({"split": split, "methods": [{"method": "zero-shot"}]}, Path.cwd(), "x")
    clients = seed_clients(load_pools(config.data, Path.cwd()), config.split, 0, tiny_bundle, tmp_path, None)
    rules = FederationRules(rounds=3, fraction=0.5, seed=0)
    sampled = []
    for name, settings in {
        "plain": RunSettings.from_flat("promptfl", {"n_ctx": 2}),
        "dp": RunSettings.from_flat("promptfl", {"n_ctx": 2, "dp": "client"}),
    }.items():
        workspaces = [
            fresh_workspace(ws, tmp_path / name / str(i)) for i, ws in enumerate(clients.workspaces)
        ]
        run = run_federated(settings, workspaces, rules, tmp_path / name / "state.sqlite")
        sampled.append([sorted(run.client_ids.index(c.client_id) for c in r.clients) for r in run.rounds])
    assert sampled[0] == sampled[1]
    assert all(len(chosen) == 2 for chosen in sampled[0])
