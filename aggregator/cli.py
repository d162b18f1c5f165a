"""`fedprompt aggregator ...`: run the daemon, read its progress, manage enrolment tokens and TLS
certificates."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import click

from aggregator.config import ConfigError, ServerConfig, load_config
from aggregator.rounds import Refused
from aggregator.store import SQLiteStore, StoreError

STATE_OPTION = click.option(
    "--state",
    "state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The aggregator's SQLite state file (default: the one named by --config, else "
    "./fedprompt-aggregator.sqlite).",
)
CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML config; without it every setting has its documented default.",
)


def state_path(config_path: Path | None, state: Path | None) -> Path:
    if state is not None:
        return state
    if config_path is None:
        return Path(ServerConfig().state).resolve()
    try:
        return load_config(config_path).state_path
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


@click.group()
def aggregator() -> None:
    """The aggregator daemon: `serve`, `status`, enrolment `token`s and TLS `certs`."""


@aggregator.command()
@CONFIG_OPTION
@click.option("--host", default=None, help="Address to listen on (config: server.host, default 127.0.0.1).")
@click.option(
    "--port", type=int, default=None, help="Port (config: server.port, default 50051; 0 = any free)."
)
@STATE_OPTION
@click.option(
    "--metrics",
    "metrics_address",
    default=None,
    help="HOST:PORT serving Prometheus metrics at /metrics (config: server.metrics_address, default off; "
    "port 0 = any free, printed in the log).",
)
@click.option("--rounds", type=int, default=None, help="Rounds to run (config: rounds.rounds, default 10).")
@click.option(
    "--min-clients", type=int, default=None, help="Live clients needed to start a round (default 2)."
)
@click.option(
    "--round-timeout", type=float, default=None, help="Seconds a round waits for updates (default 300)."
)
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    state: Path | None,
    metrics_address: str | None,
    rounds: int | None,
    min_clients: int | None,
    round_timeout: float | None,
) -> None:
    """Run the aggregator: wait for clients, run the rounds, then keep serving the final prompt
    until SIGTERM/SIGINT. Restarting with the same config (even after kill -9) resumes the run,
    and the open round with the updates it had accepted. Outside loopback it listens only with
    TLS ([server] tls_cert/tls_key; `fedprompt aggregator certs` makes them). The standard gRPC
    health service (grpc.health.v1.Health/Check) answers on the same port."""
    from aggregator.server import serve as run_daemon

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s aggregator %(message)s", datefmt="%H:%M:%S", force=True
    )
    try:
        config = load_config(config_path).with_overrides(
            {
                "host": host,
                "port": port,
                "state": None if state is None else str(state),
                "metrics_address": metrics_address,
            },
            {"rounds": rounds, "min_clients": min_clients, "round_timeout_s": round_timeout},
        )
        run_daemon(config)
    except (ConfigError, StoreError, RuntimeError) as error:
        raise click.ClickException(str(error)) from None
    except Refused as refusal:
        raise click.ClickException(refusal.message) from None


@aggregator.command()
@CONFIG_OPTION
@STATE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the rounds as JSON instead of a table.")
@click.option(
    "--watch",
    "watch_s",
    type=click.FloatRange(0.1),
    is_flag=False,
    flag_value=2.0,
    default=None,
    help="Refresh the table every S seconds (`--watch` alone: 2) until Ctrl-C, with the open round's "
    "progress; waits for a state file that does not exist yet.",
)
def status(config_path: Path | None, state: Path | None, as_json: bool, watch_s: float | None) -> None:
    """Print the run and the metrics of every committed round."""
    path = state_path(config_path, state)
    if watch_s is None:
        try:
            click.echo(_status_json(path) if as_json else _status_table(path))
        except StoreError as error:
            raise click.ClickException(str(error)) from None
        return
    if as_json:
        raise click.UsageError("--watch refreshes the table; for machines, scrape server.metrics_address")
    try:
        while True:
            try:
                text = _status_table(path, with_open_round=True)
            except StoreError as error:
                text = f"waiting: {error}"
            if click.get_text_stream("stdout").isatty():
                click.clear()
            click.echo(f"{time.strftime('%H:%M:%S')}  {path}  (every {watch_s:g} s, Ctrl-C stops)\n{text}")
            time.sleep(watch_s)
    except KeyboardInterrupt:
        pass


def _status_json(path: Path) -> str:
    store = SQLiteStore(path, read_only=True)
    try:
        info, records = store.run_info(), store.rounds()
    finally:
        store.close()
    rows = [{"round": r.round_id, "committed_at": r.committed_at, **r.metrics} for r in records]
    return json.dumps({"run_id": info.run_id if info else None, "rounds": rows}, indent=2)


def _status_table(path: Path, with_open_round: bool = False) -> str:
    """The run's committed rounds as a table; with `with_open_round`, a last line on the round in
    progress (sampled clients, updates stored, deadline)."""
    store = SQLiteStore(path, read_only=True)
    try:
        info, records = store.run_info(), store.rounds()
        current = store.open_round() if with_open_round else None
    finally:
        store.close()
    if info is None:
        return "no run yet"
    lines = [f"run {info.run_id}  method {info.method}  {len(records)} round(s) committed"]
    header = ("round", "clients", "examples", "accuracy", "up KB", "down KB", "epsilon")
    lines.append(" ".join(f"{name:>8}" for name in header))
    for record in records:
        m = record.metrics
        accuracy = m["client_metrics"].get("accuracy")
        epsilon = m.get("epsilon_max")
        cells = (
            record.round_id,
            len(m["clients"]),
            m["num_examples"],
            "-" if accuracy is None else f"{accuracy:.3f}",
            f"{m['bytes_up_per_client'] / 1024:.1f}",
            f"{m['bytes_down_per_client'] / 1024:.1f}",
            "-" if epsilon is None else f"{epsilon:.3g}",
        )
        lines.append(" ".join(f"{cell:>8}" for cell in cells))
    if current is not None:
        left = max(0.0, current.deadline_unix - time.time())
        lines.append(
            f"round {current.round_id} open: {len(current.updates)}/{len(current.sampled)} sampled "
            f"clients' updates stored, deadline in {left:.0f} s"
        )
    return "\n".join(lines)


@aggregator.group()
def token() -> None:
    """Enrolment tokens: one per device; revoking one cuts that device off."""


@token.command("issue")
@CONFIG_OPTION
@STATE_OPTION
@click.option("--label", default="", help="A note stored with the token (device name, owner).")
@click.option("--count", type=click.IntRange(1, 10000), default=1, help="How many tokens to issue.")
def token_issue(config_path: Path | None, state: Path | None, label: str, count: int) -> None:
    """Issue tokens and print them, one per line (they are shown only once)."""
    try:
        store = SQLiteStore(state_path(config_path, state))
        for _ in range(count):
            click.echo(store.issue_token(label))
    except StoreError as error:
        raise click.ClickException(str(error)) from None


@token.command("revoke")
@CONFIG_OPTION
@STATE_OPTION
@click.argument("token_id")
def token_revoke(config_path: Path | None, state: Path | None, token_id: str) -> None:
    """Revoke a token by its id (the part before the dot); its client's session ends at once."""
    try:
        SQLiteStore(state_path(config_path, state)).revoke_token(token_id.split(".")[0])
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"revoked {token_id.split('.')[0]}")


