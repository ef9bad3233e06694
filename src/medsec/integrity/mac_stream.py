"""The byte stream a DICOM digital signature covers (PS3.15 C.1), exactly as DCMTK builds it.

Elements are encoded in Explicit VR Little Endian. Sequences and encapsulated pixel data carry
no lengths: ``tag 'SQ' 00 00``, each item as ``FE FF 00 E0`` plus its elements (no item
delimiter), then ``FE FF DD E0``. Values read from a little-endian file are fed to the hash as
the very bytes pydicom read (no re-encoding, no copy of the pixel buffer); anything else goes
through pydicom's element writer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from io import BytesIO
from typing import Protocol

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medsec.errors import MedsecError

ITEM_TAG = b"\xfe\xff\x00\xe0"
SEQ_DELIMITER = b"\xfe\xff\xdd\xe0"
PIXEL_DATA = 0x7FE00010
MAC_PARAMETERS_SEQUENCE = 0x4FFE0001
DIGITAL_SIGNATURES_SEQUENCE = 0xFFFAFFFA
# Signature-item elements that are not part of the MAC (PS3.15 C.1): certificate, signature
# and the certified timestamp, which are added after the MAC is computed.
UNHASHED_SIGNATURE_ELEMENTS = frozenset({0x04000115, 0x04000120, 0x04000305, 0x04000310})

_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_AMBIGUOUS_VRS = frozenset({"US or SS", "US or OW", "US or SS or OW", "OB or OW"})
_SHORT_HEAD = struct.Struct("<HH2sH")
_LONG_HEAD = struct.Struct("<HH2sHI")
# Deepest sequence nesting medsec signs or verifies (see :mod:`medsec.integrity.dicom_io`).
MAX_SEQUENCE_DEPTH = 1000
TOO_DEEP = f"DICOM sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels (medsec's limit)"


class Sink(Protocol):
    """Anything with ``update(bytes)``: a hashlib object, or a collector for ``--dump``."""

    def update(self, data: bytes | memoryview, /) -> None: ...


class ByteCollector:
    """A sink that keeps the stream, to compare with ``dcmsign --dump`` byte for byte."""

    def __init__(self) -> None:
        self._buf = BytesIO()

    def update(self, data: bytes | memoryview, /) -> None:
        self._buf.write(data)

    def getvalue(self) -> bytes:
        return self._buf.getvalue()


def is_signable(tag: int) -> bool:
    """Whether a tag may appear in Data Elements Signed (PS3.15 C.1; DCMTK isSignableTag)."""
    group, element = tag >> 16, tag & 0xFFFF
    return not (
        element == 0
        or tag == 0x00080001
        or group < 0x0008
        or group == 0xFFFA
        or tag in (MAC_PARAMETERS_SEQUENCE, 0xFFFCFFFC, 0xFFFEE00D, 0xFFFEE0DD)
    )


def tags_of(ds: Dataset) -> list[int]:
    """The tags of ``ds`` in ascending order, without converting any element.

    (Iterating a pydicom Dataset yields converted elements, and ``keys()`` keeps insertion
    order, which differs from tag order for elements added in memory.)
    """
    return sorted(map(int, ds.keys()))


def elements_of(ds: Dataset) -> dict[int, DataElement | RawDataElement]:
    """The elements of ``ds`` by int tag, none converted (lookups by int skip pydicom's Tag())."""
    return {int(tag): elem for tag, elem in ds.items()}


def vr_of(ds: Dataset, tag: int, elem: DataElement | RawDataElement | None = None) -> str:
    """The element's VR, with implicit-VR and ambiguous VRs resolved as pydicom resolves them;
    ``elem``, when given, is the element as :func:`elements_of` holds it."""
    raw = elem if elem is not None else ds.get_item(tag, keep_deferred=True)
    vr = raw.VR if raw is not None else None
    if vr is None or vr in _AMBIGUOUS_VRS:
        vr = ds[tag].VR
    return vr


def walk(ds: Dataset, skip: frozenset[int] = frozenset()) -> Iterator[tuple[str, Dataset]]:
    """``ds`` and every sequence item in it, depth first in document order, with its path.

    Iterative, so depth costs no Python stack; sequences in ``skip`` are not entered. Nesting
    deeper than :data:`MAX_SEQUENCE_DEPTH` raises MedsecError (pydicom itself recurses).
    """
    stack: list[tuple[str, Dataset, int]] = [("", ds, 0)]
    while stack:
        path, level, depth = stack.pop()
        yield path, level
        children = []
        for tag, elem in sorted(elements_of(level).items()):
            if tag in skip or vr_of(level, tag, elem) != "SQ":
                continue
            if depth == MAX_SEQUENCE_DEPTH:
                raise MedsecError(TOO_DEEP)
            for i, item in enumerate(level[tag].value):
                children.append((f"{path}{tag_str(tag)}[{i}]", item, depth + 1))
        stack.extend(reversed(children))


def contains_un(ds: Dataset) -> bool:
    """Whether any element of ``ds``, at any depth, has VR UN (DCMTK never signs those)."""
    return any(vr_of(level, tag) == "UN" for _, level in walk(ds) for tag in tags_of(level))


def default_signed_tags(ds: Dataset) -> list[int]:
    """'Sign everything' at this level: signable tags, minus UN and sequences holding UN."""
    tags = []
    for tag in tags_of(ds):
        if not is_signable(tag):
            continue
        vr = vr_of(ds, tag)
        if vr == "UN" or (vr == "SQ" and any(contains_un(item) for item in ds[tag].value)):
            continue
        tags.append(tag)
    return tags


def _header(tag: int, vr: str, length: int | None) -> bytes:
    """Explicit VR LE element header; ``length=None`` leaves the length out (SQ, pixel SQ)."""
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode("ascii"))
    if length is None:
        return head + b"\x00\x00"
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, length)
    return head + struct.pack("<H", length)


