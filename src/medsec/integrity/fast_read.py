"""A direct reader of Explicit VR Little Endian files into a pydicom Dataset: every element of
defined length (sequences aside), tags ascending, nothing after the last element. The verifier
uses it for the files its byte path (:mod:`.signed_bytes`) leaves to pydicom's way (a
signature inside a sequence, VR UN, an odd length, ...); the byte path uses its File Meta check.

Why by hand: pydicom's ``dcmread`` spends ~0.7 ms on the 77 elements of a radiograph
(RG1_UNCI.dcm), 15% of hashing its 7 MB of pixels. This reader builds the same
``FileDataset`` of unconverted ``RawDataElement``s (same tags, VRs, lengths, offsets and
values; values longer than ``defer`` left in the file, as pydicom defers them) straight from
the mapped bytes. pydicom itself reads each undefined-length sequence, as dcmread does;
defined-length ones stay raw until used. Anything else - another transfer syntax, another
undefined length, an unknown VR, tags out of order or repeated, a cut header or value, stray
bytes at the end, a File Meta Group Length absent or wrong, a Transfer Syntax UID that is not
a UI - returns None: the caller reads the file with pydicom and checks what pydicom forgave.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

_HEAD = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<I")
_VRS = {vr.encode("ascii"): str(vr) for vr in VR}
_LONG = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def undefined_sequence(
    fp: BinaryIO, start: int, encoding: str | list[str]
) -> tuple[Sequence, int] | None:
    """An undefined-length sequence read by pydicom from ``start`` (as dcmread reads one), and
    where it ends; None unless it ends in a Sequence Delimitation Item."""
    fp.seek(start)
    try:
        seq = read_sequence(fp, False, True, _UNDEFINED, encoding)
    except Exception:  # untrusted bytes: whatever pydicom raises, dcmread decides
        return None
    stop = fp.tell()
    fp.seek(stop - 8)
    return (seq, stop) if fp.read(8) == _SEQ_END else None


def _elements(
    view: memoryview, pos: int, defer: int, fp: BinaryIO | None = None, group: int | None = None
) -> tuple[dict[BaseTag, RawDataElement | DataElement], int, str | list[str]] | None:
    """Elements from ``pos`` to the end (with ``group``: until the first element of another
    group), where reading stopped and the text encoding the elements set; None where pydicom
    must read. Undefined-length sequences are read by pydicom from ``fp`` (what ``view`` maps)."""
    elems: dict[BaseTag, RawDataElement | DataElement] = {}
    end, last = len(view), -1
    encoding: str | list[str] = default_encoding
    while pos < end:
        if pos + 8 > end:
            return None
        g, e, code, length = _HEAD.unpack_from(view, pos)
        if group is not None and g != group:
            break
        vr = _VRS.get(code)
        tag = g << 16 | e
        if vr is None or tag <= last or g == 0xFFFE:
            return None
        start = pos + 8
        if vr in _LONG:
            if start + 4 > end:
                return None
            (length,) = _LONG_LENGTH.unpack_from(view, start)
            start += 4
        last = tag
        if length == _UNDEFINED:
            read = undefined_sequence(fp, start, encoding) if vr == "SQ" and fp else None
            if read is None:
                return None
            elems[BaseTag(tag)] = DataElement(tag, vr, read[0], start, is_undefined_length=True)
            pos = read[1]
            continue
        if start + length > end:
            return None
        if length == 0:
            value = empty_value_for_VR(vr, raw=True)
        elif length > defer and tag != _CHARSET:  # as pydicom defers: read when used
            value = None
        else:
            value = bytes(view[start : start + length])
        if tag == _CHARSET:  # later sequences decode text with it, as in dcmread
            encoding = text_encoding(value)
        elems[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, start, False, True)
        pos = start + length
    return elems, pos, encoding


def explicit_le_meta(
    view: memoryview, defer: int = 1 << 16
) -> tuple[dict[BaseTag, RawDataElement], int] | None:
    """The File Meta elements of the file in ``view`` and where its dataset starts, or None
    unless they are well formed (group length right) and name Explicit VR Little Endian."""
    if len(view) < 132 or view[128:132] != b"DICM":
        return None
    meta = _elements(view, 132, defer, group=0x0002)
    if meta is None:
        return None
    meta_elems, pos, _ = meta
    group_length = meta_elems.get(BaseTag(0x00020000))
    if group_length is None or group_length.VR != "UL" or not isinstance(group_length.value, bytes):
        return None
    if len(group_length.value) != 4 or 144 + _LONG_LENGTH.unpack(group_length.value)[0] != pos:
        return None
    syntax = meta_elems.get(BaseTag(0x00020010))  # a UI, or pydicom reads no UID from it
    if syntax is None or syntax.VR != "UI" or not isinstance(syntax.value, bytes):
        return None
    if syntax.value.rstrip(b"\0 ") != ExplicitVRLittleEndian.encode("ascii"):
        return None
    return meta_elems, pos  # type: ignore[return-value]  # the meta group has no sequences


def read_explicit_le(view: memoryview, fp: BinaryIO, path: Path, defer: int) -> FileDataset | None:
    """The file in ``view`` (mapped from ``fp``, opened from ``path``) as pydicom reads it with
    ``defer_size=defer``, or None where this reader does not apply (see the module doc)."""
    meta = explicit_le_meta(view, defer)
    if meta is None:
        return None
    meta_elems, pos = meta
    body = _elements(view, pos, defer, fp)
    if body is None or body[1] != len(view):
        return None
    elems, _, encoding = body  # the text encoding as read_dataset sets it
    return file_dataset(view, meta_elems, elems, encoding, str(path))


def text_encoding(charset: bytes | None) -> str | list[str]:
    """The text encoding a raw Specific Character Set value sets, as pydicom's reader sets it
    for the sequences that follow."""
    return convert_encodings(convert_string(charset or b"", True))


def file_dataset(
    view: memoryview,
    meta: dict[BaseTag, RawDataElement],
    elems: dict[BaseTag, RawDataElement | DataElement],
    encoding: str | list[str],
    name: str,
) -> FileDataset:
    """The FileDataset dcmread makes of these File Meta and dataset elements of ``view``."""
    dataset = Dataset(elems)
    dataset.set_original_encoding(False, True, encoding)
    ds = FileDataset(name, dataset, bytes(view[:128]), FileMetaDataset(meta), False)
    ds.set_original_encoding(False, True, dataset._character_set)  # as dcmread: converts it
    return ds
