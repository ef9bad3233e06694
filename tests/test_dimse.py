"""DICOM C-STORE ingest: pynetdicom and DCMTK's storescu push signed clinical images to the SCP.

Accepted instances are verified on the bytes as received, then classified (the audit line holds
the model's prediction for exactly the image the loader's pixel path makes); unsigned, tampered,
untrusted and unwanted (modality) instances get a C-STORE failure status with the reason in the
Error Comment and never reach the model (a counting model proves it); unknown calling AE titles
are rejected; TLS works; the audit chain verifies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pynetdicom import AE

from clinical_service import CountingModel
from medsec.imaging.pixels import InputContract, dicom_image, fit_image
from medsec.integrity import generate_signer, sign_dataset
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.models import create_model, save_checkpoint
from medsec.service.audit import verify_log
from medsec.service.bootstrap import init_service_dir
from medsec.service.config import DimseSection, load_config
from medsec.service.dimse import SUCCESS, StorageSCP
from medsec.service.gate import CANNOT_UNDERSTAND, NOT_AUTHORIZED
from medsec.service.server import build_state

SIZE = 64
CONTRACT = InputContract(1, SIZE, "voi-minmax")
SIGNED = ("CT_small.dcm", "JPEG-LL.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm")


@dataclass
class Scp:
    root: Path
    port: int
    tls_port: int
    small_port: int  # an SCP taking instances of at most 60 kB
    files: Path  # signed, tampered, ... files to send
    audit: Path
    ca: Path
    model: torch.nn.Module
    counting: CountingModel


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scp]:
    root = tmp_path_factory.mktemp("dimse")
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=SIZE).eval()
    save_checkpoint(
        root / "victim.pt", model, arch="small-cnn", data_hash="test", image_size=SIZE,
        metrics={}, settings={}, input_contract=CONTRACT.to_dict(),
    )  # fmt: skip
    init = init_service_dir(root / "svc", root / "victim.pt", port=0)
    text = init.config.read_text()
    text = text.replace("max_body_bytes = 1048576", "max_body_bytes = 16777216")
    text = text.replace('modalities = ["OT"]', 'modalities = ["CR", "CT", "MR", "NM"]')
    text = text.replace("resize = false", "resize = true")
    text += '\n[dimse]\nport = 0\nae_title = "MEDSEC"\n'
    text += 'calling_ae_titles = ["MODALITY", "STORESCU", "ORTHANC"]\ntls = false\n'
    init.config.write_text(text)
    assert init.modality_key is not None and init.modality_cert is not None
    files = root / "files"
    files.mkdir()
    for name in SIGNED:
        ds = sign_dataset(pydicom.dcmread(get_testdata_file(name)), init.modality_key,
                          init.modality_cert)  # fmt: skip
        (files / name).write_bytes(dataset_bytes(ds))
    _variants(files, root, init.modality_key, init.modality_cert)
    big = sign_dataset(pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm")), init.modality_key,
                       init.modality_cert)  # fmt: skip
    (files / "RG1_UNCI.dcm").write_bytes(dataset_bytes(big))
    config = load_config(init.config)
    state = build_state(config)
    counting = CountingModel(state.model)
    state.model = counting  # type: ignore[assignment]
    assert config.dimse is not None
    plain = StorageSCP(state, config.dimse)
    secure = StorageSCP(state, DimseSection(host="127.0.0.1", port=0, tls=True))
    small = StorageSCP(state, DimseSection(host="127.0.0.1", port=0, tls=False), 60_000)
    try:
        port, tls_port, small_port = plain.start()[1], secure.start()[1], small.start()[1]
        yield Scp(root, port, tls_port, small_port, files, config.audit.path, init.ca_cert, model,
                  counting)  # fmt: skip
    finally:
        small.stop()
        plain.stop()
        secure.stop()
        state.audit.close()


def _variants(files: Path, root: Path, key: Path, cert: Path) -> None:
    """Bad copies: tampered by one bit of the JPEG stream, unsigned, signed by an unknown key,
    and a trusted-signed ultrasound (a modality this service does not take); and a CT signed
    by DCMTK's dcmsign with the trusted key."""
    signed = pydicom.dcmread(files / "JPEG-LL.dcm")
    stream = bytearray(signed.PixelData)
    stream[len(stream) // 2] ^= 0x01
    signed.PixelData = bytes(stream)
    (files / "tampered.dcm").write_bytes(dataset_bytes(signed))
    shutil.copyfile(get_testdata_file("MR_small.dcm"), files / "unsigned.dcm")
    rogue_key, rogue_cert = generate_signer(root / "rogue", "rogue modality")
    rogue = sign_dataset(pydicom.dcmread(get_testdata_file("CT_small.dcm")), rogue_key, rogue_cert)
    (files / "rogue.dcm").write_bytes(dataset_bytes(rogue))
    us = sign_dataset(pydicom.dcmread(get_testdata_file("US1_J2KR.dcm")), key, cert)
    (files / "ultrasound.dcm").write_bytes(dataset_bytes(us))
    dcmsign = shutil.which("dcmsign")
    assert dcmsign, "dcmsign (DCMTK) is not installed: run `make sysdeps` (apt-get install dcmtk)"
    cmd = [dcmsign, "--sign", str(key), str(cert), "--profile-creator", "--mac-sha256",
           get_testdata_file("CT_small.dcm"), str(files / "dcmsign_CT.dcm")]  # fmt: skip
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0


def _store(
    port: int, paths: list[Path], calling: str = "MODALITY", tls: ssl.SSLContext | None = None
) -> list[tuple[int, str]]:
    """pynetdicom SCU: send files as they are on disk; (status, error comment) per file."""
    ae = AE(ae_title=calling)
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
    tls_args = (tls, "localhost") if tls is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEC", tls_args=tls_args)
    assert assoc.is_established
    try:
        out = []
        for path in paths:
            status = assoc.send_c_store(path)
            out.append((int(status.Status), str(status.get("ErrorComment", ""))))
        return out
    finally:
        assoc.release()


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected_prediction(model: torch.nn.Module, path: Path) -> list[float]:
    image = fit_image(dicom_image(pydicom.dcmread(path), "voi-minmax"), CONTRACT)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(image[None])), 1)[0].tolist()


