"""`fedprompt client run`: one edge device taking part in a federated run."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from edge_client.datasets import ImageSet


@click.group()
def client() -> None:
    """The edge client: `run` joins an aggregator's run with a bundle and local data."""


@client.command()
@click.option("--aggregator", "address", required=True, help="The aggregator as HOST:PORT.")
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Bundle folder from `export`.",
)
@click.option(
    "--data",
    required=True,
    help="Training images: an ImageFolder tree (root/CLASS/*.png|jpg) or a built-in name.",
)
@click.option(
    "--eval-data", default=None, help="Held-out images to report accuracy on (same forms as --data)."
)
@click.option(
    "--token",
    envvar="FEDPROMPT_TOKEN",
    default=None,
    help="Enrolment token (or FEDPROMPT_TOKEN); not needed again once this state folder is enrolled.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("fedprompt-client-state"),
    show_default=True,
    help="Where the device keeps its enrolment, feature cache, privacy accountant, an update not yet "
    "delivered, and the final model.",
)
@click.option("--name", default=platform.node(), help="Device name shown in the aggregator's log.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="Image encoder precision to run (default: the bundle's default precision).",
)
@click.option(
    "--ca-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM CA that signed the aggregator's certificate (e.g. ca.pem from `fedprompt aggregator "
    "certs`). Without it, TLS to a non-loopback aggregator trusts the system's roots.",
)
@click.option(
    "--client-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM client certificate, for an aggregator that requires mutual TLS (with --client-key).",
)
@click.option(
    "--client-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM private key of --client-cert.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Plaintext even to a non-loopback aggregator (only behind a trusted TLS proxy or VPN).",
)
@click.option(
    "--skip-bad-images",
    is_flag=True,
    help="Leave out images that do not decode (counted in the log) instead of stopping at the first.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Give up after this many seconds without reaching the aggregator (retries use backoff).",
)
@click.option(
    "--attributes",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="JSON file: each class name -> a list of short phrases describing it (FedMVP's attribute "
    "sentences; see edge_client/attributes). Kept in the state folder. Default: the shipped file for "
    "the device's classes, else class names alone.",
)
@click.option(
    "--privacy-policy",
    "policy_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="TOML file with this device's privacy floor (see edge_client/privacy-policy.example.toml); "
    "the flags below override its keys. Kept in the state folder at first start.",
)
@click.option("--allow-no-dp", is_flag=True, help='Also accept rounds with dp = "none" (refused by default).')
@click.option(
    "--dp-mode",
    "dp_modes",
    type=click.Choice(["none", "client", "sample"]),
    multiple=True,
    help="A DP mode this device accepts (repeat for several; default: client and sample).",
)
@click.option(
    "--min-noise-multiplier", type=click.FloatRange(min=0), default=None, help="Floor (default 0.5)."
)
@click.option(
    "--max-clip", type=click.FloatRange(min=0), default=None, help="Largest clip accepted (default: any)."
)
@click.option(
    "--max-delta",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Largest delta accepted (default 1e-5).",
)
@click.option(
    "--max-epsilon-per-run",
    type=click.FloatRange(min=0),
    default=None,
    help="Most epsilon one run may spend.",
)
@click.option(
    "--max-epsilon-lifetime",
    type=click.FloatRange(min=0),
    default=None,
    help="Most epsilon over the device's life.",
)
@click.option(
    "--accountant",
    type=click.Choice(["prv", "rdp"]),
    default=None,
    help="The accountant rounds must use (default prv).",
)
@click.option(
    "--accept-weaker-policy",
    is_flag=True,
    help="Replace the policy kept in the state folder by a weaker one (refused without this flag).",
)
@click.option(
    "--secagg-min-threshold",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="Secure aggregation: refuse a session whose threshold is below this or below a majority "
    "of this device's neighbourhood (whatever the aggregator announces).",
)
def run(
    address: str,
    bundle: Path,
    data: str,
    eval_data: str | None,
    token: str | None,
    state_dir: Path,
    name: str,
    precision: str | None,
    ca_cert: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    insecure: bool,
    skip_bad_images: bool,
    connect_timeout: float,
    policy_file: Path | None,
    allow_no_dp: bool,
    dp_modes: tuple[str, ...],
    min_noise_multiplier: float | None,
    max_clip: float | None,
    max_delta: float | None,
    max_epsilon_per_run: float | None,
    max_epsilon_lifetime: float | None,
    accountant: str | None,
    accept_weaker_policy: bool,
    secagg_min_threshold: int,
    attributes: Path | None,
) -> None:
    """Join the aggregator's run: enrol, then train each round it is sampled for and upload the
    update, until the run is finished. Image features are computed once and cached; a trained
    update is kept until the aggregator has it. TLS is used for any non-loopback aggregator.
    A task below this device's privacy floor (--privacy-policy and the flags after it) is refused
    before any training, with one line, and the aggregator is told."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # failed handshakes get our one line, not grpc's
    from edge_client.attributes import AttributeFileError, install
    from edge_client.bundle import BundleError
    from edge_client.caption_workspace import CaptionWorkspace, is_captioned_folder
    from edge_client.methods.base import ClientMethod
    from edge_client.methods.registry import CLIENT_METHODS
    from edge_client.privacy_policy import PolicyError, PolicyGuard, PrivacyPolicy, install_policy
    from edge_client.runtime import AggregatorLink, ClientError, ClientRuntime
    from edge_client.tls import TLSSettingsError, channel_security
    from edge_client.workspace import ClientWorkspace, WorkspaceError
    from fedprompt.common.codec import CodecError
    from fedprompt.common.methods import spec_of
    from fedprompt.common.network import AddressError
    from fedprompt.common.privacy import BudgetExceeded, PrivacyStateError
    from fedprompt.common.secagg.policy import ThresholdFloor
    from fedprompt.common.settings import SettingsError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s client %(message)s", datefmt="%H:%M:%S", force=True
    )
    try:
        security = channel_security(address, ca_cert, client_cert, client_key, insecure)
    except (AddressError, TLSSettingsError) as error:
        raise click.ClickException(str(error)) from None
    user_errors = (
        AttributeFileError,
        BundleError,
        ClientError,
        CodecError,
        BudgetExceeded,
        PrivacyStateError,
        SettingsError,
        WorkspaceError,
        OSError,
    )
    try:
        policy = PrivacyPolicy.from_toml(policy_file) if policy_file else PrivacyPolicy()
        modes = tuple(dp_modes) or policy.dp_modes
        policy = policy.with_overrides(
            dp_modes=(*modes, "none") if allow_no_dp and "none" not in modes else modes,
            min_noise_multiplier=min_noise_multiplier,
            max_clip=max_clip,
            max_delta=max_delta,
            max_epsilon_per_run=max_epsilon_per_run,
            max_epsilon_lifetime=max_epsilon_lifetime,
            accountant=accountant,
        )
        for weakening in install_policy(state_dir, policy, accept_weaker_policy):
            logging.warning("privacy policy weakened by the owner: %s", weakening)
    except PolicyError as error:
        raise click.ClickException(str(error)) from None
    link = AggregatorLink(address, patience_s=connect_timeout, security=security)
    try:
        captioning = is_captioned_folder(data)
        if captioning:  # captioned images (captions.txt): the captioning methods' workspace
            workspace = CaptionWorkspace.load(bundle, data, eval_data, state_dir=state_dir)
        else:
            train, held_out = data, eval_data
            if skip_bad_images:
                train, held_out = _readable(data), None if eval_data is None else _readable(eval_data)
            workspace = ClientWorkspace.load(
                bundle, train, held_out, state_dir=state_dir, precision=precision
            )
            if attributes is not None:
                install(attributes, state_dir, workspace.class_names)

        def build_method(method: str) -> ClientMethod:
            if method not in CLIENT_METHODS:
                known = ", ".join(sorted(CLIENT_METHODS))
                raise ClientError(f"the aggregator runs method {method!r}; this client knows {known}")
            if ("captioning" in spec_of(method).capabilities) != captioning:
                wanted = (
                    "captioned images (a folder with captions.txt)" if not captioning else "class folders"
                )
                raise ClientError(
                    f"the aggregator runs method {method}, which trains on {wanted}; --data has not"
                )
            return CLIENT_METHODS[method](workspace)

        floor = ThresholdFloor(minimum=secagg_min_threshold)
        guard = PolicyGuard(state_dir, policy, len(workspace.train))
        runtime = ClientRuntime(
            link, build_method, state_dir, token, name, guard=guard, threshold_floor=floor
        )
        final = runtime.run()
    except user_errors as error:
        raise click.ClickException(
            str(error).splitlines()[0] if str(error) else type(error).__name__
        ) from None
    except KeyboardInterrupt:
        raise click.Abort() from None
    finally:
        link.close()
    click.echo(f"run {final['run_id']} finished after round {final['round_id']}")
    if final["kept"]:
        use = "caption with it: fedprompt caption" if captioning else "classify with it: fedprompt predict"
        click.echo(f"{use} --bundle {bundle} --state-dir {state_dir} IMAGES...")


def _readable(spec: str) -> ImageSet:
    """The dataset `spec` without the images that do not decode, saying how many were left out."""
    from edge_client.datasets import load_dataset

    images, bad = load_dataset(spec).readable()
    if bad:
        logging.getLogger("fedprompt.client").warning(
            "skipped %d unreadable image(s) of %d in %s (first: %s)",
            len(bad),
            len(bad) + len(images),
            spec,
            bad[0],
        )
    return images
