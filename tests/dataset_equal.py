"""One check for the readers built beside pydicom's: the same dataset as dcmread gives."""

from __future__ import annotations

import pydicom
from pydicom.dataelem import RawDataElement

from medsec.integrity.mac_stream import tags_of


def assert_same_dataset(fast: pydicom.FileDataset, ref: pydicom.FileDataset) -> None:
    """Same tags, raw elements (value, offset, VR, length, encoding), encodings, preamble
    and values (sequences included) as ``ref``, pydicom's own reading."""
    assert list(fast.keys()) == list(ref.keys())
    assert list(fast.file_meta.keys()) == list(ref.file_meta.keys())
    for tag in tags_of(ref):  # iterating a Dataset would convert its elements
        a, b = fast.get_item(tag, keep_deferred=True), ref.get_item(tag, keep_deferred=True)
        assert type(a) is type(b), tag
        if isinstance(a, RawDataElement):
            assert tuple(a)[:7] == tuple(b)[:7], tag  # value, offset, VR, length, encoding
    assert fast.original_encoding == ref.original_encoding
    assert fast.original_character_set == ref.original_character_set
    assert fast.preamble == ref.preamble
    assert fast == ref  # every value, sequences included
