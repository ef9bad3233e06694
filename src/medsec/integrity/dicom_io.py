"""Reading DICOM input for signing and for verifying, with one well-formedness check for both.

A signer must refuse what a verifier would refuse: a file cut inside a value, stray bytes after
the last element, a delimiter outside a sequence, or sequences nested deeper than
:data:`MAX_SEQUENCE_DEPTH`. pydicom tolerates the first three (it reads a cut value short and
drops a partial element at the end; DCMTK reports "premature end of stream").

Nesting: PS3.5 sets no limit. pydicom reads and writes nested sequences recursively (about five
Python frames per level), so the interpreter's default limit of 1000 frames stops it near 200
levels with a RecursionError. :func:`sequence_room` raises the limit while medsec works, enough
for :data:`MAX_SEQUENCE_DEPTH` levels; anything deeper is a one-line error. (DCMTK 3.6.7, measured:
signs and verifies 5000 levels, crashes with a stack overflow at 10000; real files nest a few
levels.) medsec's own traversals are iterative (:func:`medsec.integrity.mac_stream.walk`).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medsec.errors import MedsecError
from medsec.integrity.mac_stream import MAX_SEQUENCE_DEPTH, TOO_DEEP, tag_str, tags_of, walk
from medsec.utils import atomic_write_bytes

_UNDEFINED = 0xFFFFFFFF
# Python frames per nesting level in pydicom's recursive reader (5) and writer (4), plus room for
# the caller's own stack (a test runner or a web server thread).
_RECURSION_LIMIT = 6 * MAX_SEQUENCE_DEPTH + 2000

# What pydicom may raise on untrusted bytes, while reading or when an element is converted.
UNTRUSTED_DATA_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    LookupError,
    NotImplementedError,
    OverflowError,
    struct.error,
    zlib.error,
)


class _RecursionRoom:
    """Raise the recursion limit while any thread needs it; restore it when the last one ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getrecursionlimit()
                sys.setrecursionlimit(max(self._saved, _RECURSION_LIMIT))
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setrecursionlimit(self._saved)


_ROOM = _RecursionRoom()


@contextmanager
def sequence_room() -> Iterator[None]:
    """Room for pydicom's recursion up to the depth limit; deeper input is a MedsecError."""
    _ROOM.enter()
    try:
        yield
    except RecursionError:
        raise MedsecError(TOO_DEEP) from None
    finally:
        _ROOM.leave()


def is_deflated(ds: Dataset) -> bool:
    """Deflated Explicit VR Little Endian: offsets count inflated bytes, nothing is deferred."""
    meta = getattr(ds, "file_meta", None)
    return meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def check_depth(ds: Dataset) -> None:
    """Refuse sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH` (checked iteratively)."""
    for _ in walk(ds):
        pass


def check_well_formed(ds: Dataset, path: Path, size: int, tail: bytes) -> None:
    """Refuse a file pydicom read leniently: a value cut short, stray bytes at the end, or a
    delimiter tag at the top level. ``size`` is the file's size, ``tail`` its last 8 bytes.
    """
    tags = tags_of(ds)
    for tag in tags:
        if tag >> 16 == 0xFFFE:
            raise MedsecError(f"{path}: item or delimiter tag {tag_str(tag)} outside a sequence")
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED:
            continue
        have = len(raw.value) if raw.value is not None else size - raw.value_tell
        if have < raw.length:
            raise MedsecError(f"{path}: file truncated in element {tag_str(tag)}")
    start = _dataset_start(ds)
    if start is not None and size < start:
        raise MedsecError(f"{path}: file truncated inside the file meta information")
    if is_deflated(ds):  # a deflated file's offsets count inflated bytes
        return
    if not tags:  # pydicom returns an empty dataset when a read ends in EOFError
        if start is not None and size > start:
            raise MedsecError(f"{path}: no element readable after the file meta (truncated?)")
        return
    last = ds.get_item(tags[-1], keep_deferred=True)
    if isinstance(last, RawDataElement) and last.length != _UNDEFINED:
        stray = size - (last.value_tell + last.length)
        if stray:
            raise MedsecError(f"{path}: {stray} stray byte(s) after the last element")
        return
    # An undefined length ends with the sequence delimiter: the file's last 8 bytes.
    little = ds.is_little_endian is not False
    delimiter = (b"\xfe\xff\xdd\xe0" if little else b"\xff\xfe\xe0\xdd") + bytes(4)
    if tail != delimiter:
        raise MedsecError(
            f"{path}: stray bytes after, or a cut inside, the last element {tag_str(tags[-1])}"
        )


def _dataset_start(ds: Dataset) -> int | None:
    """Offset of the dataset in its file: 0 without a preamble, else after the file meta
    (whose (0002,0000) element is 12 bytes); None when the meta has no group length.
    """
    if getattr(ds, "preamble", None) is None:
        return 0
    length = ds.file_meta.get("FileMetaInformationGroupLength")
    return None if length is None else 132 + 12 + int(length)


def read_dicom(path: Path) -> Dataset:
    """Read a whole DICOM file (Part 10 or bare dataset) for signing, checked as a verifier
    checks it; unreadable or malformed input is a MedsecError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh, sequence_room():
            ds = dcmread(fh)
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(size - 8, 0))
            check_well_formed(ds, path, size, fh.read(8))
            check_depth(ds)
    except OSError as exc:
        raise MedsecError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UNTRUSTED_DATA_ERRORS as exc:
        raise MedsecError(f"{path}: not a readable DICOM file ({exc})") from exc
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """Encode ``ds`` as a file in its original encoding (what pydicom would write)."""
    buf = io.BytesIO()
    with sequence_room():
        ds.save_as(buf, enforce_file_format=getattr(ds, "file_meta", None) is not None)
    return buf.getvalue()


def write_new(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Atomic write that refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedsecError(f"{path} already exists; refusing to overwrite it (use --force)")
    atomic_write_bytes(path, data)


def _text(value: bytes) -> str | None:
    if b"\\" in value:  # several values: pydicom's MultiValue
        return None
    try:
        return value.rstrip(b" \0").decode("ascii")
    except UnicodeDecodeError:
        return None


# Raw little-endian bytes -> value, for the VRs a signature item uses; None = let pydicom do it.
_QUICK: dict[str, Callable[[bytes], object]] = {
    "US": lambda b: struct.unpack("<H", b)[0] if len(b) == 2 else None,
    "AT": lambda b: (
        [g << 16 | e for g, e in struct.iter_unpack("<HH", b)] or None if len(b) % 4 == 0 else None
    ),
    "OB": bytes,
    "UI": _text,
    "CS": _text,
    "DT": _text,
}


def quick_decode(vr: str, raw: bytes) -> object:
    """A small value decoded straight from its little-endian bytes, or None where pydicom must
    convert it (an unusual VR, multi-valued text, an odd size)."""
    decode = _QUICK.get(vr)
    return decode(raw) if decode is not None else None


def quick_value(ds: Dataset, tag: int) -> object:
    """An element's value (None when absent), decoded straight from its raw bytes where that
    is simple: a signature check reads a dozen small values, and pydicom's conversion of each
    costs several times the rest of verifying a small image. AT values come back as a list of
    ints; anything unusual (multi-valued text, odd sizes, big endian) goes through pydicom."""
    raw = ds.get_item(tag, keep_deferred=True)
    if raw is None:
        return None
    if isinstance(raw, RawDataElement) and raw.value and raw.is_little_endian:
        value = quick_decode(raw.VR or "", raw.value)
        if value is not None:
            return value
    return ds[tag].value
