"""Signed bundles: `fedprompt export --keygen` / `--sign-key`, `fedprompt verify --trust-key` and
`Bundle.open(trusted_keys=...)` accept only a manifest signed by a trusted key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from edge_client.bundle import Bundle, BundleError, BundleIntegrityError
from edge_client.bundle_signature import load_public_key
from fedprompt.cli import main


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in ("ours", "theirs"):
        folder = tmp_path_factory.mktemp(f"keys-{name}")
        code, output = run_cli("export", "--keygen", str(folder))
        assert code == 0, output
        out[name], out[f"{name}.pub"] = folder / "bundle-signing.key", folder / "bundle-signing.pub"
    return out


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("signed") / "bundle"
    code, output = run_cli(
        "export", "fedprompt-test", "--pretrained", "none", "--out", str(out), "--sign-key", str(keys["ours"])
    )
    assert code == 0, output
    assert f"--trust-key {keys['ours.pub']}" in output
    return out


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys: dict[str, Path]) -> None:
    assert stat.S_IMODE(os.stat(keys["ours"]).st_mode) == 0o600
    load_public_key(keys["ours.pub"])
    before = keys["ours"].read_bytes()
    code, output = run_cli("export", "--keygen", str(keys["ours"].parent))
    assert code == 1 and "is never overwritten" in output
    assert keys["ours"].read_bytes() == before


def test_signed_bundle_verifies_with_its_key_and_not_with_another(
    signed_bundle: Path, keys: dict[str, Path]
) -> None:
    manifest = json.loads((signed_bundle / "manifest.json").read_text())
    assert "manifest.sig" not in manifest["files"]
    bundle = Bundle.open(signed_bundle, trusted_keys=[keys["theirs.pub"], keys["ours.pub"]])
    assert bundle.digest == hashlib.sha256((signed_bundle / "manifest.json").read_bytes()).hexdigest()
    with pytest.raises(BundleIntegrityError, match=r"not a valid signature of manifest\.json by a trusted"):
        Bundle.open(signed_bundle, trusted_keys=[keys["theirs.pub"]])
    code, output = run_cli("verify", str(signed_bundle), "--trust-key", str(keys["ours.pub"]))
    assert code == 0, output
    assert any(line.startswith("signature") and "ok" in line for line in output.splitlines())
    code, output = run_cli("verify", str(signed_bundle), "--trust-key", str(keys["theirs.pub"]))
    assert code == 1 and "not a valid signature" in output
    assert run_cli("verify", str(signed_bundle))[0] == 0  # without --trust-key the signature is not required


def test_an_edited_signed_manifest_or_a_missing_signature_is_refused(
    signed_bundle: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    edited = shutil.copytree(signed_bundle, tmp_path / "edited")
    text = (edited / "manifest.json").read_text()
    (edited / "manifest.json").write_text(text.replace('"logit_scale": ', '"logit_scale":  '))  # same JSON
    with pytest.raises(BundleIntegrityError, match="not a valid signature"):
        Bundle.open(edited, trusted_keys=[keys["ours.pub"]])
    unsigned = shutil.copytree(signed_bundle, tmp_path / "unsigned")
    (unsigned / "manifest.sig").unlink()
    with pytest.raises(BundleIntegrityError, match=r"is not signed \(manifest.sig is missing\)"):
        Bundle.open(unsigned, trusted_keys=[keys["ours.pub"]])
    code, output = run_cli("verify", str(unsigned), "--trust-key", str(keys["ours.pub"]))
    assert code == 1 and "is not signed" in output


def test_keys_that_are_not_ed25519_are_one_line_errors(
    signed_bundle: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(other.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    code, output = run_cli(
        "export", "fedprompt-test", "--pretrained", "none", "--out", str(tmp_path / "o"),
        "--sign-key", str(tmp_path / "ec.key"),
    )  # fmt: skip
    assert code == 1 and "is not an Ed25519 private key" in output
    with pytest.raises(BundleError, match="is not a PEM public key"):
        Bundle.open(signed_bundle, trusted_keys=[keys["ours"]])
    code, output = run_cli("verify", str(signed_bundle), "--trust-key", str(tmp_path / "missing.pub"))
    assert code == 1 and "cannot read trusted key" in output
