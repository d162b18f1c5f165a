"""A small private CA for users without a PKI: a CA, a server certificate for the aggregator, and
client certificates for optional mutual TLS, all made with `cryptography` (ECDSA P-256, SHA-256).

Private keys are written with mode 0600. An existing CA in the folder is reused, so client
certificates can be added later; an existing certificate or key is never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertificateError(RuntimeError):
    """Certificates cannot be written as asked; the message is one line."""


@dataclass(frozen=True)
class Issued:
    """Paths of what was written (CA reused or new, server and client pairs)."""

    ca_cert: Path
    created: list[Path]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedprompt"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _write(path: Path, data: bytes, private: bool) -> Path:
    if path.exists():
        raise CertificateError(f"{path} exists; remove it or choose another --out folder")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with os.fdopen(os.open(path, flags, 0o600 if private else 0o644), "wb") as stream:
        stream.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_or_create_ca(folder: Path, days: int, created: list[Path]):
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as error:
            raise CertificateError(f"cannot reuse the CA in {folder}: {error}") from None
        return cert, key
    if cert_path.exists() or key_path.exists():
        raise CertificateError(f"{folder} holds only half of a CA ({CA_CERT}, {CA_KEY}); remove it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name("fedprompt aggregator CA")
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    created.append(_write(key_path, _key_pem(key), private=True))
    created.append(_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False))
    return cert, key


def _leaf(ca_cert, ca_key, common_name: str, usage: x509.ObjectIdentifier, days: int, hosts: list[str]):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        builder = builder.add_extension(_subject_alt_names(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def issue_certificates(
    folder: Path, hosts: list[str], clients: list[str], days: int = 825, server: bool = True
) -> Issued:
    """Write (or reuse) the CA in `folder`, a server pair valid for `hosts` (DNS names or IP
    addresses the clients will dial), and one pair per client name."""
    if days < 1:
        raise CertificateError("--days must be at least 1")
    if server and not hosts:
        raise CertificateError("a server certificate needs at least one --host")
    for name in clients:
        if not CLIENT_NAME.match(name):
            raise CertificateError(f"client name {name!r}: use letters, digits, '.', '_' or '-'")
    pairs = [(SERVER_CERT, SERVER_KEY, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts)] if server else []
    pairs += [
        (f"client-{name}.pem", f"client-{name}.key", name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        for name in clients
    ]
    existing = [folder / name for pair in pairs for name in pair[:2] if (folder / name).exists()]
    if existing:  # checked before writing anything, so a refusal leaves the folder as it was
        raise CertificateError(f"{existing[0]} exists; remove it or choose another --out folder")
    folder.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    ca_cert, ca_key = _load_or_create_ca(folder, days * 4, created)
    for cert_name, key_name, common_name, usage, names in pairs:
        cert, key = _leaf(ca_cert, ca_key, common_name, usage, days, names)
        created.append(_write(folder / key_name, _key_pem(key), private=True))
        created.append(_write(folder / cert_name, cert.public_bytes(serialization.Encoding.PEM), False))
    return Issued(folder / CA_CERT, created)
