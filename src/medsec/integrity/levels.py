"""What a signature check needs from a dataset or item that carries signatures, whatever read it.

The checks of :mod:`.dicom_verify` run on a :class:`Level`: its tags, its MAC Parameters items,
its Digital Signatures items (each with its own hashed elements already encoded), and a way to
feed the signed elements' MAC stream to a hash. Two readers provide it: :func:`dataset_levels`
from a pydicom Dataset (any input), and :mod:`.signed_bytes` straight from the bytes of the
common signed file. One set of checks, so both ways decide alike (tests compare them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset

from medsec.integrity.dicom_io import UNTRUSTED_DATA_ERRORS, quick_value
from medsec.integrity.mac_stream import (
    DIGITAL_SIGNATURES_SEQUENCE,
    MAC_PARAMETERS_SEQUENCE,
    MacStreamWriter,
    Sink,
    item_stream,
    mac_transfer_syntax,
    tags_of,
    walk,
)

# The value of a tag in an item, decoded (None when absent or empty).
Values = Callable[[int], object]


@dataclass(frozen=True)
class SignatureItem:
    """One Digital Signatures item: its values, and its hashed elements as they end the MAC
    input (or why they cannot be encoded: a failed check, reported after the others)."""

    value: Values
    own: bytes | Exception


class Level(Protocol):
    """A dataset or sequence item with a Digital Signatures Sequence."""

    location: str  # "top level" or a path like "(0040,0275)[0]"

    def tags(self) -> list[int]:
        """Every tag at this level, ascending."""
        ...

    def mac_syntax(self) -> str:
        """The MAC Calculation Transfer Syntax a signature here may name besides Explicit LE."""
        ...

    def mac_items(self) -> list[Values]:
        """The MAC Parameters items."""
        ...

    def signatures(self) -> list[SignatureItem]:
        """The Digital Signatures items, in document order."""
        ...

    def feed(self, sink: Sink, tags: list[int]) -> None:
        """Write the MAC stream of the elements ``tags`` (ascending, all present) to ``sink``."""
        ...


class DatasetLevel:
    """A level of a pydicom Dataset; ``writer`` encodes its elements (shared by all levels)."""

    def __init__(self, location: str, ds: Dataset, writer: MacStreamWriter):
        self.location, self._ds, self._writer = location, ds, writer

    def tags(self) -> list[int]:
        return tags_of(self._ds)

    def mac_syntax(self) -> str:
        return mac_transfer_syntax(self._ds)

    def mac_items(self) -> list[Values]:
        params = self._ds.get(MAC_PARAMETERS_SEQUENCE)
        return [functools.partial(quick_value, p) for p in (params.value if params else [])]

    def signatures(self) -> list[SignatureItem]:
        # Each item's own elements are encoded before any is read: read values are converted
        # by pydicom and would then have to be re-encoded, unread ones are hashed as read.
        out = []
        for item in self._ds[DIGITAL_SIGNATURES_SEQUENCE].value:
            own: bytes | Exception
            try:
                own = item_stream(item, self._writer)
            except UNTRUSTED_DATA_ERRORS as exc:
                own = exc
            out.append(SignatureItem(functools.partial(quick_value, item), own))
        return out

    def feed(self, sink: Sink, tags: list[int]) -> None:
        self._writer.sink = sink
        self._writer.write_elements(self._ds, tags)
        self._writer.flush()


def dataset_levels(ds: Dataset, source: memoryview | None = None) -> Iterator[DatasetLevel]:
    """Every level of ``ds`` with a Digital Signatures Sequence, in document order;
    ``source`` is the mapped file ``ds`` was read from with deferred values."""
    writer = MacStreamWriter.for_dataset(_NullSink(), ds, source)
    for path, level in walk(
        ds, skip=frozenset({DIGITAL_SIGNATURES_SEQUENCE, MAC_PARAMETERS_SEQUENCE})
    ):
        if DIGITAL_SIGNATURES_SEQUENCE in level:
            yield DatasetLevel(path or "top level", level, writer)


class _NullSink:
    """Placeholder sink; each use swaps in its own hash object or collector."""

    def update(self, data: bytes | memoryview, /) -> None:
        raise AssertionError("stream written without a hash")
