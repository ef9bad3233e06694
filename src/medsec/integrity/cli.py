"""`medsec keys | sign | verify`: sign images at the source, verify them before the model.

DICOM files get DICOM PS3.15 signatures (interoperable with DCMTK's dcmsign); other data
(.npz, .npy, PNG and other images) gets a detached signed manifest, FILE.sig.json by default.

Exit codes of ``medsec verify``:
  0  verified (or, with --allow-unsigned only, no signature present: reported as NOT VERIFIED)
  1  verification failed: a signature does not match, is malformed, or unsigned elements
  2  usage or input error: unreadable, truncated or corrupt file, bad trust store
  3  no signature (signatures are required unless --allow-unsigned; stripped?)
  4  signature valid but the signer is not trusted (no X.509 path to the trust store)
  5  no signature meets the required profile (--require-creator)

Unlike dcmsign, whose default is verify-if-present (a stripped file passes with a warning),
an unsigned file fails by default: stripping the signature must not be a way around it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsec.errors import MedsecError
from medsec.integrity.crypto import SIGNING_MACS
from medsec.integrity.dicom_signature import PROFILES, Status, VerificationResult, sign_file
from medsec.integrity.dicom_verify import verify_dataset
from medsec.integrity.keys import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    KEY_TYPES,
    TrustStore,
    generate_ca,
    generate_signer,
    issue_signer,
)
from medsec.integrity.mac_stream import MAX_SEQUENCE_DEPTH
from medsec.integrity.manifest import MANIFEST_SUFFIX, sign_data_file, verify_data_file

EXIT_CODES = """exit codes:
  0  verified (with --allow-unsigned also: no signature present, printed as NOT VERIFIED)
  1  verification failed (signature mismatch, malformed, unsigned elements)
  2  usage or input error (unreadable, truncated or corrupt file; bad trust store)
  3  signature required but absent (the default; --allow-unsigned accepts unsigned files)
  4  signature valid but signer not trusted (X.509 path validation failed)
  5  no signature meets the required profile (--require-creator)

Signatures with MD5, SHA-1 or RIPEMD-160 verify (PS3.15 requires it, dcmsign does it) with a
warning on stderr. Trust paths follow RFC 5280 as OpenSSL/dcmsign apply it; --strict-pki
asks for X.509 v3 certificates and CA keyUsage throughout."""


def is_dicom(path: Path) -> bool:
    """Part 10 preamble ('DICM' at byte 128) or a .dcm name."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise MedsecError(f"cannot read {path}: {exc.strerror}") from exc
    return head[128:132] == b"DICM"


def _parse_meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedsecError(f"--meta expects KEY=VALUE, got {item!r}")
        meta[key] = value
    return meta


def _keys_init(args: argparse.Namespace) -> int:
    if args.ca_dir is not None:
        ca = Path(args.ca_dir)
        key, cert = issue_signer(
            ca / CA_KEY_FILE, ca / CA_CERT_FILE, Path(args.out), args.cn, args.type
        )
    else:
        key, cert = generate_signer(Path(args.out), args.cn, args.type)
    print(f"signing key: {key} (mode 0600, keep it private)")
    print(f"certificate: {cert} (put it, or its CA, in the verifier's --trust directory)")
    return 0