def test_pynetdicom_scu_signed_accepted_bad_refused_before_the_model(scp: Scp):
    before, lines = scp.counting.calls, len(_audit(scp.audit))
    good = [scp.files / n for n in SIGNED]
    results = _store(scp.port, good)
    assert results == [(SUCCESS, "")] * len(good)
    assert scp.counting.calls == before + len(good)
    new = _audit(scp.audit)[lines:]
    for path, line in zip(good, new, strict=True):
        assert line["channel"] == "dimse" and line["client"] == "dimse:MODALITY"
        assert line["code"] == "ok" and line["verification"]["status"] == "VERIFIED"
        assert line["sop_instance_uid"] == pydicom.dcmread(path).SOPInstanceUID
        want = _expected_prediction(scp.model, path)
        np.testing.assert_allclose(line["prediction"]["probabilities"], want, atol=1e-5)

    bad = {
        "tampered.dcm": (NOT_AUTHORIZED, "tampered"),
        "unsigned.dcm": (NOT_AUTHORIZED, "unsigned"),
        "rogue.dcm": (NOT_AUTHORIZED, "untrusted_signer"),
        "ultrasound.dcm": (CANNOT_UNDERSTAND, "wrong_modality"),
    }
    calls = scp.counting.calls
    results = _store(scp.port, [scp.files / n for n in bad])
    for (status, comment), (want_status, code) in zip(results, bad.values(), strict=True):
        assert status == want_status and comment.startswith(f"{code}: ")
        assert len(comment) <= 64
    assert scp.counting.calls == calls  # nothing refused reached the model
    audited = _audit(scp.audit)[-len(bad) :]
    assert [a["code"] for a in audited] == [c for _, c in bad.values()]
    assert all(a["prediction"] is None and a["reason"] for a in audited)
    assert verify_log(scp.audit).ok


