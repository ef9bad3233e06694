"""Create and verify DICOM PS3.15 digital signatures (Base and Creator RSA profiles; EC too).

Layout (PS3.3 C.12.1.1.3): a MAC Parameters Sequence (4FFE,0001) item says which elements are
covered and with which hash; a Digital Signatures Sequence (FFFA,FFFA) item with the same MAC
ID Number holds the signature, its UID and time, and the signer's X.509 certificate. Both sit in
the dataset (or sequence item) whose elements they cover. The hashed stream is the one DCMTK's
dcmsign builds (see :mod:`medsec.integrity.mac_stream`), so signatures interoperate both ways.

Verification checks, per signature: structure, matching MAC parameters, the MAC algorithm, the
signed elements being present, the cryptographic signature, and - separately - the X.509 path
of the signer's certificate to the trust store at the signature's time. Policy on top: require a
signature, require a Creator RSA signature, and refuse elements no valid signature covers
(otherwise an attacker could add, e.g., an overlay to a signed image unnoticed).
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import io
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsec.errors import MedsecError
from medsec.integrity.crypto import (
    MAC_ALGORITHMS,
    UnsupportedAlgorithm,
    der_length,
    dicom_mac_name,
    new_hash,
    sign_digest,
    verify_digest,
)
from medsec.integrity.keys import (
    PrivateKey,
    TrustStore,
    describe,
    load_certificate,
    load_private_key,
)
from medsec.integrity.mac_stream import (
    DIGITAL_SIGNATURES_SEQUENCE,
    MAC_PARAMETERS_SEQUENCE,
    UNHASHED_SIGNATURE_ELEMENTS,
    ByteCollector,
    MacStreamWriter,
    Sink,
    default_signed_tags,
    is_signable,
    tag_str,
    tags_of,
)
from medsec.utils import atomic_write_bytes

PROFILES = ("creator", "base", "none")
CERTIFICATE_TYPE = "X509_1993_SIG"
# Creator RSA profile (PS3.15 C.3; DCMTK SiCreatorProfile): these, when present, must be signed.
_CREATOR_TAGS = frozenset(
    {
        0x00080016, 0x00080018, 0x00080012, 0x00080013,  # SOP class/instance, creation date/time
        0x0020000D, 0x0020000E,  # study and series instance UIDs
        0x00080070, 0x00080080, 0x00080081, 0x00081010, 0x00081040, 0x00081090,  # equipment
        0x00181000, 0x00181020, 0x00181050, 0x00181200, 0x00181201, 0x00280120,
        0x00280002, 0x00280004, 0x00280006, 0x00280010, 0x00280011, 0x00280034,  # image pixel
        0x00280100, 0x00280101, 0x00280102, 0x00280103, 0x00280106, 0x00280107,
        0x00281101, 0x00281102, 0x00281103, 0x00281201, 0x00281202, 0x00281203,
        0x7FE00010,
    }
)  # fmt: skip


def _creator_required(tag: int) -> bool:
    group = tag >> 16
    is_overlay = 0x6000 <= group < 0x6020 and group % 2 == 0
    return tag in _CREATOR_TAGS or is_overlay


class Status(enum.Enum):
    """Outcome of a verification; each maps to one documented CLI exit code."""

    VERIFIED = 0
    INVALID = 1
    UNREADABLE = 2
    MISSING = 3
    UNTRUSTED = 4
    PROFILE = 5

    @property
    def exit_code(self) -> int:
        return self.value


@dataclass
class SignatureCheck:
    """What was found and checked for one signature."""

    index: int  # 1-based, in document order, across all levels
    location: str  # "top level" or a path like "(0040,0275)[0]"
    mac_id: int | None = None
    uid: str = ""
    datetime: str = ""
    mac_algorithm: str = ""
    key_type: str = ""
    signer: str = ""
    signed_tags: tuple[int, ...] = ()
    valid: bool = False  # cryptographic check passed
    trusted: bool = False  # X.509 path validation passed
    creator: bool = False  # meets the Creator RSA profile
    error: str | None = None  # first failed check (crypto/structure)
    trust_error: str | None = None

    @property
    def name(self) -> str:
        uid = f" UID={self.uid}" if self.uid else ""
        return f"signature #{self.index} ({self.location}{uid})"


@dataclass
class VerificationResult:
    """Verdict for one instance: ``ok`` and a one-line ``reason`` naming signature and check."""

    ok: bool
    status: Status
    reason: str
    signatures: list[SignatureCheck] = field(default_factory=list)
    unsigned_elements: tuple[int, ...] = ()

    @property
    def exit_code(self) -> int:
        return self.status.exit_code


# ----------------------------------------------------------------------------- signing


def _now_dt() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%d%H%M%S.%f") + "+0000"


def _parse_dt(value: str) -> dt.datetime | None:
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX, trailing parts optional) -> aware UTC datetime."""
    value = value.strip()
    offset = dt.timedelta(0)
    for sign in "+-":
        if sign in value[8:]:
            value, zone = value.rsplit(sign, 1)
            if len(zone) != 4 or not zone.isdigit():
                return None
            minutes = int(zone[:2]) * 60 + int(zone[2:])
            offset = dt.timedelta(minutes=minutes if sign == "+" else -minutes)
            break
    main, _, frac = value.partition(".")
    if len(main) < 4 or len(main) > 14 or not main.isdigit():
        return None
    main += "00000101000000"[len(main) :]  # missing month/day default to 01, time to 0
    try:
        base = dt.datetime.strptime(main[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return None
    micro = int((frac + "000000")[:6]) if frac.isdigit() else 0
    return base.replace(microsecond=micro, tzinfo=dt.timezone(offset)).astimezone(dt.UTC)


def _mac_transfer_syntax(ds: Dataset) -> str:
    """Explicit VR LE, or for encapsulated pixel data the file's own syntax (as DCMTK does)."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is not None and ts.is_encapsulated:
        return str(ts)
    return ExplicitVRLittleEndian


def _item_stream(sig_item: Dataset, writer: MacStreamWriter) -> bytes:
    """The signature item's own hashed elements, encoded as they end the MAC input.

    A verifier encodes them before reading any of them: read values are converted by pydicom
    and would then have to be re-encoded, where unread ones are hashed as the bytes read.
    """
    sink = ByteCollector()
    writer.sink = sink
    writer.write_elements(
        sig_item, [t for t in tags_of(sig_item) if t not in UNHASHED_SIGNATURE_ELEMENTS]
    )
    writer.flush()
    return sink.getvalue()


def _signature_stream(
    sink: Sink, level: Dataset, tags: list[int], item_stream: bytes, writer: MacStreamWriter
) -> None:
    """Feed the MAC input: the signed elements, then the signature item's (``_item_stream``)."""
    writer.sink = sink
    writer.write_elements(level, tags)
    writer.write_bytes(item_stream)
    writer.flush()


def _check_key_cert(key: PrivateKey, cert: x509.Certificate) -> None:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, fmt) != cert.public_key().public_bytes(enc, fmt):
        raise MedsecError("the signing key does not match the certificate")


def sign_dataset(
    ds: Dataset,
    key_path: Path,
    cert_path: Path,
    profile: str = "creator",
    mac: str = "sha256",
    tags: list[int] | None = None,
) -> Dataset:
    """Add one signature to ``ds`` in place (and return it); earlier signatures are kept.

    ``profile``: ``creator`` or ``base`` (RSA key required, as the DICOM RSA profiles say) or
    ``none`` (any RSA/EC key). ``tags`` defaults to every signable element at the top level.
    """
    if profile not in PROFILES:
        raise MedsecError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    mac_name = dicom_mac_name(mac)
    key = load_private_key(key_path)
    cert = load_certificate(cert_path)
    _check_key_cert(key, cert)
    if profile != "none" and not isinstance(key, rsa.RSAPrivateKey):
        raise MedsecError(f"the {profile} RSA profile needs an RSA key; use --profile none")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise MedsecError("DICOM signatures need an RSA or EC key (Ed25519 is for manifests)")
    signed = sorted(tags) if tags is not None else default_signed_tags(ds)
    if not signed:
        raise MedsecError("nothing to sign: the dataset has no signable elements")
    missing = [t for t in signed if t not in ds]
    if missing:
        raise MedsecError(f"cannot sign absent element {tag_str(missing[0])}")
    if profile == "creator":
        uncovered = [t for t in tags_of(ds) if _creator_required(t) and t not in signed]
        if uncovered:
            raise MedsecError(f"creator profile must cover {tag_str(uncovered[0])}")

    params = ds.get(MAC_PARAMETERS_SEQUENCE)
    used = {int(item.MACIDNumber) for item in params.value} if params is not None else set()
    mac_id = min(set(range(len(used) + 1)) - used)

    mac_item = Dataset()
    mac_item.MACIDNumber = mac_id
    mac_item.MACCalculationTransferSyntaxUID = _mac_transfer_syntax(ds)
    mac_item.MACAlgorithm = mac_name
    mac_item.DataElementsSigned = signed

    sig_item = Dataset()
    sig_item.MACIDNumber = mac_id
    sig_item.DigitalSignatureUID = generate_uid()
    sig_item.DigitalSignatureDateTime = _now_dt()
    sig_item.CertificateType = CERTIFICATE_TYPE

    digest = new_hash(mac_name)
    writer = MacStreamWriter.for_dataset(digest, ds)
    _signature_stream(digest, ds, signed, _item_stream(sig_item, writer), writer)
    sig_item.CertificateOfSigner = cert.public_bytes(serialization.Encoding.DER)
    sig_item.Signature = sign_digest(key, digest.digest(), mac_name)

    if params is None:
        ds.MACParametersSequence = Sequence([mac_item])
    else:
        ds.MACParametersSequence.append(mac_item)
    if DIGITAL_SIGNATURES_SEQUENCE in ds:
        ds.DigitalSignaturesSequence.append(sig_item)
    else:
        ds.DigitalSignaturesSequence = Sequence([sig_item])
    return ds


def read_dicom(path: Path) -> Dataset:
    """Read a DICOM file (Part 10 or bare dataset); unreadable input is a MedsecError."""
    try:
        return dcmread(Path(path))
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise MedsecError(f"{path}: not a readable DICOM file ({exc})") from exc


def dataset_bytes(ds: Dataset) -> bytes:
    """Encode ``ds`` as a file in its original encoding (what pydicom would write)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=getattr(ds, "file_meta", None) is not None)
    return buf.getvalue()


def write_new(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Atomic write that refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedsecError(f"{path} already exists; refusing to overwrite it (use --force)")
    atomic_write_bytes(path, data)


def sign_file(
    in_path: Path,
    out_path: Path,
    key_path: Path,
    cert_path: Path,
    profile: str = "creator",
    mac: str = "sha256",
    overwrite: bool = False,
) -> Path:
    """Sign a DICOM file into ``out_path`` (never the input itself); returns ``out_path``."""
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.resolve() == in_path.resolve():
        raise MedsecError("output must differ from the input; inputs are never overwritten")
    ds = read_dicom(in_path)
    sign_dataset(ds, key_path, cert_path, profile=profile, mac=mac)
    write_new(out_path, dataset_bytes(ds), overwrite=overwrite)
    return out_path


# ----------------------------------------------------------------------------- verifying


def _signature_levels(ds: Dataset, path: str = "") -> Iterator[tuple[str, Dataset]]:
    """Every dataset/item that carries a Digital Signatures Sequence, with a readable path."""
    if DIGITAL_SIGNATURES_SEQUENCE in ds:
        yield (path or "top level"), ds
    for tag in tags_of(ds):
        if tag in (DIGITAL_SIGNATURES_SEQUENCE, MAC_PARAMETERS_SEQUENCE):
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None or raw.VR not in ("SQ", None):
            continue
        elem = ds[tag]
        if elem.VR != "SQ":
            continue
        for i, item in enumerate(elem.value):
            yield from _signature_levels(item, f"{path}{tag_str(tag)}[{i}]")


# What encoding an untrusted dataset may raise (reported, never a crash).
_ENCODING_ERRORS = (ValueError, KeyError, TypeError, AttributeError, LookupError)


def _check_one(
    check: SignatureCheck,
    level: Dataset,
    sig_item: Dataset,
    trust: TrustStore,
    writer: MacStreamWriter,
) -> None:
    """Run every check of one signature, recording the first failure in ``check``."""
    item_stream: bytes | Exception
    try:
        item_stream = _item_stream(sig_item, writer)
    except _ENCODING_ERRORS as exc:  # raised where the stream is needed, after the checks
        item_stream = exc
    required = {
        "MACIDNumber": "MAC ID Number (0400,0005)",
        "DigitalSignatureUID": "Digital Signature UID (0400,0100)",
        "DigitalSignatureDateTime": "Digital Signature DateTime (0400,0105)",
        "CertificateType": "Certificate Type (0400,0110)",
        "CertificateOfSigner": "Certificate of Signer (0400,0115)",
        "Signature": "Signature (0400,0120)",
    }
    for keyword, label in required.items():
        if sig_item.get(keyword) in (None, "", b""):
            check.error = f"malformed: {label} missing"
            return
    check.mac_id = int(sig_item.MACIDNumber)
    check.uid = str(sig_item.DigitalSignatureUID)
    check.datetime = str(sig_item.DigitalSignatureDateTime)
    params = level.get(MAC_PARAMETERS_SEQUENCE)
    matches = [p for p in (params.value if params else []) if p.get("MACIDNumber") == check.mac_id]
    if len(matches) != 1:
        what = "no" if not matches else "several"
        check.error = f"{what} MAC Parameters item for MAC ID {check.mac_id}"
        return
    mac_item = matches[0]
    check.mac_algorithm = str(mac_item.get("MACAlgorithm", ""))
    ts = str(mac_item.get("MACCalculationTransferSyntaxUID", ""))
    if ts not in (ExplicitVRLittleEndian, _mac_transfer_syntax(level)):
        check.error = f"unsupported MAC calculation transfer syntax {ts!r}"
        return
    if check.mac_algorithm not in MAC_ALGORITHMS:
        check.error = f"unsupported MAC algorithm {check.mac_algorithm!r}"
        return
    signed = _tag_list(mac_item.get("DataElementsSigned"))
    if not signed:
        check.error = "malformed: Data Elements Signed (0400,0020) missing"
        return
    check.signed_tags = tuple(signed)
    if list(check.signed_tags) != sorted(set(check.signed_tags)):
        check.error = "malformed: Data Elements Signed not in ascending order"
        return
    absent = [t for t in check.signed_tags if t not in level]
    if absent:
        check.error = f"signed element {tag_str(absent[0])} is missing (removed after signing)"
        return
    if str(sig_item.CertificateType).strip() != CERTIFICATE_TYPE:
        check.error = f"unsupported certificate type {sig_item.CertificateType!r}"
        return
    try:
        cert, check.signer, check.key_type = _signer(bytes(sig_item.CertificateOfSigner))
    except ValueError:
        check.error = "Certificate of Signer is not a readable X.509 certificate"
        return
    public = cert.public_key()
    try:
        if isinstance(item_stream, Exception):
            raise item_stream
        digest = new_hash(check.mac_algorithm)
        _signature_stream(digest, level, list(check.signed_tags), item_stream, writer)
        good = verify_digest(
            public, bytes(sig_item.Signature), digest.digest(), check.mac_algorithm
        )
    except UnsupportedAlgorithm as exc:
        check.error = str(exc)
        return
    except (KeyError, ValueError) as exc:
        check.error = f"signed data cannot be encoded ({exc})"
        return
    if not good:
        check.error = "signature does not match the signed data (modified after signing)"
        return
    check.valid = True
    check.creator = isinstance(public, rsa.RSAPublicKey) and not any(
        _creator_required(t) and t not in check.signed_tags for t in tags_of(level)
    )
    when = _parse_dt(check.datetime)
    if when is None:
        check.trust_error = f"unreadable signature DateTime {check.datetime!r}"
        return
    check.trust_error = trust.untrusted_reason(cert, when)
    check.trusted = check.trust_error is None


@functools.lru_cache(maxsize=64)
def _signer(blob: bytes) -> tuple[x509.Certificate, str, str]:
    """Certificate of Signer (DER, maybe padded) -> certificate, its name, its key type.

    Cached by the certificate's bytes: a modality sends the same certificate every time.
    """
    cert = x509.load_der_x509_certificate(blob[: der_length(blob)])
    key_type = type(cert.public_key()).__name__.removeprefix("_").replace("PublicKey", "")
    return cert, describe(cert), key_type


def _tag_list(value: object) -> list[int]:
    """An AT value (one tag, several, or absent) as a list of ints."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list):
        return [int(t) for t in value]
    return [int(value)]  # type: ignore[call-overload]


def _check_complete(ds: Dataset, path: Path, size: int) -> None:
    """pydicom tolerates a file cut inside the last value; a verifier must not."""
    for tag in tags_of(ds):
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
            continue
        have = len(raw.value) if raw.value is not None else size - raw.value_tell
        if have < raw.length:
            raise MedsecError(f"{path}: file truncated in element {tag_str(tag)}")


# Values at least this long stay in the file and are hashed from the mapping (no copy).
_DEFER_BYTES = 1 << 16


def verify_dataset(
    source: Dataset | Path | str,
    trust: TrustStore,
    require_signature: bool = True,
    require_creator: bool = False,
    allow_unsigned_elements: bool = False,
) -> VerificationResult:
    """Verify every signature of a DICOM dataset or file against ``trust`` and the policy.

    Never raises for bad input: an unreadable, truncated or corrupt file is a failed result
    (status UNREADABLE). By default every signable top-level element must be covered by a valid
    signature, so nothing can be added unnoticed next to a signed image. To feed a model, read
    the file once and verify that in-memory dataset, so what was checked is what is used.
    """
    policy = (require_signature, require_creator, allow_unsigned_elements)
    if isinstance(source, Dataset):
        return _verify(source, None, trust, *policy)
    path = Path(source)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                ds = dcmread(fh, defer_size=_DEFER_BYTES)
                _check_complete(ds, path, len(mm))
                return _verify(ds, view, trust, *policy)
            finally:
                view.release()
    except MedsecError as exc:
        return VerificationResult(False, Status.UNREADABLE, str(exc))
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        return VerificationResult(
            False, Status.UNREADABLE, f"{path}: not a readable DICOM file ({exc})"
        )


def _verify(
    ds: Dataset,
    source: memoryview | None,
    trust: TrustStore,
    require_signature: bool,
    require_creator: bool,
    allow_unsigned_elements: bool,
) -> VerificationResult:
    checks: list[SignatureCheck] = []
    try:
        writer = MacStreamWriter.for_dataset(_NullSink(), ds, source)
        for location, level in _signature_levels(ds):
            for sig_item in level[DIGITAL_SIGNATURES_SEQUENCE].value:
                check = SignatureCheck(index=len(checks) + 1, location=location)
                checks.append(check)
                _check_one(check, level, sig_item, trust, writer)
    except _ENCODING_ERRORS as exc:
        return VerificationResult(
            False, Status.UNREADABLE, f"corrupt DICOM data ({exc})", signatures=checks
        )
    return _decide(ds, checks, require_signature, require_creator, allow_unsigned_elements)


class _NullSink:
    """Placeholder sink; each signature check swaps in its own hash object."""

    def update(self, data: bytes | memoryview, /) -> None:
        raise AssertionError("stream written without a hash")


def _decide(
    ds: Dataset,
    checks: list[SignatureCheck],
    require_signature: bool,
    require_creator: bool,
    allow_unsigned_elements: bool,
) -> VerificationResult:
    """Apply the policy to the per-signature results; the first failure gives the reason."""
    if not checks:
        if require_signature or require_creator:
            return VerificationResult(
                False, Status.MISSING, "no digital signature present (signature required)"
            )
        return VerificationResult(True, Status.VERIFIED, "no signature present (not required)")
    n = len(checks)
    for c in checks:
        if c.error is not None:
            return VerificationResult(False, Status.INVALID, f"{c.name}: {c.error}", checks)
    for c in checks:
        if not c.trusted:
            reason = f"{c.name}: signer {c.signer!r} untrusted: {c.trust_error}"
            return VerificationResult(False, Status.UNTRUSTED, reason, checks)
    if require_creator and not any(c.creator for c in checks):
        reason = f"none of {n} signature(s) meets the Creator RSA profile (creator required)"
        return VerificationResult(False, Status.PROFILE, reason, checks)
    top = [c for c in checks if c.location == "top level"]
    covered = {t for c in top for t in c.signed_tags}
    unsigned = tuple(t for t in tags_of(ds) if is_signable(t) and t not in covered)
    if unsigned and not allow_unsigned_elements:
        names = ", ".join(tag_str(t) for t in unsigned[:5]) + (" ..." if len(unsigned) > 5 else "")
        reason = f"{len(unsigned)} element(s) not covered by any valid signature: {names}"
        return VerificationResult(False, Status.INVALID, reason, checks, unsigned)
    return VerificationResult(
        True, Status.VERIFIED, f"{n} signature(s) verified and trusted", checks, unsigned
    )


def mac_stream_bytes(ds: Dataset, signature_index: int = 0) -> bytes:
    """The exact bytes an existing top-level signature covers (compare with dcmsign --dump)."""
    sig_item = ds.DigitalSignaturesSequence[signature_index]
    mac_item = next(p for p in ds.MACParametersSequence if p.MACIDNumber == sig_item.MACIDNumber)
    tags = _tag_list(mac_item.DataElementsSigned)
    sink = ByteCollector()
    writer = MacStreamWriter.for_dataset(sink, ds)
    _signature_stream(sink, ds, tags, _item_stream(sig_item, writer), writer)
    return sink.getvalue()
