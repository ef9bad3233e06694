"""The gate in front of the model: parse once, verify, validate, and hand over exactly that.

An upload is read from the request bytes once, and that one reading is what the signature
check sees and what the pixels come from, so nothing can change between check and use: the
common signed file is scanned (:mod:`medsec.integrity.signed_bytes`) and its dataset built
from the scan; anything else is read by pydicom and verified as that dataset. The signature is
verified on the elements as received (for compressed images, the encapsulated stream) before
any pixel is decoded; decoding then follows the model's input contract through
:mod:`medsec.imaging.pixels`, the path its training data took. Every refusal is a
:class:`Refusal` with an HTTP status, a short code and one line of reason (never a traceback).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field

import torch
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medsec.errors import MedsecError
from medsec.imaging.pixels import InputContract, dicom_image, resize_batch
from medsec.integrity import Status, TrustStore, VerificationResult, verify_dataset
from medsec.integrity.dicom_io import check_depth, sequence_room
from medsec.integrity.dicom_verify import verify_scanned
from medsec.integrity.mac_stream import TOO_DEEP, tag_str, tags_of
from medsec.integrity.signed_bytes import Scanned, scan
from medsec.service.config import MAC_STRENGTH, ImageRules

MAX_DIM = 4096  # rows/columns beyond this are refused before any pixel is decoded
_UNDEFINED = 0xFFFFFFFF
_INFLATE_IN, _INFLATE_OUT = 1 << 16, 1 << 18  # bounded chunks while measuring an inflation

# Signature failures -> (HTTP status, code). 403: a well-formed request for an image that is
# not authorised to reach the model. An unreadable structure inside the signature is 422.
_VERIFY_REFUSALS: dict[Status, tuple[int, str]] = {
    Status.MISSING: (403, "unsigned"),
    Status.INVALID: (403, "tampered"),
    Status.UNTRUSTED: (403, "untrusted_signer"),
    Status.PROFILE: (403, "signature_profile"),
    Status.UNREADABLE: (422, "corrupt"),
}


class Refusal(Exception):
    """A request the service declines: HTTP status, machine code, one-line reason."""

    def __init__(
        self,
        http_status: int,
        code: str,
        reason: str,
        verification: VerificationResult | None = None,
    ) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.code = code
        self.reason = " ".join(reason.split())  # one line, whatever the source said
        self.verification = verification
        self.sop_instance_uid: str | None = None  # set once the upload has parsed
        self.sop_class_uid: str | None = None


@dataclass(frozen=True)
class ImagePolicy:
    """The configured rules, bound to a trust store and the model's input shape;
    ``verify=False`` exists only for overhead measurements."""

    trust: TrustStore
    channels: int
    image_size: int
    rules: ImageRules = field(default_factory=ImageRules)
    max_inflated_bytes: int = 4 << 20
    verify: bool = True
    intensity: str = "stored"  # how stored values become [0, 1]: the model's input contract
    window: tuple[float, float] | None = None

    @property
    def contract(self) -> InputContract:
        """The model's input contract, as its checkpoint records it."""
        return InputContract(self.channels, self.image_size, self.intensity, self.window)


@dataclass(frozen=True)
class CheckedImage:
    """An accepted upload: its UID, the model input (1,C,H,W) and the verification verdict."""

    sop_instance_uid: str
    tensor: torch.Tensor
    verification: VerificationResult | None
    resized: bool
    sop_class_uid: str = ""
    dataset: Dataset | None = field(default=None, repr=False, compare=False)  # for the report


def _dataset_start(body: bytes) -> tuple[int, str | None]:
    """Offset where the dataset starts after the file meta group, and its transfer syntax.

    Read with pydicom's public preamble and dataset readers, stopping at the first element
    outside group 0002, so nothing after the meta (a Deflated dataset) is touched yet.
    """
    fp = io.BytesIO(body)
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, False, True, stop_when=lambda tag, *_: tag >> 16 != 2)
        syntax = meta.get("TransferSyntaxUID")
    except Exception as exc:  # untrusted bytes: any parser failure is the sender's problem
        reason = f"DICOM file meta cannot be parsed ({type(exc).__name__}: {exc!s:.100})"
        raise Refusal(422, "corrupt", reason) from exc
    return fp.tell(), None if syntax is None else str(syntax)


