"""The verifier's byte path (signed_bytes) decides exactly as its pydicom path, or declines.

Each comparison runs one file both ways: ``verify_dataset(path)`` (the bytes first) and
``verify_dataset(pydicom.dcmread(path))`` (a Dataset: pydicom's reading and medsec's writer).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dataset_equal import assert_same_dataset
from medsec.errors import MedsecError
from medsec.integrity import (
    Status,
    TrustStore,
    VerificationResult,
    dicom_verify,
    generate_signer,
    sign_dataset,
    sign_file,
    verify_dataset,
)
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.integrity.signed_bytes import scan
from medsec.service import gate
from medsec.service.config import ImageRules
from medsec.service.gate import ImagePolicy, Refusal, check_upload


class Pki:
    def __init__(self, root: Path) -> None:
        self.key, self.cert = generate_signer(root / "trusted")
        self.other_key, self.other_cert = generate_signer(root / "other", "another modality")
        self.trust = TrustStore.from_dir(root / "trusted")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("signed-bytes"))


def _radiograph() -> pydicom.Dataset:
    """RG1_UNCI.dcm's header (15-bit CR, nested sequences) over a 16x16 image."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    ds.Rows = ds.Columns = 16
    ds.PixelData = np.arange(256, dtype="<u2").tobytes()
    return ds


@pytest.fixture(scope="module")
def signed(pki: Pki) -> bytes:
    return dataset_bytes(sign_dataset(_radiograph(), pki.key, pki.cert))


def _both(path: Path, trust: TrustStore) -> tuple[VerificationResult, VerificationResult]:
    return verify_dataset(path, trust), verify_dataset(pydicom.dcmread(path), trust)


def _assert_same(fast: VerificationResult, slow: VerificationResult) -> None:
    assert (fast.status, fast.reason, fast.unsigned_elements) == (
        slow.status,
        slow.reason,
        slow.unsigned_elements,
    )
    assert fast.signatures == slow.signatures  # every field of every signature check


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    return path


def _offsets(data: bytes, tag: int) -> tuple[int, int]:
    """(header start, value start) of a top-level element, from the byte path's own scan."""
    scanned = scan(memoryview(data))
    assert scanned is not None
    el = scanned.elements[tag]
    return el.start, el.value


def _explicit_le(path: Path) -> bool:
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    except Exception:  # a test file pydicom cannot read: tested elsewhere
        return False
    return meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian


def test_every_test_file_signed_by_medsec_decides_alike(pki: Pki, tmp_path: Path) -> None:
    dirs = {Path(get_testdata_file(n)).parent for n in ("RG1_UNCI.dcm", "CT_small.dcm")}
    files = [f for d in sorted(dirs) for f in sorted(d.glob("*.dcm")) if f.stat().st_size > 0]
    taken = 0
    for src in filter(_explicit_le, files):
        out = tmp_path / src.name
        try:
            sign_file(src, out, pki.key, pki.cert)
        except MedsecError:  # what medsec refuses to sign is tested elsewhere
            continue
        if scan(memoryview(out.read_bytes())) is None:
            continue  # pydicom's way on both sides (odd lengths, VR UN, ...)
        taken += 1
        fast, slow = _both(out, pki.trust)
        _assert_same(fast, slow)
        assert fast.ok, (src.name, fast.reason)
    # The byte path must really be taken (explicit VR LE files, with and without sequences).
    assert taken >= 30, f"the byte path took {taken} signed test files"


