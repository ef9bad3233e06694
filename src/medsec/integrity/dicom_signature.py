"""Create DICOM PS3.15 digital signatures (Base and Creator RSA profiles; EC too).

Layout (PS3.3 C.12.1.1.3): a MAC Parameters Sequence (4FFE,0001) item says which elements are
covered and with which hash; a Digital Signatures Sequence (FFFA,FFFA) item with the same MAC
ID Number holds the signature, its UID and time, and the signer's X.509 certificate. Both sit in
the dataset (or sequence item) whose elements they cover. The hashed stream is the one DCMTK's
dcmsign builds (see :mod:`medsec.integrity.mac_stream`), so signatures interoperate both ways.

A file to sign is read and checked exactly as a verifier reads it (:mod:`.dicom_io`), so
nothing is sealed that a verifier would refuse. Verification: :mod:`.dicom_verify`.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from medsec.errors import MedsecError
from medsec.integrity.crypto import WEAK_MACS, dicom_mac_name, new_hash, sign_digest
from medsec.integrity.dicom_io import (
    UNTRUSTED_DATA_ERRORS,
    check_depth,
    dataset_bytes,
    read_dicom,
    sequence_room,
    write_new,
)
from medsec.integrity.keys import PrivateKey, load_certificate, load_private_key
from medsec.integrity.mac_stream import (
    DIGITAL_SIGNATURES_SEQUENCE,
    MAC_PARAMETERS_SEQUENCE,
    ByteCollector,
    MacStreamWriter,
    Sink,
    default_signed_tags,
    item_stream,
    mac_transfer_syntax,
    tag_str,
    tags_of,
)

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


def creator_required(tag: int) -> bool:
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
    trust_note: str | None = None  # e.g. an X.509 v1 signer certificate, accepted

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

    @property
    def warnings(self) -> list[str]:
        """What a user should know although the signatures verify: weak MACs, v1 signers."""
        out = []
        for c in self.signatures:
            if c.valid and c.mac_algorithm in WEAK_MACS:
                out.append(
                    f"{c.name} uses {c.mac_algorithm}: {WEAK_MACS[c.mac_algorithm]}; "
                    "have the source re-sign with SHA-256 or better"
                )
            if c.trust_note:
                out.append(f"{c.name}: {c.trust_note}")
        return out


# ----------------------------------------------------------------------------- signing


def _now_dt() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%d%H%M%S.%f") + "+0000"


def signature_stream(
    sink: Sink, level: Dataset, tags: list[int], item_stream: bytes, writer: MacStreamWriter
) -> None:
    """Feed the MAC input: the signed elements, then the signature item's (``item_stream``)."""
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
    Data pydicom cannot encode is a MedsecError, as it is a failed check for a verifier.
    """
    try:
        with sequence_room():
            return _sign(ds, key_path, cert_path, profile, mac, tags)
    except UNTRUSTED_DATA_ERRORS as exc:
        raise MedsecError(f"cannot sign: corrupt DICOM data ({exc})") from exc


def _sign(
    ds: Dataset,
    key_path: Path,
    cert_path: Path,
    profile: str,
    mac: str,
    tags: list[int] | None,
) -> Dataset:
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
    check_depth(ds)
    signed = sorted(tags) if tags is not None else default_signed_tags(ds)
    if not signed:
        raise MedsecError("nothing to sign: the dataset has no signable elements")
    missing = [t for t in signed if t not in ds]
    if missing:
        raise MedsecError(f"cannot sign absent element {tag_str(missing[0])}")
    if profile == "creator":
        uncovered = [t for t in tags_of(ds) if creator_required(t) and t not in signed]
        if uncovered:
            raise MedsecError(f"creator profile must cover {tag_str(uncovered[0])}")

    params = ds.get(MAC_PARAMETERS_SEQUENCE)
    used = {int(item.MACIDNumber) for item in params.value} if params is not None else set()
    mac_id = min(set(range(len(used) + 1)) - used)

    mac_item = Dataset()
    mac_item.MACIDNumber = mac_id
    mac_item.MACCalculationTransferSyntaxUID = mac_transfer_syntax(ds)
    mac_item.MACAlgorithm = mac_name
    mac_item.DataElementsSigned = signed

    sig_item = Dataset()
    sig_item.MACIDNumber = mac_id
    sig_item.DigitalSignatureUID = generate_uid()
    sig_item.DigitalSignatureDateTime = _now_dt()
    sig_item.CertificateType = CERTIFICATE_TYPE

    digest = new_hash(mac_name)
    writer = MacStreamWriter.for_dataset(digest, ds)
    signature_stream(digest, ds, signed, item_stream(sig_item, writer), writer)
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


def sign_file(
    in_path: Path,
    out_path: Path,
    key_path: Path,
    cert_path: Path,
    profile: str = "creator",
    mac: str = "sha256",
    overwrite: bool = False,
) -> Path:
    """Sign a DICOM file into ``out_path`` (never the input itself); returns ``out_path``.

    The input is read and checked as :func:`~medsec.integrity.verify_dataset` reads a file, so
    a truncated or otherwise malformed file is refused rather than sealed.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.resolve() == in_path.resolve():
        raise MedsecError("output must differ from the input; inputs are never overwritten")
    ds = read_dicom(in_path)
    sign_dataset(ds, key_path, cert_path, profile=profile, mac=mac)
    try:
        data = dataset_bytes(ds)
    except UNTRUSTED_DATA_ERRORS as exc:
        raise MedsecError(f"{in_path}: cannot be written back ({exc})") from exc
    write_new(out_path, data, overwrite=overwrite)
    return out_path


def tag_list(value: object) -> list[int]:
    """An AT value (one tag, several, or absent) as a list of ints."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list):
        return [int(t) for t in value]
    return [int(value)]  # type: ignore[call-overload]


def mac_stream_bytes(ds: Dataset, signature_index: int = 0) -> bytes:
    """The exact bytes an existing top-level signature covers (compare with dcmsign --dump)."""
    sig_item = ds.DigitalSignaturesSequence[signature_index]
    mac_item = next(p for p in ds.MACParametersSequence if p.MACIDNumber == sig_item.MACIDNumber)
    tags = tag_list(mac_item.DataElementsSigned)
    sink = ByteCollector()
    writer = MacStreamWriter.for_dataset(sink, ds)
    signature_stream(sink, ds, tags, item_stream(sig_item, writer), writer)
    return sink.getvalue()