def _fragments(value: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """The items of an encapsulated pixel data value (offset table first), as zero-copy views."""
    view = memoryview(value)
    pos, end = 0, len(view)
    while pos + 8 <= end:
        tag = bytes(view[pos : pos + 4])
        (length,) = struct.unpack_from("<I", view, pos + 4)
        if tag == SEQ_DELIMITER:
            return
        if tag != ITEM_TAG or pos + 8 + length > end:
            raise ValueError("malformed encapsulated pixel data")
        yield view[pos + 8 : pos + 8 + length]
        pos += 8 + length
    if pos != end:
        raise ValueError("malformed encapsulated pixel data")


class MacStreamWriter:
    """Encodes elements of a dataset (recursively) into a sink in DCMTK's signature format.

    Small pieces are gathered in a buffer so the hash sees few, large updates; big values go
    to the hash directly. ``source`` is the mapped file a dataset was read from with deferred
    values: those are hashed straight from the page cache, never copied.
    """

    _DIRECT = 1 << 14  # values at least this long bypass the buffer

    def __init__(self, sink: Sink, encodings: list[str], source: memoryview | None = None):
        self.sink = sink
        self.encodings = encodings
        self.source = source
        self._buf = bytearray()

    @classmethod
    def for_dataset(
        cls, sink: Sink, ds: Dataset, source: memoryview | None = None
    ) -> MacStreamWriter:
        """A writer using ``ds``'s character set for any value that must be re-encoded."""
        charset = ds.get("SpecificCharacterSet") if "SpecificCharacterSet" in ds else None
        return cls(sink, convert_encodings(charset), source)

    def _emit(self, data: bytes | memoryview) -> None:
        if len(data) >= self._DIRECT:
            self.flush()
            self.sink.update(data)
        else:
            self._buf += data

    def write_bytes(self, data: bytes | memoryview) -> None:
        """Bytes already in signature format (e.g. an item encoded ahead of time)."""
        self._emit(data)

    def flush(self) -> None:
        """Hand buffered bytes to the sink; call once all elements are written."""
        if self._buf:
            self.sink.update(self._buf)
            self._buf = bytearray()

    def write_elements(self, ds: Dataset, tags: Iterable[int]) -> None:
        """Write the given elements of ``ds`` in ascending tag order; all must be present."""
        elems = elements_of(ds)
        for tag in sorted(tags):
            raw = elems.get(tag)
            if not (isinstance(raw, RawDataElement) and self._write_raw(raw)):
                self.write_element(ds, tag)

    def _write_raw(self, raw: RawDataElement) -> bool:
        """The common case in few steps: a little-endian element as read, with its VR known,
        not a sequence, of even defined length. False (nothing written) for anything else."""
        vr = raw.VR
        if (
            vr is None
            or vr == "SQ"
            or vr in _AMBIGUOUS_VRS
            or raw.length == 0xFFFFFFFF
            or not (raw.is_little_endian or vr in ("OB", "UN"))
        ):
            return False
        value = self._raw_value(raw)
        size = len(value)
        if size & 1:
            return False
        tag = raw.tag
        if vr in _LONG_VRS:
            head = _LONG_HEAD.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, size)
        else:
            head = _SHORT_HEAD.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), size)
        self._emit(head)
        self._emit(value)
        return True

    def _raw_value(self, raw: RawDataElement) -> bytes | memoryview:
        """The value bytes as read, or for a deferred value its slice of the mapped file."""
        if raw.value is not None or raw.length == 0:
            return raw.value or b""
        if self.source is None:
            raise ValueError(f"deferred value of {tag_str(raw.tag)} without its source file")
        start, stop = raw.value_tell, raw.value_tell + raw.length
        if stop > len(self.source):
            raise ValueError(f"file truncated in element {tag_str(raw.tag)}")
        return self.source[start:stop]

    def write_element(self, ds: Dataset, tag: int) -> None:
        """One element in signature format; a sequence as ``tag 'SQ' 00 00``, each item as
        ``FE FF 00 E0`` and its elements (no item delimiter), then ``FE FF DD E0``.

        Iterative (a work list, not recursion), so any nesting depth costs no Python stack.
        """
        todo: list[tuple[Dataset, int] | bytes] = [(ds, tag)]
        while todo:
            task = todo.pop()
            if isinstance(task, bytes):
                self._emit(task)
                continue
            level, t = task
            if vr_of(level, t) != "SQ":
                self._write_value(level, t)
                continue
            self._emit(_header(t, "SQ", None))
            todo.append(SEQ_DELIMITER)
            for item in reversed(level[t].value):
                todo.extend((item, child) for child in reversed(tags_of(item)))
                todo.append(ITEM_TAG)

    def _write_value(self, ds: Dataset, tag: int) -> None:
        """One element that is not a sequence."""
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None:
            raise KeyError(tag)
        is_raw = isinstance(raw, RawDataElement)
        vr = raw.VR
        if vr is None or vr in _AMBIGUOUS_VRS:
            vr = ds[tag].VR
        # A converted OW/OF/... value keeps the byte order of the file it was read from.
        little = raw.is_little_endian if is_raw else ds.original_encoding[1] is not False
        undefined = raw.length == 0xFFFFFFFF if is_raw else raw.is_undefined_length
        if is_raw and not undefined and (little or vr in ("OB", "UN")):
            value = self._raw_value(raw)
            if len(value) % 2 == 0:  # odd (invalid) values go through the padding writer
                self._emit(_header(tag, vr, len(value)))
                self._emit(value)
                return
        if vr in _BINARY_VRS:
            value = self._raw_value(raw) if is_raw and raw.value is None else ds[tag].value
            self._write_binary(tag, vr, value, undefined, swap=not little)
            return
        elem = ds[tag]
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        if elem.VR in _AMBIGUOUS_VRS:
            elem = correct_ambiguous_vr_element(elem, ds, True)
        write_data_element(fp, elem, self.encodings)
        self._emit(fp.getvalue())

    def _write_binary(
        self, tag: int, vr: str, value: object, undefined_length: bool, swap: bool
    ) -> None:
        """OB/OW/... values: hashed in place; big-endian words swapped; encapsulated unrolled."""
        if value is None:
            value = b""
        if isinstance(value, list | tuple):  # a multi-valued OB/OW list from user code
            value = b"".join(value)
        assert isinstance(value, bytes | bytearray | memoryview)
        if undefined_length:  # encapsulated pixel data is OB (PS3.5 A.4), as DCMTK writes it
            self._emit(_header(tag, "OB", None))
            for frag in _fragments(value):
                self._emit(ITEM_TAG)
                self._emit(frag)
            self._emit(SEQ_DELIMITER)
            return
        if swap and vr in _SWAP_WIDTH and len(value) % _SWAP_WIDTH[vr] == 0:
            dtype = np.dtype(f">u{_SWAP_WIDTH[vr]}")
            value = np.frombuffer(value, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes()
        padded = len(value) + (len(value) & 1)
        self._emit(_header(tag, vr, padded))
        self._emit(value)
        if padded != len(value):
            self._emit(b"\x00")


def mac_transfer_syntax(ds: Dataset) -> str:
    """Explicit VR LE, or for encapsulated pixel data or a deflated file the file's own syntax
    (as DCMTK does; the hashed stream is Explicit VR LE in every case).
    """
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is not None and (ts.is_encapsulated or ts == DeflatedExplicitVRLittleEndian):
        return str(ts)
    return ExplicitVRLittleEndian


def item_stream(sig_item: Dataset, writer: MacStreamWriter) -> bytes:
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


def tag_str(tag: int) -> str:
    """``(gggg,eeee)``, the way DICOM tools print tags."""
    t = Tag(tag)
    return f"({t.group:04X},{t.element:04X})"