def _tampered(data: bytes) -> dict[str, bytes]:
    """Changes to a signed file that keep it well formed, so the byte path reads them all."""
    out = {}
    _, pixels = _offsets(data, 0x7FE00010)
    out["one pixel"] = data[:pixels] + bytes([data[pixels] ^ 1]) + data[pixels + 1 :]
    _, pid = _offsets(data, 0x00100020)
    out["patient id"] = data[:pid] + b"X" + data[pid + 1 :]
    inside = data.index(b"Uncompressed predecessor")  # a value two sequences deep
    out["nested value"] = data[:inside] + b"u" + data[inside + 1 :]
    value = _offsets(data, 0xFFFAFFFA)[1]
    sig = data.index(b"\x00\x04\x20\x01OB", value) + 12  # (0400,0120) Signature's value
    out["signature"] = data[:sig] + bytes([data[sig] ^ 0x80]) + data[sig + 1 :]
    mac_id = data.index(b"\x00\x04\x05\x00US\x02\x00", value) + 8  # the item's MAC ID
    out["mac id"] = data[:mac_id] + b"\x07" + data[mac_id + 1 :]
    start, _ = _offsets(data, 0x00100020)
    extra = b"\x09\x00\x10\x00LO\x04\x00ABCD"  # a private element nobody signed
    at = _offsets(data, 0x00100010)[0]  # before Patient's Name, so tags stay ascending
    out["added element"] = data[:at] + extra + data[at:]
    stop = _offsets(data, 0x00100030)[0]  # Patient ID runs to the next element
    out["removed element"] = data[:start] + data[stop:]
    return out


def test_tampered_files_decide_alike(pki: Pki, signed: bytes, tmp_path: Path) -> None:
    clean = _write(tmp_path, "clean", signed)
    fast, slow = _both(clean, pki.trust)
    _assert_same(fast, slow)
    assert fast.ok
    for name, data in _tampered(signed).items():
        assert scan(memoryview(data)) is not None, name  # the byte path decides these
        fast, slow = _both(_write(tmp_path, name, data), pki.trust)
        _assert_same(fast, slow)
        assert not fast.ok, name


def test_a_signer_outside_the_trust_store_decides_alike(pki: Pki, tmp_path: Path) -> None:
    data = dataset_bytes(sign_dataset(_radiograph(), pki.other_key, pki.other_cert))
    fast, slow = _both(_write(tmp_path, "other", data), pki.trust)
    _assert_same(fast, slow)
    assert fast.status is Status.UNTRUSTED


def _declined(data: bytes) -> dict[str, bytes]:
    """Well-formed inputs the byte path leaves to pydicom."""
    at = _offsets(data, 0x00100010)[0]
    head, _ = _offsets(data, 0x7FE00010)
    reserved = data[: head + 6] + b"\x01" + data[head + 7 :]  # OW's reserved bytes, unhashed
    un = b"\x09\x00\x10\x00UN\x00\x00" + struct.pack("<I", 4) + b"ABCD"
    return {
        "odd length": data[:at] + b"\x09\x00\x10\x00LO\x03\x00ABC" + data[at:],
        "vr un": data[:at] + un + data[at:],
        "reserved bytes": reserved,
        "stray bytes": data + b"\0\0",
        "syntax not a UI": _syntax_as_lo(data),
    }


def _syntax_as_lo(data: bytes) -> bytes:
    """(0002,0010) written as LO: pydicom then reads a string, not a UID (File Meta group
    length adjusted, so only the VR differs)."""
    at = data.index(b"\x02\x00\x10\x00UI")
    (size,) = struct.unpack_from("<H", data, at + 6)
    element = b"\x02\x00\x10\x00LO" + struct.pack("<H", 20) + b"1.2.840.10008.1.2.1 "
    out = data[:at] + element + data[at + 8 + size :]
    (group,) = struct.unpack_from("<I", out, 140)
    return out[:140] + struct.pack("<I", group + len(element) - 8 - size) + out[144:]


def test_what_the_byte_path_declines_pydicom_decides(pki: Pki, signed: bytes, tmp_path) -> None:
    for name, data in _declined(signed).items():
        assert scan(memoryview(data)) is None, name
        path = _write(tmp_path, name, data)
        fast = verify_dataset(path, pki.trust)
        if name == "stray bytes":  # pydicom reads it leniently; the verifier must not
            assert fast.status is Status.UNREADABLE
            continue
        _assert_same(fast, verify_dataset(pydicom.dcmread(path), pki.trust))
        assert fast.ok is (name == "reserved bytes"), (name, fast.reason)


