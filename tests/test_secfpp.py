"""SecFPP: the per-class prompt encoding it relies on, its secure clustering on synthetic domains
(device-side slot uploads, the real SecAgg core with real crypto, the server half), its refusal to
run without secure aggregation, and a run through the in-process harness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from colour_images import write_colour_folder
from sklearn.metrics import adjusted_rand_score

from aggregator.config import ConfigError, load_config
from aggregator.store import SQLiteStore
from aggregator.strategies.base import ServerStrategy
from aggregator.strategies.registry import SERVER_STRATEGIES
from edge_client.bundle import Bundle
from edge_client.methods.domain_clusters import nearest, slot_upload
from edge_client.methods.local_state import METHOD_STATE_DIR, load_tensors
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.prompts import tokenize_class_prompts
from edge_client.workspace import ClientWorkspace
from fedprompt.common.methods import RunSettings
from fedprompt.common.secagg import Quantizer, SecAggConfig
from fedprompt.common.secagg.loopback import run_loopback
from fedprompt.common.secure_round import SecureRoundParams, SumLayout
from fedprompt.harness.experiment_config import load_experiment_config
from fedprompt.harness.in_process import FederationRules, run_federated
from fedprompt.harness.round_metrics import round_row


def server_half(method: str, values: dict, **kwargs: object) -> ServerStrategy:
    """The method's server half for these (flat) settings."""
    return SERVER_STRATEGIES[method](RunSettings.from_flat(method, values), **kwargs)