def test_unknown_calling_or_called_ae_title_is_rejected_and_audited(scp: Scp):
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="MEDSEC")
    assert assoc.is_rejected
    assert _audit(scp.audit)[-1]["code"] == "association_rejected"
    assert "dimse:INTRUDER" in _audit(scp.audit)[-1]["reason"]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assert ae.associate("127.0.0.1", scp.port, ae_title="OTHER").is_rejected
    assert verify_log(scp.audit).ok


def test_an_instance_over_the_size_limit_is_cut_off_while_it_arrives(scp: Scp):
    assert _store(scp.small_port, [scp.files / "CT_small.dcm"]) == [(SUCCESS, "")]
    calls = scp.counting.calls
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")  # CR
    assoc = ae.associate("127.0.0.1", scp.small_port, ae_title="MEDSEC")
    assert assoc.is_established
    status = assoc.send_c_store(scp.files / "RG1_UNCI.dcm")  # 7.2 MB
    assert "Status" not in status  # no response: the SCP aborted the association
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established and not assoc.is_released
    line = _audit(scp.audit)[-1]
    assert (line["code"], line["client"]) == ("too_large", "dimse:MODALITY")
    assert "60000 bytes" in line["reason"] and scp.counting.calls == calls
    assert verify_log(scp.audit).ok


def test_tls_listener_needs_tls(scp: Scp):
    ctx = ssl.create_default_context(cafile=str(scp.ca))
    assert _store(scp.tls_port, [scp.files / "CT_small.dcm"], tls=ctx) == [(SUCCESS, "")]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", scp.tls_port, ae_title="MEDSEC")  # plain TCP
    assert not assoc.is_established


