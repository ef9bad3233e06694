"""The verifier's direct reader gives what pydicom gives, or declines; quick values agree too."""

from __future__ import annotations

import mmap
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dataset_equal import assert_same_dataset
from medsec.integrity import TrustStore, generate_signer, sign_file, verify_dataset
from medsec.integrity.dicom_io import quick_value
from medsec.integrity.fast_read import read_explicit_le
from medsec.integrity.mac_stream import tags_of

DEFER = 1 << 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrustStore]:
    """(key, certificate, trust store) of one RSA signer."""
    d = tmp_path_factory.mktemp("fast-read") / "signer"
    key, cert = generate_signer(d)
    return key, cert, TrustStore.from_dir(d)


def _fast(path: Path) -> pydicom.FileDataset | None:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            return read_explicit_le(view, fh, path, DEFER)
        finally:
            view.release()


def test_direct_reader_matches_pydicom_on_every_test_file_it_reads() -> None:
    # The files on this machine (get_testdata_files would try to download the rest).
    dirs = {Path(get_testdata_file(n)).parent for n in ("RG1_UNCI.dcm", "CT_small.dcm")}
    files = [f for d in sorted(dirs) for f in sorted(d.glob("*.dcm")) if f.stat().st_size > 0]
    read = 0
    for path in files:
        fast = _fast(path)
        if fast is None:
            continue
        read += 1
        assert_same_dataset(fast, pydicom.dcmread(path, defer_size=DEFER))
    # The fast path must really be taken (explicit VR LE files with and without sequences).
    assert read >= 20, f"direct reader took only {read} of {len(files)} files"


def test_a_signed_clinical_radiograph_takes_the_direct_path(pki, tmp_path: Path) -> None:
    key, cert, trust = pki
    signed = sign_file(Path(get_testdata_file("RG1_UNCI.dcm")), tmp_path / "s.dcm", key, cert)
    fast = _fast(signed)
    assert fast is not None  # undefined-length sequences (read by pydicom) included
    assert_same_dataset(fast, pydicom.dcmread(signed, defer_size=DEFER))
    assert verify_dataset(signed, trust).ok


def _mutations(data: bytes) -> dict[str, tuple[bytes, bool]]:
    """Changed files, each with whether it still verifies: elements out of order are the same
    dataset (the MAC covers elements in tag order, as DCMTK computes it), and the File Meta is
    outside any signature (pydicom reads it by group, not by its length); a cut or an
    addition is refused."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    rows = ds.get_item(0x00280010).value_tell - 8  # (0028,0010) US, an 8-byte header
    cols = rows + 10  # (0028,0011) follows it
    swapped = data[:rows] + data[cols : cols + 10] + data[rows:cols] + data[cols + 10 :]
    meta_length = bytearray(data)
    meta_length[140] ^= 1  # (0002,0000)'s value starts at byte 140
    return {
        "tags out of order": (swapped, True),
        "cut inside the last value": (data[:-3], False),
        "stray bytes after the last element": (data + b"\0\0", False),
        "wrong file meta group length": (bytes(meta_length), True),
    }


def test_direct_reader_declines_what_pydicom_must_judge(pki, tmp_path: Path) -> None:
    key, cert, trust = pki
    src = Path(get_testdata_file("CT_small.dcm"))  # explicit VR LE, no sequences
    signed = sign_file(src, tmp_path / "s.dcm", key, cert)
    assert _fast(signed) is not None
    for name, (data, verifies) in _mutations(signed.read_bytes()).items():
        changed = tmp_path / f"{name}.dcm"
        changed.write_bytes(data)
        assert _fast(changed) is None, name
        assert verify_dataset(changed, trust).ok is verifies, name  # pydicom's path decides


def test_implicit_vr_files_go_to_pydicom() -> None:
    path = Path(get_testdata_file("MR_small_implicit.dcm"))
    assert _fast(path) is None


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "CT_small.dcm", "SC_rgb.dcm"])
def test_quick_values_equal_pydicom_values(name: str) -> None:
    path = get_testdata_file(name)
    ref = pydicom.dcmread(path, stop_before_pixels=True)
    fresh = pydicom.dcmread(path, stop_before_pixels=True)  # quick_value reads it unconverted
    for tag in tags_of(ref):  # iterating a Dataset would convert its elements
        quick, value = quick_value(fresh, tag), ref[tag].value
        if ref[tag].VR == "AT":  # quick_value gives AT values as a list of ints
            value = [int(t) for t in (value if isinstance(value, list) else [value])]
        assert quick == value, (name, tag)
