"""X.509 path validation of a signer's certificate: RFC 5280 as OpenSSL (and so DCMTK) applies
it by default, or a strict web-PKI-like profile on request.

Hospital and vendor PKIs are made with the common ``openssl`` commands: ``openssl req -x509``
gives a CA with basicConstraints but no keyUsage, ``openssl x509 -req`` without an extension
file gives an X.509 v1 end-entity certificate. DCMTK's dcmsign accepts both; so does the
default ``rfc5280`` profile here:

- a CA must assert basicConstraints cA (or be a self-signed v1 root, as OpenSSL allows); its
  keyUsage, when present, must allow keyCertSign; v1 intermediates are refused;
- the signer's keyUsage, when present, must allow digitalSignature or nonRepudiation (OpenSSL
  leaves this to the application; a key limited to, e.g., encryption must not sign images);
- a v1 signer certificate issued by a trusted CA is accepted, and reported.

``strict`` is the web-PKI-like profile of ``cryptography``: X.509 v3 only, CAs with keyUsage.
``cryptography.x509.verification`` does the work wherever it can; it refuses every v1
certificate, so a path with a v1 signer or a v1 root (always signer -> trust-store certificate,
as a DICOM signature carries only the signer's certificate) is checked by hand below.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

PROFILES = ("rfc5280", "strict")
V1_NOTE = "signer certificate is X.509 v1 (no extensions, no key usage limits)"


def _signing_key_usage(_policy: object, _cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not (ku.digital_signature or ku.content_commitment):
        raise ValueError("signer keyUsage allows neither digitalSignature nor nonRepudiation")


def _ca_key_usage(_policy: object, _cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("CA keyUsage does not allow keyCertSign")


def _policies(profile: str) -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """(CA policy, end-entity policy) for ``cryptography``'s verifier."""
    if profile == "strict":
        return ExtensionPolicy.webpki_defaults_ca(), ExtensionPolicy.permit_all()
    ca = (
        ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    )
    ee = ExtensionPolicy.permit_all().may_be_present(
        x509.KeyUsage, Criticality.AGNOSTIC, _signing_key_usage
    )
    return ca, ee


def _valid_at(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ca_error(ca: x509.Certificate) -> str | None:
    """Why ``ca`` may not issue certificates (OpenSSL's X509_check_ca, plus keyUsage)."""
    if ca.version is x509.Version.v1:
        return None if _self_signed(ca) else "a v1 certificate that is not a self-signed root"
    bc = _ext(ca, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        return "basicConstraints cA is not asserted"
    ku = _ext(ca, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and not ku.key_cert_sign:
        return "keyUsage does not allow keyCertSign"
    return None


def _by_hand(
    leaf: x509.Certificate, anchors: tuple[x509.Certificate, ...], at: dt.datetime
) -> str | None:
    """Signer -> trust-store certificate, where one of them is v1 (cryptography refuses v1)."""
    if not _valid_at(leaf, at):
        return f"signer certificate not valid at {at.isoformat()}"
    for ext in leaf.extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            return (
                f"signer certificate has an unrecognised critical extension {ext.oid.dotted_string}"
            )
    ku = _ext(leaf, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and not (ku.digital_signature or ku.content_commitment):
        return "signer keyUsage allows neither digitalSignature nor nonRepudiation"
    reasons = []
    for ca in anchors:
        if ca.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            reasons.append(f"not signed by the key of {ca.subject.rfc4514_string()}")
            continue
        problem = _ca_error(ca)
        if problem is None and not _valid_at(ca, at):
            problem = f"not valid at {at.isoformat()}"
        if problem is None:
            return None
        reasons.append(f"issuer {ca.subject.rfc4514_string()}: {problem}")
    if not reasons:
        return f"issuer {leaf.issuer.rfc4514_string()} is not in the trust store"
    return "; ".join(reasons)


def path_error(
    leaf: x509.Certificate,
    anchors: tuple[x509.Certificate, ...],
    at: dt.datetime,
    profile: str = "rfc5280",
    intermediates: tuple[x509.Certificate, ...] = (),
) -> str | None:
    """``None`` when ``leaf`` chains to one of ``anchors`` at time ``at``; else the reason."""
    if leaf in anchors:
        # A signer pinned directly: only its validity period remains to check.
        return None if _valid_at(leaf, at) else f"certificate not valid at {at.isoformat()}"
    issuers = [a for a in anchors if a.subject == leaf.issuer]
    has_v1 = leaf.version is x509.Version.v1 or any(a.version is x509.Version.v1 for a in issuers)
    if profile == "rfc5280" and has_v1:
        reason = _by_hand(leaf, anchors, at)
        return (
            None if reason is None else f"no valid certificate path to the trust store ({reason})"
        )
    ca_policy, ee_policy = _policies(profile)
    verifier = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(at)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        strict = ", strict profile" if profile == "strict" else ""
        return f"no valid certificate path to the trust store{strict} ({exc})"
    return None
