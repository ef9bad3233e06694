"""DICOMweb STOW-RS (PS3.18 10.5): POST /dicomweb/studies with multipart/related instances.

Signed clinical instances are stored (verified and classified, their predictions those of the
images the dicom: loader makes) and listed in ReferencedSOPSequence; tampered, unsigned,
untrusted and non-DICOM parts are listed in FailedSOPSequence with a Failure Reason and never
reach the model; 200/202/409 follow the standard; every instance has its audit line.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from clinical_service import (
    Clinical,
    CountingModel,
    dcmsign_signed,
    make_clinical,
    read,
    serving,
    signed_bytes,
)
from medsec.errors import MedsecError
from medsec.integrity import TrustStore, generate_signer, verify_dataset
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.service.app import ServiceState
from medsec.service.audit import verify_log
from medsec.service.dicomweb import split_related
from medsec.service.gate import Refusal
from medsec.service.reports import ReportWriter


@pytest.fixture(scope="module")
def clinical(tmp_path_factory: pytest.TempPathFactory) -> Clinical:
    return make_clinical(tmp_path_factory.mktemp("stow"), reports=True)


@pytest.fixture(scope="module")
def served(clinical: Clinical) -> Iterator[tuple[httpx.Client, ServiceState, CountingModel]]:
    with serving(clinical) as running:
        yield running


def _related(parts: list[tuple[str, bytes]], boundary: str = "medsec-b0undary") -> bytes:
    """A multipart/related body as a STOW-RS client sends it (with a preamble and epilogue)."""
    out = [b"preamble, ignored\r\n"]
    for ctype, data in parts:
        out.append(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\nepilogue\r\n".encode())
    return b"".join(out)


def _stow(client: httpx.Client, token: str | None, body: bytes, ctype: str | None = None):
    headers = {"Content-Type": ctype or 'multipart/related; type="application/dicom"; '
               "boundary=medsec-b0undary", "Accept": "application/dicom+json"}  # fmt: skip
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post("/dicomweb/studies", content=body, headers=headers)


def test_stow_rs_store_response_per_instance(clinical, served, tmp_path: Path):
    client, state, counting = served
    good = {
        n: signed_bytes(n, clinical.key, clinical.cert) for n in ("CT_small.dcm", "JPEG-LL.dcm")
    }
    tampered = pydicom.dcmread(io.BytesIO(good["JPEG-LL.dcm"]))
    tampered.PatientName = "Someone^Else"
    rogue = generate_signer(tmp_path / "rogue", "rogue")
    bad = [
        ("application/dicom", dataset_bytes(tampered)),
        ("application/dicom", Path(get_testdata_file("MR_small.dcm")).read_bytes()),
        ("application/dicom", signed_bytes("MR_small.dcm", *rogue)),
        ("text/plain", b"hello"),
        ("application/dicom", good["CT_small.dcm"][:-20000]),  # cut inside the pixel data
    ]
    calls, lines = counting.calls, state.audit.lines
    resp = _stow(
        client, clinical.token, _related([("application/dicom", b) for b in good.values()] + bad)
    )
    assert resp.status_code == 202 and resp.headers["content-type"] == "application/dicom+json"
    body = resp.json()
    stored = [
        (i["00081150"]["Value"][0], i["00081155"]["Value"][0]) for i in body["00081199"]["Value"]
    ]
    want = [(read(n).SOPClassUID, read(n).SOPInstanceUID) for n in good]
    assert stored == want
    reasons = [i["00081197"]["Value"][0] for i in body["00081198"]["Value"]]
    assert reasons == [0x0124, 0x0124, 0x0124, 0xC000, 0xC000]
    assert body["00081198"]["Value"][0]["00081155"]["Value"] == [tampered.SOPInstanceUID]
    assert counting.calls == calls + 2  # only the two verified instances reached the model
    audit = [
        json.loads(x)
        for x in clinical.config_path.parent.joinpath("audit", "audit.jsonl")
        .read_text()
        .splitlines()
    ]
    assert len(audit) == lines + 7 and {a["channel"] for a in audit[lines:]} == {"stow"}
    assert [a["code"] for a in audit[lines:]] == [
        "ok",
        "ok",
        "tampered",
        "unsigned",
        "untrusted_signer",
        "unsupported_media_type",
        "truncated",
    ]
    for name, line in zip(good, audit[lines:], strict=False):
        i = clinical.names.index(name)
        x = torch.from_numpy(clinical.data.test.images[i : i + 1])
        with torch.no_grad():
            expected = torch.softmax(clinical.model(x), 1)[0].numpy()
        np.testing.assert_allclose(line["prediction"]["probabilities"], expected, atol=1e-5)
    assert verify_log(clinical.config_path.parent / "audit" / "audit.jsonl").ok


def test_stow_rs_all_or_nothing_statuses_and_request_errors(clinical, served, tmp_path: Path):
    client, _, counting = served
    ct = signed_bytes("CT_small.dcm", clinical.key, clinical.cert)
    assert _stow(client, clinical.token, _related([("application/dicom", ct)])).status_code == 200
    by_dcmtk = dcmsign_signed("MR_small.dcm", clinical.key, clinical.cert, tmp_path / "mr.dcm")
    assert (
        _stow(client, clinical.token, _related([("application/dicom", by_dcmtk)])).status_code
        == 200
    )
    unsigned = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    calls = counting.calls
    assert (
        _stow(client, clinical.token, _related([("application/dicom", unsigned)])).status_code
        == 409
    )
    assert _stow(client, None, _related([("application/dicom", ct)])).status_code == 401
    plain = _stow(client, clinical.token, ct, ctype="application/dicom")
    assert (plain.status_code, plain.json()["code"]) == (415, "unsupported_media_type")
    cut = _related([("application/dicom", ct)]).rsplit(b"--medsec-b0undary--", 1)[0]
    broken = _stow(client, clinical.token, cut)
    assert (broken.status_code, broken.json()["code"]) == (400, "bad_multipart")
    assert counting.calls == calls


def test_split_related_keeps_binary_parts_byte_for_byte():
    noise = bytes(range(256)) * 4 + b"\r\n--medsec-b0undar\r\n\r\n--"  # near-delimiters inside
    body = _related([("application/dicom", noise), ("application/dicom", b"")])
    assert split_related(body, "medsec-b0undary") == [
        ("application/dicom", noise),
        ("application/dicom", b""),
    ]
    with pytest.raises(Refusal, match="no multipart boundary"):
        split_related(body, "other")


def test_each_accepted_instance_gets_a_signed_sr_referencing_it(clinical, served, tmp_path: Path):
    client = served[0]
    source = read("CT_small.dcm")
    resp = _stow(
        client,
        clinical.token,
        _related(
            [("application/dicom", signed_bytes("CT_small.dcm", clinical.key, clinical.cert))]
        ),
    )
    assert resp.status_code == 200, resp.text
    item = resp.json()["00081199"]["Value"][0]
    assert item["00090010"]["Value"] == ["MEDSEC"]
    probabilities = item["00091002"]["Value"]
    sr_path = clinical.config_path.parent / "reports" / f"{item['00091003']['Value'][0]}.dcm"
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.StudyInstanceUID, sr.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.CompletionFlag == "COMPLETE"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    numbers = [c.MeasuredValueSequence[0].NumericValue for c in _walk(sr) if c.ValueType == "NUM"]
    np.testing.assert_allclose([float(v) for v in numbers], probabilities, atol=1e-6)
    service = TrustStore.from_dir(clinical.config_path.parent.parent / "report_signer")
    assert verify_dataset(sr, service, require_creator=False).ok
    dcmsign = shutil.which("dcmsign")
    assert dcmsign, "dcmsign (DCMTK) is not installed: run `make sysdeps`"
    cert = next((clinical.config_path.parent.parent / "report_signer").glob("*cert*.pem"))
    check = subprocess.run(
        [dcmsign, "--verify", "+cf", str(cert), str(sr_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    audit = json.loads(
        (clinical.config_path.parent / "audit" / "audit.jsonl").read_text().splitlines()[-1]
    )
    assert (
        audit["prediction"]["report"]["sha256"] == hashlib.sha256(sr_path.read_bytes()).hexdigest()
    )


def _walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def test_report_writer_refuses_to_start_with_a_bad_key_or_folder(tmp_path: Path):
    key, cert = generate_signer(tmp_path / "svc", "medsec service", "ec")
    ReportWriter(tmp_path / "out", key, cert, "small-cnn", "0" * 64).check()
    with pytest.raises(MedsecError, match=r"\[results\] signing key"):
        ReportWriter(tmp_path / "out", tmp_path / "absent.pem", cert, "a", "0" * 64).check()
    (tmp_path / "file").write_text("")
    with pytest.raises(MedsecError, match="not writable"):
        ReportWriter(tmp_path / "file" / "out", key, cert, "a", "0" * 64).check()
