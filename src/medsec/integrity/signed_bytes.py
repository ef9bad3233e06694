"""The common signed file checked straight from its bytes, with no pydicom Dataset.

In an Explicit VR Little Endian file, a defined-length element (header and value) is byte for
byte what the MAC stream of PS3.15 C.1 holds for it, so a run of signed elements is hashed as one
slice of the received buffer, never copied. Only sequences differ (the stream drops their
lengths and item delimiters); they are re-encoded from the bytes, as small as they are.

Why by hand: building and walking pydicom's Dataset costs ~1.6 ms per verification of a
radiograph (RG1_UNCI.dcm), a third of hashing its 7 MB of pixels, where the target is 1.3x that
hash. No library encodes DICOM's MAC stream.

This reader takes only what it reads exactly as pydicom and DCMTK do: well-formed File Meta
naming Explicit VR Little Endian (:func:`~medsec.integrity.fast_read.explicit_le_meta`), tags
strictly ascending at every level, every value inside the file and of even length, a long VR's
reserved bytes zero, signatures at the top level only, the file ending where its last element
does. Anything else (another transfer syntax, a nested signature, VR UN, an odd length, a
sequence in a signature item, nesting deeper than 16 levels, a small value pydicom must convert)
returns None, and the verifier reads the file with pydicom. Tests compare both ways.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import FileDataset
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from medsec.integrity.dicom_io import quick_decode
from medsec.integrity.fast_read import (
    explicit_le_meta,
    file_dataset,
    text_encoding,
    undefined_sequence,
)
from medsec.integrity.levels import SignatureItem, Values
from medsec.integrity.mac_stream import (
    DIGITAL_SIGNATURES_SEQUENCE,
    ITEM_TAG,
    MAC_PARAMETERS_SEQUENCE,
    SEQ_DELIMITER,
    UNHASHED_SIGNATURE_ELEMENTS,
    Sink,
)

_HEAD = struct.Struct("<HH2sH")
_ITEM_HEAD = struct.Struct("<HHI")
_U32 = struct.Struct("<I")
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 16
# Every VR but UN (which pydicom may read as another VR, or as a sequence), and whether its
# length takes 4 bytes after 2 reserved ones.
_VRS = {str(vr).encode("ascii"): (str(vr), vr in EXPLICIT_VR_LENGTH_32) for vr in VR if vr != VR.UN}
# The values a check reads from each kind of item.
_SIGNATURE_TAGS = (0x04000005, 0x04000100, 0x04000105, 0x04000110, 0x04000115, 0x04000120)
_MAC_TAGS = (0x04000005, 0x04000010, 0x04000015, 0x04000020)
_NO_VR = (None, False)
_CHARSET = 0x00080005
_SIGNATURE_SEQUENCES = frozenset({DIGITAL_SIGNATURES_SEQUENCE, MAC_PARAMETERS_SEQUENCE})


class _Decline(Exception):
    """Not read exactly here: pydicom reads the file."""


class Element(NamedTuple):
    """Where an element stands in the buffer (a tuple: ~100 are made per file)."""

    vr: str
    start: int  # of the header
    value: int  # of the value
    stop: int  # end of the value


@dataclass(frozen=True)
class Scanned:
    """A scanned file: its File Meta, its top-level elements (ascending), the MAC encoding of
    its sequences, and its signature level (none without a Digital Signatures Sequence)."""

    view: memoryview
    meta: dict[BaseTag, RawDataElement]
    elements: dict[int, Element]
    sequences: dict[int, bytes]
    levels: list[BytesLevel]

    def tags(self) -> list[int]:
        return list(self.elements)

    def dataset(self, fp: BinaryIO, name: str = "") -> FileDataset | None:
        """The file as dcmread reads it (nothing deferred), built from this scan, so what is
        verified and what is used are one reading: raw elements as read, undefined-length
        sequences read by pydicom from ``fp`` (a file object over the scanned bytes),
        defined-length ones raw until used. None where pydicom reads a sequence otherwise."""
        view = self.view
        elems: dict[BaseTag, RawDataElement | DataElement] = {}
        encoding: str | list[str] = default_encoding
        for tag, (vr, _, at, stop) in self.elements.items():
            key = BaseTag(tag)
            if vr == "SQ" and _U32.unpack_from(view, at - 4)[0] == _UNDEFINED:
                read = undefined_sequence(fp, at, encoding)
                if read is None or read[1] != stop:
                    return None
                elems[key] = DataElement(key, vr, read[0], at, is_undefined_length=True)
                continue
            value = bytes(view[at:stop]) if stop > at else empty_value_for_VR(vr, raw=True)
            if tag == _CHARSET:  # later sequences decode text with it, as in dcmread
                encoding = text_encoding(value)
            elems[key] = RawDataElement(key, vr, stop - at, value, at, False, True)
        return file_dataset(view, self.meta, elems, encoding, name)


class BytesLevel:
    """The top level of a scanned file, read as :class:`~medsec.integrity.levels.Level`."""

    location = "top level"

    def __init__(
        self,
        view: memoryview,
        elements: dict[int, Element],
        sequences: dict[int, bytes],
        mac: list[Values],
        signatures: list[SignatureItem],
    ):
        self._view, self._elements, self._sequences = view, elements, sequences
        self._mac, self._signatures = mac, signatures

    def tags(self) -> list[int]:
        return list(self._elements)

    def mac_syntax(self) -> str:
        return ExplicitVRLittleEndian

    def mac_items(self) -> list[Values]:
        return self._mac

    def signatures(self) -> list[SignatureItem]:
        return self._signatures

    def feed(self, sink: Sink, tags: list[int]) -> None:
        """Adjacent elements go to the hash as one slice of the buffer; sequences re-encoded."""
        view, elements, sequences = self._view, self._elements, self._sequences
        start = stop = -1
        for tag in tags:
            el = elements[tag]
            encoded = sequences.get(tag)
            if encoded is None and el.start == stop:
                stop = el.stop
                continue
            if stop > start:
                sink.update(view[start:stop])
            start, stop = (-1, -1) if encoded is not None else (el.start, el.stop)
            if encoded is not None:
                sink.update(encoded)
        if stop > start:
            sink.update(view[start:stop])


def scan(view: memoryview) -> Scanned | None:
    """The file in ``view`` read for verification, or None where pydicom must read it."""
    meta = explicit_le_meta(view, len(view))  # nothing deferred
    if meta is None:
        return None
    try:
        return _scan(view, *meta)
    except (_Decline, struct.error):
        return None


def _scan(view: memoryview, meta: dict[BaseTag, RawDataElement], pos: int) -> Scanned:
    end, last = len(view), -1
    elements: dict[int, Element] = {}
    sequences: dict[int, bytes] = {}
    items: dict[int, list[dict[int, Element]]] = {}
    while pos < end:
        tag, el = _head(view, pos, end)
        if tag <= last:
            raise _Decline
        last = tag
        if el.vr == "SQ":
            out: list[bytes | memoryview] = [bytes(view[pos : pos + 6]) + b"\0\0"]
            items[tag], stop = _items(view, el.value, el.stop, end, 1, out)
            out.append(SEQ_DELIMITER)
            sequences[tag] = b"".join(out)
            el = el._replace(stop=stop)
        elements[tag] = el
        pos = el.stop
    if any(tag in elements and tag not in items for tag in _SIGNATURE_SEQUENCES):
        raise _Decline  # a signature sequence element that is not a sequence: pydicom's way
    levels = []
    if DIGITAL_SIGNATURES_SEQUENCE in items:  # read now: what cannot be read declines the scan
        mac = [_values(view, i, _MAC_TAGS) for i in items.get(MAC_PARAMETERS_SEQUENCE, [])]
        signatures = [
            SignatureItem(_values(view, i, _SIGNATURE_TAGS), _own(view, i))
            for i in items[DIGITAL_SIGNATURES_SEQUENCE]
        ]
        levels.append(BytesLevel(view, elements, sequences, mac, signatures))
    return Scanned(view, meta, elements, sequences, levels)


def _head(view: memoryview, pos: int, end: int) -> tuple[int, Element]:
    """The tag and place of the element at ``pos``; for a sequence, ``stop`` holds its value
    length (maybe undefined) until its items are read."""
    if pos + 8 > end:
        raise _Decline
    group, element, code, length = _HEAD.unpack_from(view, pos)
    vr, long = _VRS.get(code, _NO_VR)
    if vr is None or group == 0xFFFE:
        raise _Decline
    start = pos + 8
    if long:
        if length != 0 or start + 4 > end:  # the reserved bytes, hashed as zero
            raise _Decline
        (length,) = _U32.unpack_from(view, start)
        start += 4
    if vr == "SQ":
        return group << 16 | element, Element(vr, pos, start, length)
    if length == _UNDEFINED or length & 1 or start + length > end:
        raise _Decline
    return group << 16 | element, Element(vr, pos, start, start + length)


def _items(
    view: memoryview, pos: int, length: int, limit: int, depth: int, out: list[bytes | memoryview]
) -> tuple[list[dict[int, Element]], int]:
    """The items of the sequence whose value starts at ``pos`` and ends by ``limit`` (their
    elements, by tag), and where it ends; their MAC encoding is appended to ``out``."""
    if depth > _MAX_DEPTH:
        raise _Decline
    end = limit if length == _UNDEFINED else pos + length
    if end > limit:
        raise _Decline
    found = []
    while length == _UNDEFINED or pos < end:
        if pos + 8 > end:
            raise _Decline
        group, element, size = _ITEM_HEAD.unpack_from(view, pos)
        tag, pos = group << 16 | element, pos + 8
        if tag == _SEQ_END and length == _UNDEFINED and size == 0:
            return found, pos
        if tag != _ITEM:
            raise _Decline
        out.append(ITEM_TAG)
        if size == _UNDEFINED:
            elems, pos = _body(view, pos, end, True, depth, out)
        elif pos + size > end:
            raise _Decline
        else:
            elems, pos = _body(view, pos, pos + size, False, depth, out)
        found.append(elems)
    return found, pos


def _body(
    view: memoryview,
    pos: int,
    end: int,
    delimited: bool,
    depth: int,
    out: list[bytes | memoryview],
) -> tuple[dict[int, Element], int]:
    """The elements of one item, to ``end`` or (``delimited``) to its Item Delimitation Item."""
    elems: dict[int, Element] = {}
    last = -1
    while delimited or pos < end:
        if delimited and pos + 8 <= end:
            group, element, size = _ITEM_HEAD.unpack_from(view, pos)
            if group << 16 | element == _ITEM_END:
                if size != 0:
                    raise _Decline
                return elems, pos + 8
        tag, el = _head(view, pos, end)
        if tag <= last or tag in _SIGNATURE_SEQUENCES:  # a nested signature: pydicom's way
            raise _Decline
        last = tag
        if el.vr == "SQ":
            out.append(bytes(view[pos : pos + 6]) + b"\0\0")
            _, stop = _items(view, el.value, el.stop, end, depth + 1, out)
            out.append(SEQ_DELIMITER)
            el = el._replace(stop=stop)
        else:
            out.append(view[pos : el.stop])
        elems[tag] = el
        pos = el.stop
    return elems, pos


def _values(view: memoryview, item: dict[int, Element], tags: tuple[int, ...]) -> Values:
    """The check's values of an item, decoded as quick_value decodes them (empty = absent)."""
    values: dict[int, object] = {}
    for tag in tags:
        el = item.get(tag)
        if el is None:
            continue
        if el.vr == "SQ":  # pydicom's way cannot read a value from it either: it decides
            raise _Decline
        if el.stop == el.value:  # empty: absent, as quick_value's caller sees it
            continue
        if (value := quick_decode(el.vr, bytes(view[el.value : el.stop]))) is None:
            raise _Decline
        values[tag] = value
    return values.get


def _own(view: memoryview, item: dict[int, Element]) -> bytes:
    """A flat signature item's hashed elements: their bytes as they stand in the file."""
    if any(el.vr == "SQ" for el in item.values()):
        raise _Decline
    return b"".join(
        view[el.start : el.stop] for t, el in item.items() if t not in UNHASHED_SIGNATURE_ELEMENTS
    )
