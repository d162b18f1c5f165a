"""Method specs are checked against the config at start, before serving, in one line: a DP mode the
method does not support, secure aggregation it cannot run without, settings of another method or
in the wrong section, a bundle that lacks a capability it needs; and the spec's global state is
what the aggregator starts from."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from aggregator_process import FEDPROMPT

from aggregator.config import ConfigError, load_config
from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.methods import METHOD_SPECS, RunSettings


def _config(tmp_path: Path, bundle: Path, method: str, extra: str = "") -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(
        f'[server]\nstate = "s.sqlite"\n[method]\nname = "{method}"\nbundle = "{bundle}"\n{extra}'
    )
    return path


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        ("dpfpl", '[training]\ndp = "client"\n', 'method dpfpl does not support dp = "client"'),
        ("pfedmoap", '[training]\ndp = "sample"\n', 'method pfedmoap does not support dp = "sample"'),
        ("secfpp", "", "secfpp runs only with [secure_aggregation] enabled = true"),
        ("promptfl", "[dpfpl]\nrank = 2\n", "[dpfpl] configures another method; this run uses promptfl"),
        ("dpfpl", "[training]\nrank = 2\n", "setting 'rank' is not a core setting; it belongs in [dpfpl]"),
        ("dpfpl", "[dpfpl]\nrank = 2\nserver_lr = 0.5\n", "unknown setting(s) server_lr"),
        ("dpfpl", "[training]\nn_ctx = 2\n[dpfpl]\nrank = 4\n", "'rank' must be at most n_ctx (2)"),
    ],
)
def test_a_config_the_spec_refuses_is_one_line_at_start(
    tmp_path: Path, tiny_bundle: Path, method: str, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(_config(tmp_path, tiny_bundle, method, extra))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_daemon_refuses_before_serving(tmp_path: Path, tiny_bundle: Path) -> None:
    config = _config(tmp_path, tiny_bundle, "dpfpl", '[training]\ndp = "client"\n')
    result = subprocess.run(
        [FEDPROMPT, "aggregator", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "listening" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        'Error: method dpfpl does not support dp = "client": set dp = "sample" (or "none")'
    ]
    assert not (tmp_path / "s.sqlite").exists()  # nothing was started


def test_a_method_needing_a_capability_the_bundle_lacks_is_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["capabilities"] = [c for c in manifest["capabilities"] if c != "text_prompts"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="method promptfl needs bundle capability text_prompts"):
        load_config(_config(tmp_path, tmp_path / "manifest.json", "promptfl"))


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_every_specs_initial_state_and_updates_are_sized_from_the_bundle(
    method: str, request: pytest.FixtureRequest
) -> None:
    captioning = "captioning" in METHOD_SPECS[method].capabilities  # prompts on the decoder side
    dims = BundleDims.read(request.getfixturevalue("caption_bundle" if captioning else "tiny_bundle"))
    settings = RunSettings.from_flat(method, {"prompt_tokens": 8} if captioning else {"n_ctx": 8})
    spec = settings.spec
    state = spec.initial_state(settings.task, dims)
    update = spec.expected_update(settings.task, dims)
    assert state and update and all(t.dtype.name == "float32" for t in state.values())
    if captioning:  # AFSPL: the global prompt in the decoder's width, K of its rows uploaded
        assert {n: t.shape for n, t in state.items()} == {"global": (8, dims.decoder_width)}
        assert update == {"rows": (3, dims.decoder_width), "indices": (3,)}
        return
    if "visual_prompts" in spec.capabilities:  # FedMVP: a PromptFormer of the image tower's width
        assert any(shape == (dims.image_width, dims.embed_dim) for shape in update.values())
        return
    prompts = [shape for shape in update.values() if len(shape) >= 2 and shape[-2:] == (8, dims.text_width)]
    assert prompts  # every text-prompt method's update carries a prompt of the bundle's width
