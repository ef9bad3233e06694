"""TLS material for the service: a private CA, server and client certificates (ECDSA P-256).

A hospital would use its own PKI; this makes a self-contained set for ``medsec serve init`` and
the tests. Clients trust the CA certificate; the server certificate names the host (DNS and IP
subject alternative names), as TLS hostname checking requires. The CA key can go to another
directory than the certificates, so the serving host never holds a key that issues certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medsec.errors import MedsecError
from medsec.utils import write_new

CA_CERT = "ca_cert.pem"
CA_KEY = "ca_key.pem"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medsec service"),
        ]
    )


def _save(
    key_path: Path, key: ec.EllipticCurvePrivateKey, cert_path: Path, cert: x509.Certificate
) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_new(key_path, pem, 0o600)
    write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _base(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def make_tls_material(
    out_dir: Path,
    hosts: Sequence[str],
    clients: Sequence[str] = (),
    days: int = 825,
    ca_key_dir: Path | None = None,
) -> dict[str, Path]:
    """Write ca_cert.pem, server_cert.pem/server_key.pem for ``hosts`` and, for each name in
    ``clients``, <name>_cert.pem/<name>_key.pem for mutual TLS; ca_key.pem goes to
    ``ca_key_dir`` (default ``out_dir``). Returns the paths."""
    out_dir = Path(out_dir)
    ca_key_dir = out_dir if ca_key_dir is None else Path(ca_key_dir)
    for d in (out_dir, ca_key_dir):
        d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("medsec service CA")
    ca = (
        _base("medsec service CA", ca_key, ca_name, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    paths = {"ca_cert": out_dir / CA_CERT, "ca_key": ca_key_dir / CA_KEY}
    _save(paths["ca_key"], ca_key, paths["ca_cert"], ca)

    def leaf(name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _base(name, key, ca_name, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False), True
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
            .add_extension(aki, False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
        paths[f"{name}_cert"] = out_dir / f"{name}_cert.pem"
        paths[f"{name}_key"] = out_dir / f"{name}_key.pem"
        _save(
            paths[f"{name}_key"], key, paths[f"{name}_cert"], builder.sign(ca_key, hashes.SHA256())
        )

    san: list[x509.GeneralName] = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, san)
    for client in clients:
        leaf(client, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return paths


def install_server_pair(cert: Path, key: Path, out_dir: Path) -> None:
    """Copy an operator's server certificate and key (from the hospital's PKI) into ``out_dir``
    as server_cert.pem and server_key.pem (0600), once they load as a usable pair."""
    try:  # an empty password: an encrypted key fails here instead of prompting on a terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
        cert_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
    except (OSError, ssl.SSLError) as exc:
        raise MedsecError(f"TLS certificate {cert} / key {key} unusable ({exc})") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    write_new(out_dir / "server_key.pem", key_pem, 0o600)
    write_new(out_dir / "server_cert.pem", cert_pem, 0o644)