def _storescu(scp: Scp, option: str, path: Path) -> tuple[int, str]:
    exe = shutil.which("storescu")
    if exe is None:
        pytest.fail("storescu (DCMTK) is not installed: run `make sysdeps` (apt-get install dcmtk)")
    args = option.split()
    tls = "+tla" in args  # DICOM TLS to the TLS listener, checking its certificate
    port = scp.tls_port if tls else scp.port
    args += ["+cf", str(scp.ca)] if tls else []
    cmd = [exe, "-v", *args, "-aet", "STORESCU", "-aec", "MEDSEC", "127.0.0.1", str(port),
           str(path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    match = re.search(r"Received Store Response \(([^)]*)\)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    return done.returncode, match.group(1)


@pytest.mark.parametrize(
    ("option", "name", "response", "code"),
    [
        ("-xe", "CT_small.dcm", "Success", "ok"),  # explicit VR little endian
        ("-xs", "JPEG-LL.dcm", "Success", "ok"),  # JPEG Lossless SV1, sent as encoded
        ("-xw", "JPEG2000.dcm", "Success", "ok"),  # JPEG 2000
        ("-xr", "MR_small_RLE.dcm", "Success", "ok"),  # RLE Lossless
        ("+tla -xe", "CT_small.dcm", "Success", "ok"),  # over DICOM TLS
        ("-xe", "dcmsign_CT.dcm", "Success", "ok"),  # signed by DCMTK's dcmsign
        ("-xs", "tampered.dcm", "Unknown Status: 0x124", "tampered"),
        ("-xe", "unsigned.dcm", "Unknown Status: 0x124", "unsigned"),
    ],
)
def test_storescu_pushes_to_the_scp(scp: Scp, option: str, name: str, response: str, code: str):
    calls = scp.counting.calls
    # storescu exits 1 on a failure status; DCMTK has no name for 0x0124 (Not Authorized)
    assert _storescu(scp, option, scp.files / name) == (int(code != "ok"), response)
    line = _audit(scp.audit)[-1]
    assert (line["client"], line["code"]) == ("dimse:STORESCU", code)
    assert scp.counting.calls == calls + (code == "ok")
    if code == "ok":
        want = _expected_prediction(scp.model, scp.files / name)
        np.testing.assert_allclose(line["prediction"]["probabilities"], want, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_medsec_serve_also_listens_for_c_store_over_tls(scp: Scp, tmp_path: Path):
    init = init_service_dir(tmp_path / "svc", scp.root / "victim.pt", port=0)
    port = _free_port()
    text = init.config.read_text().replace('modalities = ["OT"]', 'modalities = ["CT"]')
    text = text.replace("resize = false", "resize = true")
    init.config.write_text(text + f'\n[dimse]\nhost = "127.0.0.1"\nport = {port}\n')
    assert init.modality_key is not None and init.modality_cert is not None
    signed = tmp_path / "ct.dcm"
    ct = sign_dataset(pydicom.dcmread(get_testdata_file("CT_small.dcm")), init.modality_key,
                      init.modality_cert)  # fmt: skip
    signed.write_bytes(dataset_bytes(ct))
    code = (
        "import sys; from medsec import cli; from medsec.service import cli as s; "
        "cli._registrars = lambda: [s.register]; sys.exit(cli.main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--config", str(init.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        ctx = ssl.create_default_context(cafile=str(init.ca_cert))
        deadline = time.monotonic() + 40
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "medsec serve did not open the DICOM port"
                time.sleep(0.2)
        assert _store(port, [signed], tls=ctx) == [(SUCCESS, "")]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    log = tmp_path / "svc" / "audit" / "audit.jsonl"
    assert verify_log(log).lines == 1 and _audit(log)[0]["code"] == "ok"


def test_orthanc_pacs_forwards_to_the_scp(scp: Scp, tmp_path: Path):
    """modality (storescu) -> Orthanc (a real PACS) -> C-STORE to medsec: the signatures survive
    the PACS, refused instances fail Orthanc's forward with 0x0124 and never reach the model."""
    orthanc = shutil.which("Orthanc")
    assert orthanc, "Orthanc is not installed: run `make sysdeps` (apt-get install orthanc)"
    http, dicom = _free_port(), _free_port()
    (tmp_path / "db").mkdir()
    config = {
        "Name": "medsec-test", "StorageDirectory": str(tmp_path / "db"),
        "IndexDirectory": str(tmp_path / "db"), "HttpPort": http, "DicomPort": dicom,
        "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [], "DicomModalities": {"medsec": ["MEDSEC", "127.0.0.1", scp.port]},
    }  # fmt: skip
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen([orthanc, str(tmp_path / "orthanc.json")], stdout=log, stderr=log)
    try:
        rest = httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "orthanc.log").read_text()
            try:
                rest.get("/system").raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "Orthanc did not start"
                time.sleep(0.2)
        # distinct SOP Instance UIDs: Orthanc keeps the first instance it gets per UID
        sent = {
            "CT_small.dcm": ("-xe", "ok", 200),
            "JPEG2000.dcm": ("-xw", "ok", 200),
            "tampered.dcm": ("-xs", "tampered", 500),
            "unsigned.dcm": ("-xe", "unsigned", 500),
            "ultrasound.dcm": ("-xv", "wrong_modality", 500),
        }
        for name, (option, _, _) in sent.items():
            cmd = ["storescu", option, "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1",
                   str(dicom), str(scp.files / name)]  # fmt: skip
            assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        stored = {
            i["MainDicomTags"]["SOPInstanceUID"]: i["ID"]
            for i in rest.get("/instances", params={"expand": ""}).json()
        }
        for name, (_, code, http_status) in sent.items():
            calls = scp.counting.calls
            uid = pydicom.dcmread(scp.files / name, stop_before_pixels=True).SOPInstanceUID
            body = {"Resources": [stored[uid]], "Synchronous": True}
            resp = rest.post("/modalities/medsec/store", json=body)
            assert resp.status_code == http_status, resp.text
            if code in ("tampered", "unsigned"):
                assert "0x0124" in resp.json()["Details"]
            line = _audit(scp.audit)[-1]
            assert (line["client"], line["code"], line["sop_instance_uid"]) == (
                "dimse:ORTHANC", code, uid,
            )  # fmt: skip
            assert scp.counting.calls == calls + (code == "ok")
        rest.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert verify_log(scp.audit).ok
