"""TLS with real certificates over loopback: `fedprompt aggregator certs` makes a CA, a server pair
and client pairs; the daemon serves TLS or mutual TLS; clients that do not trust the CA, speak
plaintext, or lack a client certificate are refused with one clear line; outside loopback the
daemon refuses to listen without TLS unless told `allow_insecure`."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from aggregator_process import FEDPROMPT, AggregatorProcess, RawClient, write_config

from aggregator.config import ConfigError, load_config
from aggregator.store import SQLiteStore
from aggregator.tls import server_credentials
from edge_client.runtime import AggregatorLink, ClientError
from edge_client.tls import channel_security
from protos import fedprompt_pb2 as pb

ROUNDS = {"rounds": 1, "min_clients": 2}


def certs(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FEDPROMPT, "aggregator", "certs", "--out", str(out), *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    made = certs(folder, "--host", "127.0.0.1", "--host", "localhost", "--client", "dev1")
    assert made.returncode == 0, made.stderr
    return folder


def tls_server(tmp_path: Path, pki: Path, mutual: bool, tiny_bundle: Path) -> tuple[AggregatorProcess, str]:
    server = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    if mutual:
        server["tls_client_ca"] = str(pki / "ca.pem")
    config = write_config(tmp_path / "aggregator.toml", ROUNDS, server, bundle=tiny_bundle)
    store = SQLiteStore(tmp_path / "state.sqlite")
    token = store.issue_token("tls")
    store.close()
    return AggregatorProcess(config), token


def enrol(link: AggregatorLink, token: str) -> pb.EnrollReply:
    return link.call("enrol", lambda: link.stub.Enroll(pb.EnrollRequest(token=token), timeout=5))


def test_certs_command_writes_private_keys_0600_and_never_overwrites(pki: Path) -> None:
    names = {"ca.pem", "ca.key", "server.pem", "server.key", "client-dev1.pem", "client-dev1.key"}
    assert names <= {path.name for path in pki.iterdir()}
    for key in ("ca.key", "server.key", "client-dev1.key"):
        assert stat.S_IMODE(os.stat(pki / key).st_mode) == 0o600
    again = certs(pki, "--host", "127.0.0.1")
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == [
        f"Error: {pki / 'server.pem'} exists; remove it or choose another --out folder"
    ]
    more = certs(pki, "--no-server", "--client", "dev2")  # the existing CA signs new clients
    assert more.returncode == 0, more.stderr
    written = [line.split()[-1] for line in more.stdout.splitlines() if line.startswith("wrote")]
    assert written == [str(pki / "client-dev2.key"), str(pki / "client-dev2.pem")]


def test_tls_serves_clients_that_trust_the_ca_and_refuses_others_in_one_line(
    tmp_path: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path
) -> None:
    server, token = tls_server(tmp_path, pki, mutual=False, tiny_bundle=tiny_bundle)
    try:
        assert "(TLS)" in server.log
        trusted = AggregatorLink(
            server.address, 5.0, security=channel_security(server.address, pki / "ca.pem")
        )
        assert enrol(trusted, token).client_id
        trusted.close()

        other_ca = tmp_path_factory.mktemp("other-pki")
        assert certs(other_ca, "--host", "127.0.0.1").returncode == 0
        stranger = AggregatorLink(
            server.address, 30.0, security=channel_security(server.address, other_ca / "ca.pem")
        )
        with pytest.raises(ClientError) as untrusted:  # at once: retrying cannot fix a certificate
            enrol(stranger, token)
        assert str(untrusted.value) == (
            f"cannot connect to {server.address}: TLS handshake failed (CERTIFICATE_VERIFY_FAILED): the "
            "aggregator's certificate is not trusted: pass the CA that signed it with --ca-cert (or check "
            "that it names the host you dial)"
        )

        plaintext = AggregatorLink(server.address, 1.5, security=channel_security(server.address))
        with pytest.raises(ClientError) as refused:
            enrol(plaintext, token)
        message = str(refused.value)
        assert message.startswith(f"cannot reach the aggregator at {server.address}")
        assert message.endswith("if the aggregator uses TLS, pass --ca-cert") and "\n" not in message
        assert server.proc.poll() is None
    finally:
        server.kill()


def test_mutual_tls_refuses_a_client_without_a_certificate(
    tmp_path: Path, pki: Path, tiny_bundle: Path
) -> None:
    server, token = tls_server(tmp_path, pki, mutual=True, tiny_bundle=tiny_bundle)
    try:
        assert "(mutual TLS)" in server.log
        anonymous = AggregatorLink(
            server.address, 1.5, security=channel_security(server.address, pki / "ca.pem")
        )
        with pytest.raises(ClientError) as refused:
            enrol(anonymous, token)
        assert str(refused.value).endswith("pass --client-cert and --client-key")
        with_cert = channel_security(
            server.address, pki / "ca.pem", pki / "client-dev1.pem", pki / "client-dev1.key"
        )
        device = RawClient(server.address, token, credentials=with_cert.credentials)
        assert device.pull()[0].status == pb.WAIT
        with pytest.raises(grpc.RpcError) as no_token:  # a certificate does not replace the token
            RawClient(server.address, "forged", credentials=with_cert.credentials)
        assert no_token.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.kill()


def test_outside_loopback_the_daemon_needs_tls_or_an_explicit_allow_insecure(
    tmp_path: Path, pki: Path, tiny_bundle: Path
) -> None:
    refused = subprocess.run(
        [FEDPROMPT, "aggregator", "serve", "--host", "0.0.0.0", "--state", str(tmp_path / "s.sqlite")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        "Error: server.host 0.0.0.0 is not loopback: set server.tls_cert and server.tls_key "
        "(`fedprompt aggregator certs` makes them) or, knowingly, server.allow_insecure = true"
    ]
    config = tmp_path / "insecure.toml"
    named = f'[method]\nbundle = "{tiny_bundle}"\n'
    config.write_text('[server]\nhost = "0.0.0.0"\nallow_insecure = true\n' + named)
    assert load_config(config).server.allow_insecure
    mismatched = tmp_path / "mismatched.toml"
    mismatched.write_text(
        f'[server]\ntls_cert = "{pki / "server.pem"}"\ntls_key = "{pki / "client-dev1.key"}"\n' + named
    )
    with pytest.raises(ConfigError, match=r"^server.tls_key is not the private key of server.tls_cert$"):
        server_credentials(load_config(mismatched))
