"""MAC algorithms of DICOM PS3.15 and the signature primitives behind them.

A verifier must accept every MAC algorithm the Base RSA profile lists (RIPEMD-160, MD5, SHA-1,
SHA-256/384/512); new signatures use SHA-2 only (local policy may forbid weak hashes).
``cryptography`` has no RIPEMD-160, so that one is hashed with hashlib and the PKCS#1 v1.5
check is done on the RSA public operation directly.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from medsec.errors import MedsecError
from medsec.integrity.keys import PrivateKey, PublicKey

# DICOM MAC Algorithm (0400,0015) defined terms -> hashlib names.
MAC_ALGORITHMS: dict[str, str] = {
    "RIPEMD160": "ripemd160",
    "MD5": "md5",
    "SHA1": "sha1",
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA512": "sha512",
}
SIGNING_MACS = ("sha256", "sha384", "sha512")
# Accepted when verifying, as PS3.15 requires and DCMTK does, but with a warning: below the
# 112-bit collision resistance of NIST SP 800-131A, which keeps SHA-1 for legacy verification
# only. RIPEMD-160 is DCMTK's default MAC, so refusing it would refuse most dcmsign files.
WEAK_MACS: dict[str, str] = {
    "MD5": "MD5 collisions take seconds to make",
    "SHA1": "SHA-1 collisions, chosen-prefix ones too, are practical",
    "RIPEMD160": "RIPEMD-160 offers 80-bit collision resistance, below the 112-bit floor",
}
_CRYPTO_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# DER DigestInfo prefix for RIPEMD-160 (OID 1.3.36.3.2.1), RFC 8017 section 9.2 style.
_RIPEMD160_DIGEST_INFO = bytes.fromhex("3021300906052b2403020105000414")
_SHA_BY_SIZE: dict[int, type[hashes.HashAlgorithm]] = {
    32: hashes.SHA256,
    48: hashes.SHA384,
    64: hashes.SHA512,
}


class UnsupportedAlgorithm(Exception):
    """The MAC algorithm or key type cannot be checked here (reported, never passed)."""


def new_hash(dicom_name: str) -> Any:
    """A hashlib object for a DICOM MAC algorithm name; unknown/unavailable ones raise."""
    name = MAC_ALGORITHMS.get(dicom_name)
    if name is None:
        raise UnsupportedAlgorithm(f"unsupported MAC algorithm {dicom_name!r}")
    try:
        return hashlib.new(name)
    except ValueError as exc:  # e.g. an OpenSSL build without RIPEMD-160
        raise UnsupportedAlgorithm(f"unsupported MAC algorithm {dicom_name!r} here") from exc


def dicom_mac_name(mac: str) -> str:
    """``sha256`` -> ``SHA256``; only SHA-2 is offered for new signatures."""
    mac = mac.lower().replace("-", "")
    if mac not in SIGNING_MACS:
        raise MedsecError(
            f"MAC {mac!r} is not allowed for new signatures (choose from {', '.join(SIGNING_MACS)})"
        )
    return mac.upper()


def der_length(blob: bytes) -> int:
    """Length of the DER object at the start of ``blob`` (DICOM pads OB values to even)."""
    if len(blob) < 2:
        raise ValueError("truncated DER")
    first = blob[1]
    if first < 0x80:
        return 2 + first
    n = first & 0x7F
    if n == 0 or n > 4 or len(blob) < 2 + n:
        raise ValueError("bad DER length")
    return 2 + n + int.from_bytes(blob[2 : 2 + n], "big")


def sign_digest(key: PrivateKey, digest: bytes, mac: str) -> bytes:
    """RSASSA-PKCS1-v1_5 or DER ECDSA over an already computed SHA-2 digest."""
    algo = Prehashed(_CRYPTO_HASHES[mac.lower()]())
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), algo)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(algo))
    raise MedsecError("DICOM signatures need an RSA or EC key (Ed25519 is for manifests)")


def _rsa_verify_ripemd160(key: rsa.RSAPublicKey, signature: bytes, digest: bytes) -> bool:
    """PKCS#1 v1.5 check done by hand because ``cryptography`` lacks RIPEMD-160."""
    numbers = key.public_numbers()
    k = (key.key_size + 7) // 8
    if len(signature) != k:
        return False
    m = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n)
    t = _RIPEMD160_DIGEST_INFO + digest
    expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return hmac.compare_digest(m.to_bytes(k, "big"), expected)


def verify_digest(key: PublicKey, signature: bytes, digest: bytes, mac: str) -> bool:
    """Whether ``signature`` is a valid RSA (PKCS#1 v1.5) or ECDSA signature over ``digest``."""
    mac = mac.lower()
    if isinstance(key, rsa.RSAPublicKey):
        if mac == "ripemd160":
            return _rsa_verify_ripemd160(key, signature, digest)
        try:
            key.verify(signature, digest, padding.PKCS1v15(), Prehashed(_CRYPTO_HASHES[mac]()))
        except InvalidSignature:
            return False
        return True
    if isinstance(key, ec.EllipticCurvePublicKey):
        try:
            signature = signature[: der_length(signature)]
        except ValueError:
            return False
        if mac in _CRYPTO_HASHES:
            algo: hashes.HashAlgorithm = _CRYPTO_HASHES[mac]()
        else:
            # ECDSA uses the digest as an integer; a short digest left-padded with zeros to
            # the curve size is the same integer, so a SHA-2 of that size stands in for it.
            size = (key.curve.key_size + 7) // 8
            if size not in _SHA_BY_SIZE:
                raise UnsupportedAlgorithm(f"{mac} with curve {key.curve.name}")
            digest, algo = digest.rjust(size, b"\x00"), _SHA_BY_SIZE[size]()
        try:
            key.verify(signature, digest, ec.ECDSA(Prehashed(algo)))
        except InvalidSignature:
            return False
        return True
    if isinstance(key, ed25519.Ed25519PublicKey):
        raise UnsupportedAlgorithm("Ed25519 keys are not used for DICOM signatures")
    raise UnsupportedAlgorithm(f"unsupported key type {type(key).__name__}")
