"""Tamper evidence: every change to a signed image is rejected with the right reason."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from medsec.integrity import (
    Status,
    TrustStore,
    dicom_to_image,
    generate_signer,
    image_to_dicom,
    sign_dataset,
    verify_dataset,
)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrustStore]:
    d = tmp_path_factory.mktemp("tamper")
    key, cert = generate_signer(d / "a")
    generate_signer(d / "b", "second modality")
    return key, cert, TrustStore.from_dir(d / "a")


@pytest.fixture(scope="module")
def small(signer: tuple[Path, Path, TrustStore]) -> Dataset:
    image = np.random.default_rng(1).uniform(0.1, 0.9, (8, 8))
    ds = image_to_dicom(image, seed=1)
    return sign_dataset(ds, signer[0], signer[1])


@pytest.fixture(scope="module")
def radiograph(signer: tuple[Path, Path, TrustStore]) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    return sign_dataset(ds, signer[0], signer[1])


def with_pixels(ds: Dataset, data: bytes) -> Dataset:
    out = copy.deepcopy(ds)  # the module-scoped fixture stays intact
    out[0x7FE00010] = DataElement(0x7FE00010, ds["PixelData"].VR, data)
    return out


def assert_mismatch(result, where: str = "signature #1") -> None:
    assert not result.ok
    assert result.status is Status.INVALID
    assert result.reason.startswith(where) and "does not match" in result.reason


def test_clean_signed_image_passes(small: Dataset, signer) -> None:
    result = verify_dataset(small, signer[2], require_creator=True)
    assert result.ok and result.status is Status.VERIFIED, result.reason
    image = np.random.default_rng(1).uniform(0.1, 0.9, (8, 8))
    np.testing.assert_allclose(dicom_to_image(small), image, atol=0.5 / 255 + 1e-6)


def test_every_single_pixel_plus_minus_one_rejected(small: Dataset, signer) -> None:
    base = bytes(small.PixelData)
    tried = 0
    for i in range(len(base)):
        for delta in (-1, 1):
            v = base[i] + delta
            if not 0 <= v <= 255:
                continue
            data = bytearray(base)
            data[i] = v
            assert_mismatch(verify_dataset(with_pixels(small, bytes(data)), signer[2]))
            tried += 1
    assert tried == 2 * 64  # uniform(0.1, 0.9) keeps every pixel away from 0 and 255


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_pixel_change_on_radiograph_rejected(radiograph: Dataset, signer, data) -> None:
    base = radiograph.PixelData
    index = data.draw(st.integers(0, len(base) - 1), label="byte index")
    delta = data.draw(st.integers(1, 255), label="xor mask")
    changed = bytearray(base)
    changed[index] ^= delta
    assert_mismatch(verify_dataset(with_pixels(radiograph, bytes(changed)), signer[2]))


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientName", "Someone^Else"), ("Rows", 7), ("PhotometricInterpretation", "MONOCHROME1"),
     ("SOPInstanceUID", "1.2.3.4"), ("StudyDate", "19990101")],
)  # fmt: skip
def test_changed_signed_header_element_rejected(small: Dataset, signer, keyword, value) -> None:
    ds = copy.deepcopy(small)
    setattr(ds, keyword, value)
    assert_mismatch(verify_dataset(ds, signer[2]))


def test_removed_signed_element_rejected(small: Dataset, signer) -> None:
    ds = copy.deepcopy(small)
    del ds.PatientID
    result = verify_dataset(ds, signer[2])
    assert result.status is Status.INVALID and "(0010,0020) is missing" in result.reason


def test_added_unsigned_element_rejected_by_default(small: Dataset, signer) -> None:
    ds = copy.deepcopy(small)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)  # an overlay would draw on the image
    result = verify_dataset(ds, signer[2])
    assert result.status is Status.INVALID and "(6000,3000)" in result.reason
    assert verify_dataset(ds, signer[2], allow_unsigned_elements=True).ok


def two_signatures(small: Dataset, signer) -> Dataset:
    ds = copy.deepcopy(small)
    return sign_dataset(ds, signer[0], signer[1], profile="base")


def test_signature_items_reordered_or_removed(small: Dataset, signer) -> None:
    trust = signer[2]
    ds = two_signatures(small, signer)
    assert verify_dataset(ds, trust).ok
    # MAC ID numbers swapped between the two signature items: each now claims the other's MAC.
    swapped = copy.deepcopy(ds)
    a, b = swapped.DigitalSignaturesSequence
    a.MACIDNumber, b.MACIDNumber = b.MACIDNumber, a.MACIDNumber
    swapped.MACParametersSequence[1].MACAlgorithm = "SHA384"
    assert verify_dataset(swapped, trust).status is Status.INVALID
    # Data Elements Signed reordered.
    reordered = copy.deepcopy(ds)
    tags = list(reordered.MACParametersSequence[0].DataElementsSigned)
    tags[0], tags[1] = tags[1], tags[0]
    reordered.MACParametersSequence[0].DataElementsSigned = tags
    result = verify_dataset(reordered, trust)
    assert result.status is Status.INVALID and "ascending" in result.reason
    # MAC Parameters item removed: its signature cannot be checked.
    no_params = copy.deepcopy(ds)
    del no_params.MACParametersSequence[1]
    result = verify_dataset(no_params, trust)
    assert result.status is Status.INVALID
    assert result.reason.startswith("signature #2") and "no MAC Parameters item" in result.reason
    # A signed element's MAC list trimmed so a removed element would go unnoticed.
    trimmed = copy.deepcopy(ds)
    trimmed.MACParametersSequence[0].DataElementsSigned = tags[2:]
    assert_mismatch(verify_dataset(trimmed, trust))
    # Every signature item removed: a stripped file, refused when a signature is required.
    stripped = copy.deepcopy(ds)
    del stripped.DigitalSignaturesSequence
    del stripped.MACParametersSequence
    result = verify_dataset(stripped, trust)
    assert result.status is Status.MISSING and result.exit_code == 3
    assert verify_dataset(stripped, trust, require_signature=False).ok


def test_reordered_items_of_signed_sequence_rejected(signer) -> None:
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    sign_dataset(ds, signer[0], signer[1], profile="none")
    assert verify_dataset(ds, signer[2]).ok
    top = copy.deepcopy(ds)
    top.DoseReferenceSequence.reverse()
    assert_mismatch(verify_dataset(top, signer[2]))
    nested = copy.deepcopy(ds)
    nested.BeamSequence[0].ControlPointSequence.reverse()
    assert_mismatch(verify_dataset(nested, signer[2]))


def test_untrusted_signer_rejected(small: Dataset, tmp_path_factory) -> None:
    other = tmp_path_factory.getbasetemp() / "tamper0" / "b"
    result = verify_dataset(small, TrustStore.from_dir(other))
    assert result.status is Status.UNTRUSTED and result.exit_code == 4
    assert "untrusted" in result.reason and "signature #1" in result.reason


def test_truncated_and_corrupt_files(radiograph: Dataset, signer, tmp_path: Path) -> None:
    path = tmp_path / "signed.dcm"
    radiograph.save_as(path)
    full = path.read_bytes()
    assert verify_dataset(path, signer[2]).ok
    for cut in (len(full) - 7, len(full) // 2, 2000, 300, 0):
        bad = tmp_path / f"cut{cut}.dcm"
        bad.write_bytes(full[:cut])
        result = verify_dataset(bad, signer[2])
        assert not result.ok, cut
        # Cut inside a value: unreadable. Cut where the signature used to be: it is absent.
        assert result.status in (Status.UNREADABLE, Status.MISSING), (cut, result.reason)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(full[:132] + np.random.default_rng(0).bytes(4096))
    assert verify_dataset(garbage, signer[2]).status is Status.UNREADABLE
    text = tmp_path / "text.dcm"
    text.write_text("not dicom at all\n")
    assert verify_dataset(text, signer[2]).status is Status.UNREADABLE
    assert verify_dataset(tmp_path / "absent.dcm", signer[2]).status is Status.UNREADABLE