def _inflated_size(body: bytes, start: int, limit: int) -> int:
    """Size of the Deflated dataset after ``start``, measured in bounded chunks and refused
    (413) as soon as it passes ``limit``, so a zip bomb never inflates in memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 and pydicom
    view, pos, size = memoryview(body), start, 0
    try:
        while pos < len(body) and not inflater.eof:
            piece: bytes | memoryview = view[pos : pos + _INFLATE_IN]
            pos += len(piece)
            while piece and not inflater.eof:
                size += len(inflater.decompress(piece, _INFLATE_OUT))
                if size > limit:
                    raise Refusal(
                        413, "too_large", f"Deflated dataset inflates beyond {limit} bytes"
                    )
                piece = inflater.unconsumed_tail
    except zlib.error as exc:
        raise Refusal(422, "corrupt", f"Deflated dataset cannot be inflated ({exc})") from exc
    if not inflater.eof:
        raise Refusal(422, "truncated", "Deflated dataset ends before its deflate stream does")
    rest = inflater.unused_data + view[pos:].tobytes()
    if rest not in (b"", b"\0"):  # one null pads an odd-length stream, as pydicom writes it
        raise Refusal(422, "truncated", f"{len(rest)} byte(s) after the Deflated dataset")
    return size


def _parse(body: bytes, max_inflated: int) -> tuple[Dataset, Scanned | None]:
    """Parse the upload once; size and inflation limits are checked before pydicom runs. The
    common signed file is scanned and its dataset built from that scan (the scan is what the
    signatures are checked on); anything else is read by pydicom."""
    if not body:
        raise Refusal(400, "empty_body", "request body is empty; send a DICOM Part 10 file")
    if len(body) < 132 or body[128:132] != b"DICM":
        raise Refusal(415, "not_dicom", "body is not a DICOM Part 10 file (no DICM at byte 128)")
    start, syntax = _dataset_start(body)
    size = len(body)
    if syntax == DeflatedExplicitVRLittleEndian:  # element offsets count in the inflated data
        size = _inflated_size(body, start, max_inflated)
    scanned = scan(memoryview(body)) if syntax == ExplicitVRLittleEndian else None
    ds = _from_scan(scanned, body) if scanned is not None else None
    if ds is None:
        scanned = None
        try:
            ds = dcmread(io.BytesIO(body))
        except RecursionError as exc:  # nested past the room sequence_room gives pydicom
            raise Refusal(422, "too_deep", TOO_DEEP) from exc
        except Exception as exc:  # untrusted bytes: any parser failure is the sender's problem
            raise Refusal(422, "corrupt", f"DICOM cannot be parsed ({type(exc).__name__})") from exc
        _check_complete(ds, size)  # (a scan is complete by construction) raw, before converting
    try:
        check_depth(ds)  # as sign and verify do: nesting beyond the limit is refused
    except MedsecError as exc:
        raise Refusal(422, "too_deep", str(exc)) from exc
    return ds, scanned


def _from_scan(scanned: Scanned, body: bytes) -> Dataset | None:
    """The dataset built from the scan, or None (pydicom then reads the upload and decides)."""
    try:
        return scanned.dataset(io.BytesIO(body))
    except Exception:  # untrusted bytes: whatever pydicom raises here, dcmread raises again
        return None


def _check_complete(ds: Dataset, size: int) -> None:
    """pydicom accepts a file cut inside a value or a header; the gate must not."""
    end = None
    for tag in tags_of(ds):
        if tag >> 16 == 0xFFFE:  # pydicom reads it as an element it cannot convert
            raise Refusal(
                422, "corrupt", f"item or delimiter tag {tag_str(tag)} outside a sequence"
            )
        raw = ds.get_item(tag, keep_deferred=True)  # never converted: a bad VR would raise
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED:
            end = None
            continue
        if raw.value is not None and len(raw.value) < raw.length:
            raise Refusal(422, "truncated", f"DICOM truncated inside element {tag_str(tag)}")
        end = raw.value_tell + raw.length
    if end is not None and end != size:
        raise Refusal(422, "truncated", f"DICOM ends mid-element ({size - end} stray byte(s))")


def _verify(ds: Dataset, scanned: Scanned | None, policy: ImagePolicy) -> VerificationResult:
    rules = policy.rules
    checks = (rules.require_signature, rules.require_creator, rules.allow_unsigned_elements)
    if scanned is not None:  # the dataset was built from this scan
        result = verify_scanned(scanned, policy.trust, *checks)
    else:
        result = verify_dataset(ds, policy.trust, *checks)
    if not result.ok:
        status, code = _VERIFY_REFUSALS[result.status]
        raise Refusal(status, code, result.reason, result)
    floor = MAC_STRENGTH.index(rules.min_mac)
    for check in result.signatures:
        if MAC_STRENGTH.index(check.mac_algorithm) < floor:
            reason = f"{check.name} uses {check.mac_algorithm}, weaker than {rules.min_mac}"
            raise Refusal(403, "weak_hash", reason, result)
    return result


def _pixels(ds: Dataset, policy: ImagePolicy) -> tuple[torch.Tensor, bool]:
    modality = str(ds.get("Modality", "")).strip()
    if modality not in policy.rules.modalities:
        allowed = ", ".join(policy.rules.modalities)
        raise Refusal(
            422, "wrong_modality", f"modality {modality or 'absent'!r}; expected {allowed}"
        )
    if "PixelData" not in ds:
        raise Refusal(422, "bad_pixels", "no Pixel Data (7FE0,0010)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not isinstance(syntax, UID):  # absent, or read from another VR than UI: no UID
        raise Refusal(422, "bad_pixels", "no Transfer Syntax UID (UI) in the file meta")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise Refusal(422, "bad_pixels", f"image pixel module incomplete ({exc})") from exc
    # Bounded before decoding, so a small compressed stream cannot claim a huge image.
    if not (0 < rows <= MAX_DIM and 0 < cols <= MAX_DIM) or frames != 1:
        raise Refusal(
            422, "bad_pixels", f"{frames} frame(s) of {rows}x{cols}: one 2-D image expected"
        )
    if not syntax.is_encapsulated:
        expected = rows * cols * samples * ((int(ds.get("BitsAllocated", 8)) + 7) // 8)
        if len(ds.PixelData) not in (expected, expected + (expected & 1)):
            raise Refusal(
                422,
                "bad_pixels",
                f"Pixel Data holds {len(ds.PixelData)} bytes, expected {expected}",
            )
    contract = policy.contract
    try:
        image = dicom_image(ds, contract.intensity, contract.window)
    except MedsecError as exc:
        raise Refusal(422, "bad_pixels", str(exc)) from exc
    if image.shape[0] != contract.channels:
        raise Refusal(
            422, "wrong_shape", f"{image.shape[0]} channel(s); the model takes {contract.channels}"
        )
    size = contract.size
    if (rows, cols) != (size, size) and not policy.rules.resize:
        raise Refusal(422, "wrong_shape", f"image is {rows}x{cols}; the model takes {size}x{size}")
    x = torch.from_numpy(resize_batch(image[None], size))
    return x, (rows, cols) != (size, size)


def check_upload(body: bytes, policy: ImagePolicy) -> CheckedImage:
    """Parse, verify and validate one upload; raise :class:`Refusal` on the first failure.

    Runs with the same room for nested sequences as ``medsec sign`` and ``verify``, so the
    gate accepts what they accept (pydicom recurses once per level)."""
    try:
        with sequence_room():
            return _check_upload(body, policy)
    except MedsecError as exc:  # pydicom recursed past the room while verifying
        if str(exc) != TOO_DEEP:
            raise
        raise Refusal(422, "too_deep", str(exc)) from exc


def _check_upload(body: bytes, policy: ImagePolicy) -> CheckedImage:
    ds, scanned = _parse(body, policy.max_inflated_bytes)
    # The UID is read after verification: reading converts the element, and a converted
    # element costs the verifier a re-encoding.
    try:
        verification = _verify(ds, scanned, policy) if policy.verify else None
        tensor, resized = _pixels(ds, policy)
    except Refusal as refusal:
        refusal.sop_instance_uid = _uid(ds, "SOPInstanceUID")
        refusal.sop_class_uid = _uid(ds, "SOPClassUID")
        raise
    uids = _uid(ds, "SOPInstanceUID"), _uid(ds, "SOPClassUID")
    return CheckedImage(uids[0], tensor, verification, resized, uids[1], ds)


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID for the audit line, or "" where the element cannot even be converted (a
    corrupted VR makes pydicom raise on access: a refusal must not become a 500)."""
    try:
        return str(ds.get(keyword, ""))
    except Exception:  # pydicom raises NotImplementedError, ValueError, KeyError, ...
        return ""


# DICOM statuses for a refusal, shared by C-STORE (Status) and STOW-RS (Failure Reason):
# a verdict on the image is "Refused: Not Authorized" (PS3.7 C.4), the sender's limits
# "Refused: Out of Resources", anything else "Error: Cannot understand" (PS3.4 B.2.3).
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


def dicom_status(refusal: Refusal) -> int:
    """The DICOM failure status for a gate refusal."""
    if refusal.http_status == 403:
        return NOT_AUTHORIZED
    if refusal.http_status in (413, 429):
        return OUT_OF_RESOURCES
    return CANNOT_UNDERSTAND