def test_malformed_signature_sequences_are_left_to_pydicom(pki: Pki, tmp_path: Path) -> None:
    not_sq = _radiograph()
    not_sq.add_new(0xFFFAFFFA, "OB", b"\x01\x02")  # a Digital Signatures "Sequence" as OB
    empty_sq = sign_dataset(_radiograph(), pki.key, pki.cert)
    empty_sq.MACParametersSequence[0].add_new(0x04000020, "SQ", Sequence())  # Elements Signed
    for name, ds in {"not a sequence": not_sq, "empty sequence value": empty_sq}.items():
        path = _write(tmp_path, name, dataset_bytes(ds))
        assert scan(memoryview(path.read_bytes())) is None, name
        fast = verify_dataset(path, pki.trust, require_signature=False)
        slow = verify_dataset(pydicom.dcmread(path), pki.trust, require_signature=False)
        _assert_same(fast, slow)
        assert fast.status is Status.UNREADABLE, (name, fast.reason)


def test_the_gate_refuses_a_transfer_syntax_that_is_not_a_uid(pki: Pki, signed: bytes) -> None:
    rules = ImageRules(modalities=("CR",))
    for verify in (True, False):  # the benchmark's baseline skips the signature check
        policy = ImagePolicy(trust=pki.trust, channels=1, image_size=16, rules=rules, verify=verify)
        with pytest.raises(Refusal) as refusal:
            check_upload(_syntax_as_lo(signed), policy)
        assert refusal.value.http_status == 422, refusal.value.reason


def test_a_signature_inside_a_sequence_goes_to_pydicom(pki: Pki, tmp_path: Path) -> None:
    ds = _radiograph()
    sign_dataset(ds.SourceImageSequence[0], pki.key, pki.cert)
    sign_dataset(ds, pki.key, pki.cert)
    path = _write(tmp_path, "nested", dataset_bytes(ds))
    assert scan(memoryview(path.read_bytes())) is None
    fast, slow = _both(path, pki.trust)
    _assert_same(fast, slow)
    assert fast.ok and [c.location for c in fast.signatures] == ["top level", "(0008,2112)[0]"]


def _refuse(*_: object, **__: object) -> None:
    raise AssertionError("the pydicom path was taken")


def _no_pydicom_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicom_verify, "dataset_levels", _refuse)
    monkeypatch.setattr(dicom_verify, "read_explicit_le", _refuse)
    monkeypatch.setattr(dicom_verify, "_read_lenient", _refuse)


def test_a_signed_radiograph_is_verified_from_its_bytes_alone(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = Path(get_testdata_file("RG1_UNCI.dcm"))
    path = sign_file(src, tmp_path / "s.dcm", pki.key, pki.cert)
    _no_pydicom_path(monkeypatch)
    result = verify_dataset(path, pki.trust, require_creator=True)
    assert result.ok, result.reason


def test_the_dataset_built_from_a_scan_is_the_one_dcmread_reads(pki: Pki, signed: bytes) -> None:
    dirs = {Path(get_testdata_file(n)).parent for n in ("RG1_UNCI.dcm", "CT_small.dcm")}
    files = [f for d in sorted(dirs) for f in sorted(d.glob("*.dcm")) if f.stat().st_size > 0]
    bodies = [signed] + [f.read_bytes() for f in filter(_explicit_le, files)]
    built = 0
    for body in bodies:
        scanned = scan(memoryview(body))
        if scanned is None:
            continue
        ds = scanned.dataset(io.BytesIO(body))
        assert ds is not None
        assert_same_dataset(ds, pydicom.dcmread(io.BytesIO(body)))
        built += 1
    assert built >= 30, f"only {built} files were scanned"


def test_the_gate_verifies_and_reads_the_common_signed_file_from_one_scan(
    pki: Pki, signed: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = ImagePolicy(
        trust=pki.trust, channels=1, image_size=16, rules=ImageRules(modalities=("CR",))
    )
    with monkeypatch.context() as m:  # neither pydicom's reader nor the Dataset path runs
        m.setattr(gate, "dcmread", _refuse)
        m.setattr(gate, "verify_dataset", _refuse)
        checked = check_upload(signed, policy)
    assert checked.verification is not None and checked.verification.ok
    tampered = _tampered(signed)["nested value"]
    with pytest.raises(Refusal) as refusal:
        check_upload(tampered, policy)
    assert refusal.value.code == "tampered", refusal.value.reason