def test_a_context_per_class_encodes_each_class_like_its_shared_context(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    eot = int(bundle.manifest["tokenizer"]["eot_token_id"])
    tokens = tokenize_class_prompts(bundle.tokenizer(), ["cat", "golden retriever", "x"], 4, eot)
    encoder = PromptTextEncoder(bundle.text_tower(), tokens, "shared")
    contexts = torch.randn(3, 4, encoder.tower.spec.width) * 0.1
    per_class = encoder(contexts)
    for c in range(3):
        torch.testing.assert_close(per_class[c], encoder(contexts[c])[c], atol=1e-5, rtol=1e-5)


def blobs(per_domain: int, dim: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Unit descriptors around 3 orthogonal directions (the clients' true domains)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, 3)))[0].T
    points = np.concatenate([c + rng.normal(0, 0.05, (per_domain, dim)) for c in centres])
    return points / np.linalg.norm(points, axis=1, keepdims=True), [
        d for d in range(3) for _ in range(per_domain)
    ]


def test_secure_clustering_recovers_three_separated_domains() -> None:
    slots, dim, n = 4, 8, 12
    points, truth = blobs(n // 3, dim, seed=3)
    strategy = server_half("secfpp", {"clusters": slots, "cluster_dim": dim, "split_gain": 0.1})
    params = SecureRoundParams(b"-", 0, 7, None, 32, 1.0, 0.0)  # uniform weights, as SecFPP asks
    state: dict[str, np.ndarray] = {}
    history = []
    for round_id in range(1, 6):
        centroids = state.get("centroids")
        chosen = [0 if centroids is None else nearest(p, centroids.astype(np.float64)) for p in points]
        uploads = [
            slot_upload(s, slots, np.full((1, 2), s / 10), p) for s, p in zip(chosen, points, strict=True)
        ]
        layout = SumLayout.of(uploads[0])
        quantizer = Quantizer(params.value_bound, n, params.modulus_bits)
        vectors = {
            i: layout.pack(u, params.weight(1), {}, params.value_bound)[0] for i, u in enumerate(uploads)
        }
        config = SecAggConfig(layout.length, params.threshold)
        run = run_loopback(
            config, {i: quantizer.encode(v) for i, v in vectors.items()}, f"r{round_id}".encode()
        )
        total = layout.unpack(quantizer.decode(run.result.field_sum, n), n)
        np.testing.assert_allclose(total.tensors["member"], np.bincount(chosen, minlength=slots), atol=1e-6)
        state, metrics = strategy.aggregate_sum(state, total)
        history.append((chosen, metrics))
    final, metrics = history[-1]
    assert metrics["clusters"] == 3 and len(state["centroids"]) == 3
    assert adjusted_rand_score(truth, final) == 1.0
    assert metrics["explained_scatter"] > 0.95
    assert history[0][1]["clusters"] == 2  # K grew one split per round, checked by a Lloyd step between
    # each cluster's domain prompt is the mean of its members' (each sent its slot number / 10)
    np.testing.assert_allclose(state["domain"][:, 0, 0], [0.0, 0.1, 0.2], atol=1e-6)


def summed(uploads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: sum(u[name] for u in uploads) for name in uploads[0]}


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_the_summed_statistic_does_not_tell_apart_two_pairs_or_triples_with_the_same_sum() -> None:
    rng = np.random.default_rng(5)
    dim, prompt = 8, np.zeros((1, 2))
    for members in (2, 3):
        first = [unit(rng.standard_normal(dim)) for _ in range(members)]
        axis = unit(sum(first))
        # rotate every descriptor about the sum's axis by the same rotation: same sum, same norms
        basis = np.linalg.qr(np.column_stack([axis, rng.standard_normal((dim, dim - 1))]))[0]
        turn = np.eye(dim)
        turn[1:3, 1:3] = [[0.0, -1.0], [1.0, 0.0]]
        rotation = basis @ turn @ basis.T
        second = [rotation @ z for z in first]
        assert not any(np.allclose(z, w) for z in first for w in second)
        views = [summed([slot_upload(0, 2, prompt, z) for z in group]) for group in (first, second)]
        for name in views[0]:  # the server's whole view of the slot is the same for both groups
            np.testing.assert_allclose(views[0][name], views[1][name], atol=1e-6)
        outer = [sum(np.outer(z, z) for z in group) for group in (first, second)]
        assert not np.allclose(*outer, atol=1e-3)  # the outer-product sums it replaces told them apart


def test_a_cluster_under_the_minimum_size_is_not_released_and_its_clients_join_another() -> None:
    strategy = server_half("secfpp", {"clusters": 3, "cluster_dim": 4, "min_cluster_size": 3})
    points = [unit(np.array([1.0, 0.1 * i, 0, 0])) for i in range(4)]
    points += [unit(np.array([0, 0, 1.0, 0.1 * i])) for i in range(2)]  # a slot of two
    slots = [0, 0, 0, 0, 1, 1]
    uploads = [slot_upload(s, 3, np.full((1, 2), 1.0 + s), p) for s, p in zip(slots, points, strict=True)]
    total = SumLayout.of(uploads[0]).unpack(
        SumLayout.of(uploads[0]).pack(summed(uploads), 1.0, {}, 10.0)[0], len(uploads)
    )

    state, metrics = strategy.aggregate_sum({}, total)

    assert metrics["held_back"] == 2 and metrics["clients_clustered"] == 4
    assert len(state["centroids"]) == 1  # slot 1 is not released (and slot 0 is too small to split)
    np.testing.assert_allclose(state["domain"], np.full((1, 1, 2), 1.0))  # no trace of slot 1's prompts
    np.testing.assert_allclose(state["centroids"][0], np.mean(points[:4], axis=0), atol=1e-6)
    assert all(nearest(p, state["centroids"].astype(np.float64)) == 0 for p in points[4:])


def test_the_secfpp_rows_config_repeats_the_results_table_setting() -> None:
    experiments = Path(__file__).parents[1] / "fedprompt/harness/experiments"
    results = load_experiment_config(experiments / "results.toml")
    rows = load_experiment_config(experiments / "results-secfpp.toml")
    for part in ("seeds", "data", "bundle", "split", "rounds"):
        assert getattr(rows, part) == getattr(results, part), part
    for label in ("SecFPP", "SecFPP + DP-SGD"):
        ours, theirs = rows.entry(label), results.entry(label)
        assert (ours.method, ours.settings) == (theirs.method, theirs.settings)
    matched = results.entry(results.entry("SecFPP + DP-SGD").match_epsilon_of).target_epsilon
    assert rows.entry("SecFPP + DP-SGD").target_epsilon == matched


def write_toml(path: Path, method: str, bundle: Path, extra: str = "") -> Path:
    rounds = "[rounds]\nmin_fit = 4\nmin_clients = 4\n"
    named = f'[method]\nname = "{method}"\nbundle = "{bundle}"\n'
    path.write_text(f'[server]\nstate = "s.sqlite"\n{rounds}{named}{extra}')
    return path


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        ("secfpp", "", "secfpp runs only with [secure_aggregation] enabled = true"),
        ("pfedmoap", "[secure_aggregation]\nenabled = true\n", "pfedmoap needs every individual update"),
    ],
)
def test_methods_refuse_a_secure_aggregation_setting_they_cannot_work_with(
    method: str, extra: str, message: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """At start, before serving: the config is checked against the method's spec."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        load_config(write_toml(tmp_path / "a.toml", method, tiny_bundle, extra))
    assert "\n" not in str(error.value)
    robust = '[aggregation]\nrule = "median"\n[secure_aggregation]\nenabled = true\n'
    with pytest.raises(ConfigError, match="secure aggregation gives the server only the sum"):
        load_config(write_toml(tmp_path / "b.toml", "promptfl", tiny_bundle, robust))


def test_secfpp_runs_in_the_harness_with_local_clusters_and_sums_only_at_the_server(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    workspaces = [
        ClientWorkspace.load(
            tiny_bundle,
            write_colour_folder(tmp_path / f"d{i}", per_class=5, seed=i),
            state_dir=tmp_path / f"c{i}",
        )
        for i in range(4)
    ]
    settings = RunSettings.from_flat(
        "secfpp", {"n_ctx": 4, "batch_size": 8, "lr": 0.01, "clusters": 2, "cluster_dim": 4}
    )
    run = run_federated(settings, workspaces, FederationRules(rounds=2), tmp_path / "agg.sqlite")

    store = SQLiteStore(tmp_path / "agg.sqlite", read_only=True)
    stored = store.rounds()
    for record, reported in zip(stored, run.rounds, strict=True):
        assert record.metrics["secure_aggregation"]["survivors"] == 4
        assert all(c.num_examples == 0 and not c.metrics for c in record.clients)  # the server's view
        assert all("cluster" in c.metrics and c.num_examples > 0 for c in reported.clients)  # the devices'
        assert round_row(reported.clients, dict.fromkeys(run.client_ids, "same"), {})["ari"] is not None
    final = store.latest_round().tensors
    k = len(final["centroids"])
    assert final["domain"].shape == (k, 4, 64) and 1 <= k <= 2
    assert all(a is not None for a in run.served_accuracy)
    for i in range(3):  # the class-level prompt lives on the device only
        (saved,) = (tmp_path / f"c{i}" / METHOD_STATE_DIR).glob("secfpp-*.tensors")
        assert load_tensors(saved)["class_level"].shape == (4, 4, 64)
