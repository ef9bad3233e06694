"""Signing keys, X.509 certificates and the trust store that decides whose signatures count.

A modality (or a CA that vouches for modalities) is trusted by putting its PEM certificate in a
trust directory; a signer certificate is trusted when an X.509 path from it to one of those
certificates validates (RFC 5280 as OpenSSL applies it, or a strict profile: see
:mod:`medsec.integrity.trust`). That check is separate from the cryptographic signature check,
so a verifier can say which of the two failed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from medsec.errors import MedsecError
from medsec.integrity.trust import PROFILES as TRUST_PROFILES
from medsec.integrity.trust import V1_NOTE, path_error
from medsec.utils import write_new

KeyType = Literal["rsa", "ec", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

KEY_TYPES: tuple[KeyType, ...] = ("rsa", "ec", "ed25519")
SIGNER_KEY_FILE = "signer_key.pem"
SIGNER_CERT_FILE = "signer_cert.pem"
CA_KEY_FILE = "ca_key.pem"
CA_CERT_FILE = "ca_cert.pem"
RSA_BITS = 3072
# Certificates start a day in the past: DCMTK rejects a signature made in the same second as
# the certificate's notBefore ("certificate was not yet valid at signature creation date").
_BACKDATE = dt.timedelta(days=1)
_CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der")


def new_private_key(key_type: KeyType = "rsa") -> PrivateKey:
    """A fresh key: RSA-3072 (DICOM Base/Creator RSA profiles), EC P-256, or Ed25519."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise MedsecError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")


def _cert_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """Ed25519 certificates carry no separate hash; RSA and EC ones use SHA-256."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medsec"),
        ]
    )


def build_certificate(
    subject_key: PrivateKey,
    common_name: str,
    *,
    issuer_key: PrivateKey | None = None,
    issuer_cert: x509.Certificate | None = None,
    is_ca: bool = False,
    days: int = 3650,
) -> x509.Certificate:
    """An X.509 v3 certificate for ``subject_key``: self-signed, or issued by ``issuer_cert``."""
    now = dt.datetime.now(dt.UTC)
    public = subject_key.public_key()
    signing_key = issuer_key or subject_key
    issuer_name = issuer_cert.subject if issuer_cert is not None else _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=not is_ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    aki_source = issuer_cert.public_key() if issuer_cert is not None else public
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(aki_source),  # type: ignore[arg-type]
        critical=False,
    )
    return builder.sign(signing_key, _cert_hash(signing_key))


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _save_pair(
    out_dir: Path, key: PrivateKey, cert: x509.Certificate, key_name: str, cert_name: str
) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out_dir / key_name, out_dir / cert_name
    for p in (key_path, cert_path):
        if p.exists():
            raise MedsecError(f"{p} already exists; refusing to overwrite it")
    write_new(key_path, _key_pem(key), 0o600)
    write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key_path, cert_path


def generate_signer(
    out_dir: Path, common_name: str = "medsec modality", key_type: KeyType = "rsa"
) -> tuple[Path, Path]:
    """Create a signing key (mode 0600) and a self-signed certificate in ``out_dir``.

    Returns ``(key_path, cert_path)``. The certificate doubles as its own trust anchor: copy it
    into a verifier's trust directory. Existing files are never overwritten.
    """
    key = new_private_key(key_type)
    cert = build_certificate(key, common_name)
    return _save_pair(Path(out_dir), key, cert, SIGNER_KEY_FILE, SIGNER_CERT_FILE)


def generate_ca(out_dir: Path, common_name: str = "medsec device CA") -> tuple[Path, Path]:
    """Create a CA key (0600) and self-signed CA certificate that can issue signer certificates."""
    key = new_private_key("rsa")
    cert = build_certificate(key, common_name, is_ca=True)
    return _save_pair(Path(out_dir), key, cert, CA_KEY_FILE, CA_CERT_FILE)


def issue_signer(
    ca_key_path: Path,
    ca_cert_path: Path,
    out_dir: Path,
    common_name: str = "medsec modality",
    key_type: KeyType = "rsa",
) -> tuple[Path, Path]:
    """Create a signing key and a certificate for it issued by the CA at the given paths."""
    ca_key = load_private_key(ca_key_path)
    ca_cert = load_certificate(ca_cert_path)
    if ca_cert.public_key() != ca_key.public_key():
        raise MedsecError(f"{ca_key_path} is not the key of the CA certificate {ca_cert_path}")
    key = new_private_key(key_type)
    cert = build_certificate(key, common_name, issuer_key=ca_key, issuer_cert=ca_cert)
    return _save_pair(Path(out_dir), key, cert, SIGNER_KEY_FILE, SIGNER_CERT_FILE)


def load_private_key(path: Path) -> PrivateKey:
    """Read an unencrypted PEM or DER private key; the error never includes key material."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MedsecError(f"cannot read key {path}: {exc.strerror}") from exc
    loader = (
        serialization.load_pem_private_key
        if b"-----BEGIN" in data
        else serialization.load_der_private_key
    )
    try:
        key = loader(data, password=None)
    except (ValueError, TypeError) as exc:
        raise MedsecError(f"{path} is not an unencrypted PEM/DER private key") from exc
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise MedsecError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM bundle or a single DER file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MedsecError(f"cannot read certificate {path}: {exc.strerror}") from exc
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise MedsecError(f"{path} is not a PEM or DER X.509 certificate") from exc


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate in ``path``."""
    return load_certificates(path)[0]


def describe(cert: x509.Certificate) -> str:
    """Short human name of a certificate's subject, for one-line reasons."""
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