def _keys_ca(args: argparse.Namespace) -> int:
    key, cert = generate_ca(Path(args.out), args.cn)
    print(f"CA key: {key} (mode 0600)")
    print(f"CA certificate: {cert} (trust anchor for signers issued with --ca-dir)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        raise MedsecError(f"input {src} does not exist")
    if is_dicom(src):
        if args.meta:
            raise MedsecError("--meta applies to manifests; DICOM signs its own elements")
        sign_file(src, out, Path(args.key), Path(args.cert), args.profile, args.mac, args.force)
        print(f"signed ({args.profile} profile, {args.mac.upper()}): {out}")
    else:
        meta = _parse_meta(args.meta)
        sign_data_file(src, out, Path(args.key), Path(args.cert), meta, args.force)
        print(f"manifest written: {out}")
    return 0


def _report(path: Path, result: VerificationResult) -> int:
    """One verdict line (stdout when it passes, stderr when not), warnings before it."""
    for warning in result.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    if result.ok and not result.signatures and result.status is Status.VERIFIED:
        print(f"{path}: NOT VERIFIED (allowed by --allow-unsigned): {result.reason}")
    elif result.ok:
        print(f"{path}: OK: {result.reason}")
    else:
        hint = (
            " (--allow-unsigned accepts unsigned files)" if result.status is Status.MISSING else ""
        )
        status = result.status.name.lower()
        print(f"{path}: FAILED ({status}): {result.reason}{hint}", file=sys.stderr)
    return result.exit_code


def _verify(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.exists():
        raise MedsecError(f"{path} does not exist")
    if args.allow_unsigned and args.require_creator:
        raise MedsecError("--allow-unsigned and --require-creator contradict each other")
    profile = "strict" if args.strict_pki else "rfc5280"
    trust = TrustStore.from_dir(Path(args.trust), profile=profile)
    if is_dicom(path):
        result = verify_dataset(
            path,
            trust,
            require_signature=not args.allow_unsigned,
            require_creator=args.require_creator,
            allow_unsigned_elements=args.allow_unsigned_elements,
        )
        return _report(path, result)
    manifest = Path(args.manifest) if args.manifest else Path(f"{path}{MANIFEST_SUFFIX}")
    if not manifest.exists():
        reason = f"no signature: not a DICOM file, and no manifest {manifest}"
        if args.allow_unsigned:
            return _report(path, VerificationResult(True, Status.VERIFIED, reason))
        return _report(path, VerificationResult(False, Status.MISSING, reason))
    return _report(path, verify_data_file(path, trust, manifest))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``keys``, ``sign`` and ``verify`` verbs."""
    keys = sub.add_parser("keys", help="create signing keys and X.509 certificates")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="<command>")
    keys_sub.required = True
    init = keys_sub.add_parser(
        "init", help="signing key (0600) + certificate, self-signed or issued by a CA"
    )
    init.add_argument("--out", required=True, help="directory for the key and certificate")
    init.add_argument("--cn", default="medsec modality", help="certificate common name")
    init.add_argument(
        "--type", choices=KEY_TYPES, default="rsa",
        help="rsa for DICOM RSA profiles (default); ec; ed25519 for manifests only",
    )  # fmt: skip
    init.add_argument("--ca-dir", help=f"issue from the CA in this directory ({CA_KEY_FILE})")
    init.set_defaults(func=_keys_init)
    ca = keys_sub.add_parser("ca", help="a CA that issues modality certificates")
    ca.add_argument("--out", required=True)
    ca.add_argument("--cn", default="medsec device CA")
    ca.set_defaults(func=_keys_ca)

    sign = sub.add_parser(
        "sign",
        help="sign a DICOM file (PS3.15) or write a signed manifest for other data",
        description="DICOM input: OUT is the signed copy. Other input (.npz/.npy/PNG): OUT is "
        f"the detached manifest (verify looks for FILE{MANIFEST_SUFFIX} by default). The "
        "input is never modified; OUT is never overwritten unless --force. A DICOM file that "
        "verify would call unreadable (truncated, stray bytes, sequences nested deeper than "
        f"{MAX_SEQUENCE_DEPTH} levels) is refused, never sealed.",
    )
    sign.add_argument("input")
    sign.add_argument("output")
    sign.add_argument("--key", required=True, help="private key (PEM)")
    sign.add_argument("--cert", required=True, help="signer certificate (PEM)")
    sign.add_argument("--profile", choices=PROFILES, default="creator",
                      help="DICOM signature profile (none allows EC keys)")  # fmt: skip
    sign.add_argument("--mac", choices=SIGNING_MACS, default="sha256")
    sign.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                      help="metadata bound into a manifest (repeatable)")  # fmt: skip
    sign.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    sign.set_defaults(func=_sign)

    verify = sub.add_parser(
        "verify",
        help="verify signatures against a trust store",
        description="Verify every DICOM signature (or the detached manifest) of FILE: the "
        "cryptographic check, then X.509 path validation of the signer to --trust.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("file")
    verify.add_argument("--trust", required=True,
                        help="directory of PEM certificates of trusted CAs or signers")  # fmt: skip
    unsigned = verify.add_mutually_exclusive_group()
    unsigned.add_argument("--require-signature", action="store_true",
                          help="fail (exit 3) when no signature is present: the default, "
                          "kept for scripts")  # fmt: skip
    unsigned.add_argument("--allow-unsigned", action="store_true",
                          help="lax mode, dcmsign's default: a file without any signature "
                          "exits 0, printed as NOT VERIFIED (a present signature must "
                          "still verify)")  # fmt: skip
    verify.add_argument("--require-creator", action="store_true",
                        help="fail (exit 5) unless a Creator RSA signature verifies")  # fmt: skip
    verify.add_argument("--allow-unsigned-elements", action="store_true",
                        help="accept elements that no signature covers")  # fmt: skip
    verify.add_argument("--strict-pki", action="store_true",
                        help="web-PKI-like path validation: X.509 v3 only, CAs with keyUsage "
                        "keyCertSign (default: RFC 5280 as OpenSSL/dcmsign apply it)")  # fmt: skip
    verify.add_argument("--manifest", help=f"manifest path (default FILE{MANIFEST_SUFFIX})")
    verify.set_defaults(func=_verify)