@token.command("list")
@CONFIG_OPTION
@STATE_OPTION
def token_list(config_path: Path | None, state: Path | None) -> None:
    """List tokens (ids only, never the secrets) and the clients enrolled with them."""
    try:
        tokens = SQLiteStore(state_path(config_path, state), read_only=True).tokens()
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    for info in tokens:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at))
        state_text = "revoked" if info.revoked else "active"
        click.echo(
            f"{info.token_id}  {state_text:<7}  {created}  client={info.client_id or '-'}  {info.label}"
        )


@aggregator.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for ca.pem/ca.key, server.pem/server.key and client-NAME.pem/.key (an existing "
    "CA there is reused; no existing file is overwritten).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="DNS name or IP address clients dial, repeatable (default: localhost, 127.0.0.1 and this "
    "machine's hostname).",
)
@click.option(
    "--client", "clients", multiple=True, help="Also make a client certificate (mutual TLS), repeatable."
)
@click.option("--days", type=int, default=825, show_default=True, help="Validity of the certificates.")
@click.option("--no-server", is_flag=True, help="Only client certificates (from the existing CA).")
def certs(out: Path, hosts: tuple[str, ...], clients: tuple[str, ...], days: int, no_server: bool) -> None:
    """Create a private CA and the aggregator's TLS certificate (and client certificates for mutual
    TLS), for deployments without a PKI. Keys are written with mode 0600; keep ca.key offline."""
    from aggregator.certs import CertificateError, issue_certificates

    names = list(hosts) or ["localhost", "127.0.0.1", socket.gethostname()]
    try:
        issued = issue_certificates(out, names, list(clients), days, server=not no_server)
    except CertificateError as error:
        raise click.ClickException(str(error)) from None
    for path in issued.created:
        click.echo(f"wrote {path}")
    if not no_server:
        click.echo(f"\nserver certificate valid for: {', '.join(names)}\n[server] config:")
        click.echo(f'tls_cert = "{out.resolve() / "server.pem"}"\ntls_key = "{out.resolve() / "server.key"}"')
        click.echo(f'tls_client_ca = "{issued.ca_cert.resolve()}"   # only to require client certificates')
    click.echo(f"clients: --ca-cert {issued.ca_cert.resolve()}", nl=not clients)
    if clients:
        client_pem = out.resolve() / f"client-{clients[0]}.pem"
        click.echo(f" --client-cert {client_pem} --client-key {client_pem.with_suffix('.key')}")