@dataclass(frozen=True)
class TrustStore:
    """Certificates of trusted CAs or signers; a signer is trusted if a path to one validates."""

    anchors: tuple[x509.Certificate, ...]
    profile: str = "rfc5280"

    def __post_init__(self) -> None:
        if self.profile not in TRUST_PROFILES:
            raise MedsecError(f"unknown trust profile {self.profile!r}")

    @classmethod
    def from_dir(cls, path: Path, profile: str = "rfc5280") -> TrustStore:
        """Load every ``*.pem``/``*.crt``/``*.cer``/``*.der`` certificate file in ``path``.

        Private keys or other files in the directory are ignored; no certificate is an error,
        because an empty trust store would silently reject everything.
        """
        path = Path(path)
        if not path.is_dir():
            raise MedsecError(f"trust store {path} is not a directory")
        certs: list[x509.Certificate] = []
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix.lower() in _CERT_SUFFIXES:
                data = f.read_bytes()
                if f.suffix.lower() == ".pem" and b"-----BEGIN CERTIFICATE-----" not in data:
                    continue  # a PEM private key next to the certificates
                certs.extend(load_certificates(f))
        if not certs:
            raise MedsecError(f"trust store {path} holds no certificates")
        return cls(tuple(certs), profile)

    @classmethod
    def from_certificates(
        cls, certs: list[x509.Certificate], profile: str = "rfc5280"
    ) -> TrustStore:
        """A trust store from certificates already in memory."""
        if not certs:
            raise MedsecError("a trust store needs at least one certificate")
        return cls(tuple(certs), profile)

    def untrusted_reason(
        self,
        leaf: x509.Certificate,
        at: dt.datetime,
        intermediates: tuple[x509.Certificate, ...] = (),
    ) -> str | None:
        """``None`` when ``leaf`` chains to an anchor, valid at time ``at``; else the reason.

        The rules are those of :mod:`medsec.integrity.trust` for this store's ``profile``.
        """
        return path_error(leaf, self.anchors, at, self.profile, intermediates)

    def note(self, leaf: x509.Certificate) -> str | None:
        """What a user should know about a certificate this store accepted (a v1 signer)."""
        if leaf.version is x509.Version.v1 and leaf not in self.anchors:
            return V1_NOTE
        return None
