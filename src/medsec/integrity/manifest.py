"""Detached signed manifests for non-DICOM images (.npz, .npy, PNG, in-memory arrays).

The manifest binds the *decoded pixels*, not just the file bytes: for every array its name,
shape, little-endian dtype and the SHA-256 of its canonical (C-order, little-endian) bytes,
plus caller-chosen metadata. The payload is serialised canonically (sorted keys, no spaces)
and signed with Ed25519, ECDSA P-256/SHA-256 or RSA PKCS#1 v1.5/SHA-256; the signer's X.509
certificate travels in the manifest and is checked against a trust store like a DICOM signer.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from PIL import Image

from medsec.errors import MedsecError
from medsec.integrity.dicom_io import write_new
from medsec.integrity.dicom_signature import Status, VerificationResult
from medsec.integrity.keys import (
    PrivateKey,
    PublicKey,
    TrustStore,
    describe,
    load_certificate,
    load_private_key,
)

FORMAT = "medsec-manifest/1"
MANIFEST_SUFFIX = ".sig.json"


def canonical_array(a: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian (or byte-order-free) copy-free where already canonical."""
    a = np.asarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)


def describe_array(name: str, a: np.ndarray) -> dict[str, Any]:
    """Name, shape, dtype and SHA-256 of the canonical bytes of one array."""
    c = canonical_array(a)
    if c.dtype.hasobject:
        raise MedsecError(f"array {name!r} holds Python objects; only numeric data can be signed")
    return {
        "name": name,
        "shape": list(c.shape),
        "dtype": c.dtype.str,
        "sha256": hashlib.sha256(memoryview(c).cast("B")).hexdigest(),
    }


def load_arrays(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Decode a data file into named arrays: .npz (every member), .npy, or an image file."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return "npz", {k: z[k] for k in sorted(z.files)}
        if suffix == ".npy":
            return "npy", {"array": np.load(path, allow_pickle=False)}
        with Image.open(path) as img:
            return f"image/{img.format}/{img.mode}", {"pixels": np.asarray(img)}
    except Image.DecompressionBombError as exc:
        raise MedsecError(
            f"{path}: refusing to decode, possible decompression bomb ({exc})"
        ) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise MedsecError(f"{path}: cannot decode as .npz/.npy/image ({exc})") from exc


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _sign(key: PrivateKey, data: bytes) -> tuple[str, bytes]:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519", key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA-SHA256", key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA-PKCS1v15-SHA256", key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    raise MedsecError(f"unsupported key type {type(key).__name__}")


def _verify(public: PublicKey, algorithm: str, signature: bytes, data: bytes) -> bool:
    try:
        if algorithm == "Ed25519" and isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif algorithm == "ECDSA-SHA256" and isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif algorithm == "RSA-PKCS1v15-SHA256" and isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


def build_manifest(
    arrays: Mapping[str, np.ndarray],
    key_path: Path,
    cert_path: Path,
    subject: str = "",
    kind: str = "arrays",
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A signed manifest (a JSON-ready dict) over named arrays and metadata."""
    if not arrays:
        raise MedsecError("nothing to sign: no arrays")
    key = load_private_key(key_path)
    cert = load_certificate(cert_path)
    if cert.public_key() != key.public_key():
        raise MedsecError("the signing key does not match the certificate")
    payload = {
        "format": FORMAT,
        "subject": subject,
        "kind": kind,
        "arrays": [describe_array(n, arrays[n]) for n in sorted(arrays)],
        "metadata": dict(metadata or {}),
        "signed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    algorithm, signature = _sign(key, _canonical_json(payload))
    return {
        "payload": payload,
        "algorithm": algorithm,
        "signature": base64.b64encode(signature).decode(),
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def sign_data_file(
    in_path: Path,
    manifest_path: Path,
    key_path: Path,
    cert_path: Path,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a detached manifest for a .npz/.npy/image file; the data file is not touched."""
    in_path, manifest_path = Path(in_path), Path(manifest_path)
    if manifest_path.resolve() == in_path.resolve():
        raise MedsecError("the manifest must not replace the data file")
    kind, arrays = load_arrays(in_path)
    manifest = build_manifest(arrays, key_path, cert_path, in_path.name, kind, metadata)
    write_new(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode(), overwrite)
    return manifest_path


def verify_manifest(
    manifest: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    trust: TrustStore,
    metadata: Mapping[str, Any] | None = None,
) -> VerificationResult:
    """Check a manifest against arrays: signature, trust, then every array and the metadata.

    ``metadata``, when given, must equal the signed metadata (e.g. the label of an image).
    """
    try:
        payload = manifest["payload"]
        algorithm = str(manifest["algorithm"])
        signature = base64.b64decode(manifest["signature"], validate=True)
        cert = x509.load_pem_x509_certificate(str(manifest["certificate"]).encode())
        signed_bytes = _canonical_json(payload)
        signed_at = dt.datetime.fromisoformat(payload["signed_at"])
        listed = {a["name"]: a for a in payload["arrays"]}
    except (KeyError, TypeError, ValueError) as exc:
        return VerificationResult(False, Status.UNREADABLE, f"malformed manifest ({exc})")
    if payload.get("format") != FORMAT:
        return VerificationResult(False, Status.UNREADABLE, "not a medsec manifest")
    if not _verify(cert.public_key(), algorithm, signature, signed_bytes):
        return VerificationResult(
            False, Status.INVALID, "manifest signature does not match its content"
        )
    trust_error = trust.untrusted_reason(cert, signed_at)
    if trust_error is not None:
        reason = f"manifest signer {describe(cert)!r} untrusted: {trust_error}"
        return VerificationResult(False, Status.UNTRUSTED, reason)
    if sorted(listed) != sorted(arrays):
        reason = f"arrays differ: signed {sorted(listed)}, found {sorted(arrays)}"
        return VerificationResult(False, Status.INVALID, reason)
    for name in sorted(arrays):
        found, want = describe_array(name, arrays[name]), listed[name]
        for field in ("shape", "dtype", "sha256"):
            if found[field] != want[field]:
                reason = f"array {name!r}: {field} changed since signing"
                return VerificationResult(False, Status.INVALID, reason)
    if metadata is not None and dict(metadata) != payload.get("metadata"):
        return VerificationResult(False, Status.INVALID, "metadata differs from the signed one")
    return VerificationResult(
        True, Status.VERIFIED, f"manifest verified: {len(arrays)} array(s), signer trusted"
    )


def verify_data_file(
    in_path: Path, trust: TrustStore, manifest_path: Path | None = None
) -> VerificationResult:
    """Verify a .npz/.npy/image file against its detached manifest (default: FILE.sig.json)."""
    in_path = Path(in_path)
    manifest_path = Path(manifest_path or f"{in_path}{MANIFEST_SUFFIX}")
    if not manifest_path.exists():
        return VerificationResult(False, Status.MISSING, f"no manifest {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        _, arrays = load_arrays(in_path)
    except (OSError, ValueError) as exc:
        return VerificationResult(False, Status.UNREADABLE, f"unreadable manifest ({exc})")
    except MedsecError as exc:
        return VerificationResult(False, Status.UNREADABLE, str(exc))
    if not isinstance(manifest, dict):
        return VerificationResult(False, Status.UNREADABLE, "malformed manifest")
    return verify_manifest(manifest, arrays, trust)
