"""Clinical DICOM end to end: real CR/CT/MR/NM files, compressed syntaxes, one pixel path.

Real files from pydicom's and pydicom-data's test sets (a 15-bit MONOCHROME1 CR, a 16-bit
signed CT with rescale, an MR, JPEG Lossless, JPEG 2000 and RLE encodings) go through
:mod:`medsec.imaging.pixels` exactly as the ``dicom:`` loader and the service read them; signed
with medsec (and with DCMTK's dcmsign), they are accepted and classified by the real service
over TLS with the prediction of the image the loader produced, and refused when tampered or
signed by an unknown key, before the model is ever called.
"""

from __future__ import annotations

import io
import shutil
import ssl
import subprocess
import threading
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
from pydicom.dataset import Dataset

from medsec.data.base import Dataset as Images
from medsec.data.dicom import load_dicom_csv
from medsec.errors import MedsecError
from medsec.imaging.pixels import InputContract, dicom_image, fit_image
from medsec.integrity import (
    TrustStore,
    dicom_to_image,
    generate_signer,
    image_to_dicom,
    sign_dataset,
)
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.models import create_model, load_checkpoint, save_checkpoint
from medsec.service.app import ServiceState
from medsec.service.bootstrap import init_service_dir
from medsec.service.config import ImageRules, load_config
from medsec.service.gate import ImagePolicy, Refusal, check_upload
from medsec.service.server import build_state, make_server

SIZE = 64
# name -> (modality, transfer syntax keyword): every file the service must accept.
CLINICAL = {
    "RG1_UNCI.dcm": ("CR", "ExplicitVRLittleEndian"),  # 15-bit MONOCHROME1
    "CT_small.dcm": ("CT", "ExplicitVRLittleEndian"),  # 16-bit signed, rescale
    "MR_small.dcm": ("MR", "ExplicitVRLittleEndian"),
    "JPEG-LL.dcm": ("NM", "JPEGLosslessSV1"),
    "JPEG2000.dcm": ("NM", "JPEG2000"),
    "MR_small_RLE.dcm": ("MR", "RLELossless"),
}


def _read(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _image(name: str, intensity: str = "stored", window=None) -> np.ndarray:
    return dicom_image(_read(name), intensity, window)


# ------------------------------------------------------------------------ the pixel path


def test_stored_contract_is_the_secondary_capture_decoding():
    """Old checkpoints (no contract) see medsec's 8-bit captures exactly as before."""
    rng = np.random.default_rng(0)
    for image in (rng.random((40, 48), np.float32), rng.random((3, 40, 48), np.float32)):
        ds = image_to_dicom(image)
        want = dicom_to_image(ds)
        np.testing.assert_array_equal(dicom_image(ds), want if want.ndim == 3 else want[None])
    meta = {"in_channels": 1, "image_size": SIZE}
    assert InputContract.from_checkpoint_meta(meta) == InputContract(1, SIZE, "stored")


def test_monochrome1_cr_is_inverted_over_its_15_bit_range():
    ds = _read("RG1_UNCI.dcm")
    stored = ds.pixel_array.astype(np.float64)
    assert (ds.BitsStored, ds.PhotometricInterpretation) == (15, "MONOCHROME1")
    x = dicom_image(ds, "stored")[0]
    np.testing.assert_allclose(x, 1 - stored / (2**15 - 1), atol=1e-6)
    viewer = dicom_image(ds, "voi-minmax")[0]
    assert viewer.shape == (1955, 1841) and viewer.min() == 0 and viewer.max() == 1
    # the densest stored value is the darkest after MONOCHROME1 inversion
    assert viewer.flat[int(np.argmax(stored))] == pytest.approx(0.0)


def test_ct_rescale_and_fixed_window_in_hounsfield_units():
    ds = _read("CT_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert ds.PixelRepresentation == 1 and float(ds.RescaleIntercept) != 0
    x = dicom_image(ds, "window", (40.0, 400.0))[0]
    # PS3.3 C.11.2.1.2.1 LINEAR: below c-0.5-(w-1)/2 -> 0, above c-0.5+(w-1)/2 -> 1
    lo, hi = 39.5 - 399 / 2, 39.5 + 399 / 2
    want = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    want[hu <= lo], want[hu > hi] = 0.0, 1.0
    np.testing.assert_allclose(x, want, atol=1e-6)
    assert 0 < (x == 0).mean() < 1 and ((x > 0) & (x < 1)).mean() > 0
    signed = dicom_image(ds, "stored")[0]
    np.testing.assert_allclose(signed, (ds.pixel_array + 32768.0) / 65535, atol=1e-6)


@pytest.mark.parametrize(
    ("compressed", "plain"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),
    ],
)
def test_lossless_encodings_decode_to_the_same_image(compressed: str, plain: str):
    assert _read(compressed).file_meta.TransferSyntaxUID.is_compressed
    for intensity in ("stored", "voi-minmax"):
        np.testing.assert_array_equal(_image(compressed, intensity), _image(plain, intensity))


def test_ybr_is_rgb_and_bad_inputs_are_one_line_errors():
    ybr = _image("SC_ybr_full_uncompressed.dcm")
    assert ybr.shape == (3, 100, 100)
    assert np.abs(ybr - _image("SC_rgb.dcm")).max() <= 6 / 255  # YBR_FULL rounding
    with pytest.raises(MedsecError, match="grey images only"):
        _image("SC_rgb.dcm", "window", (40.0, 400.0))
    with pytest.raises(MedsecError, match="multi-frame"):
        _image("emri_small_jpeg_2k_lossless.dcm")
    broken = _read("MR_small_RLE.dcm")
    broken.PixelData = broken.PixelData[:-400]
    with pytest.raises(MedsecError, match="cannot decode pixel data"):
        dicom_image(broken)
    with pytest.raises(MedsecError, match="window goes with"):
        InputContract(1, SIZE, "voi-minmax", (40.0, 400.0))


# ------------------------------------------------------------- the service, over TLS


@dataclass
class Clinical:
    config_path: Path
    token: str
    ca: ssl.SSLContext
    key: Path
    cert: Path
    data: Images  # what the dicom: loader made of the same files
    names: list[str]
    model: torch.nn.Module


class CountingModel(torch.nn.Module):
    """The served model, counting its calls: proves nothing refused reaches it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


@pytest.fixture(scope="module")
def clinical(tmp_path_factory: pytest.TempPathFactory) -> Clinical:
    root = tmp_path_factory.mktemp("clinical")
    names = list(CLINICAL)
    table = root / "labels.csv"
    rows = [f"{get_testdata_file(n)},{i % 2},{s}" for s in ("train", "test") for i, n in
            enumerate(names)]  # fmt: skip
    table.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    data = load_dicom_csv(str(table), size=SIZE, val_fraction=0.0)
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=SIZE).eval()
    save_checkpoint(
        root / "victim.pt", model, arch="small-cnn", data_hash=data.content_hash,
        image_size=SIZE, metrics={}, settings={}, input_contract=data.provenance["input"],
    )  # fmt: skip
    assert load_checkpoint(root / "victim.pt")[1]["input"]["intensity"] == "voi-minmax"
    result = init_service_dir(root / "svc", root / "victim.pt", port=0, client="pacs")
    text = result.config.read_text()
    text = text.replace("max_body_bytes = 1048576", "max_body_bytes = 16777216")
    text = text.replace('modalities = ["OT"]', 'modalities = ["CR", "CT", "MR", "NM"]')
    text = text.replace("resize = false", "resize = true")
    result.config.write_text(text)
    assert result.modality_key is not None and result.modality_cert is not None
    return Clinical(
        config_path=result.config,
        token=result.token,
        ca=ssl.create_default_context(cafile=str(result.ca_cert)),
        key=result.modality_key,
        cert=result.modality_cert,
        data=data,
        names=names,
        model=model,
    )


@pytest.fixture(scope="module")
def served(clinical: Clinical) -> Iterator[tuple[httpx.Client, ServiceState, CountingModel]]:
    state = build_state(load_config(clinical.config_path))
    counting = CountingModel(state.model)
    state.model = counting  # type: ignore[assignment]
    server = make_server(state, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    with httpx.Client(base_url=url, verify=clinical.ca, timeout=60) as client:
        yield client, state, counting
    server.should_exit = True
    thread.join(timeout=20)
    state.audit.close()


def _post(client: httpx.Client, body: bytes, token: str) -> httpx.Response:
    headers = {"Content-Type": "application/dicom", "Authorization": f"Bearer {token}"}
    return client.post("/v1/predict", content=body, headers=headers)


def _signed_bytes(name: str, key: Path, cert: Path) -> bytes:
    return dataset_bytes(sign_dataset(_read(name), key, cert, profile="creator"))


def test_signed_clinical_files_are_classified_as_the_loader_reads_them(clinical, served):
    client, state, counting = served
    assert state.policy.contract == InputContract(1, SIZE, "voi-minmax")
    info = client.get("/v1/info", headers={"Authorization": f"Bearer {clinical.token}"})
    assert info.json()["model"]["input"]["intensity"] == "voi-minmax"
    for i, name in enumerate(clinical.names):
        body = _signed_bytes(name, clinical.key, clinical.cert)
        before = counting.calls
        resp = _post(client, body, clinical.token)
        assert resp.status_code == 200, (name, resp.text)
        out = resp.json()
        ds = _read(name)
        assert ds.file_meta.TransferSyntaxUID == getattr(pydicom.uid, CLINICAL[name][1])
        assert ds.Modality == CLINICAL[name][0]
        assert out["verification"]["status"] == "VERIFIED"
        assert out["resized"] is ((ds.Rows, ds.Columns) != (SIZE, SIZE))
        assert counting.calls == before + 1
        # the loader's test image i is this file: the service fed the model that image
        x = torch.from_numpy(clinical.data.test.images[i : i + 1])
        with torch.no_grad():
            want = torch.softmax(clinical.model(x), 1)[0].numpy()
        np.testing.assert_allclose(out["prediction"]["probabilities"], want, atol=1e-5)


def test_tampered_compressed_stream_and_unknown_signer_never_reach_the_model(
    clinical, served, tmp_path: Path
):
    client, _, counting = served
    signed = pydicom.dcmread(io.BytesIO(_signed_bytes("JPEG-LL.dcm", clinical.key, clinical.cert)))
    frag = bytearray(signed.PixelData)
    frag[len(frag) // 2] ^= 0x01  # one bit of the JPEG Lossless bit stream
    signed.PixelData = bytes(frag)
    rogue_key, rogue_cert = generate_signer(tmp_path / "rogue", "rogue modality")
    before = counting.calls
    tampered = _post(client, dataset_bytes(signed), clinical.token)
    assert (tampered.status_code, tampered.json()["code"]) == (403, "tampered")
    rogue = _post(client, _signed_bytes("CT_small.dcm", rogue_key, rogue_cert), clinical.token)
    assert (rogue.status_code, rogue.json()["code"]) == (403, "untrusted_signer")
    unsigned = _post(client, Path(get_testdata_file("MR_small.dcm")).read_bytes(), clinical.token)
    assert (unsigned.status_code, unsigned.json()["code"]) == (403, "unsigned")
    assert counting.calls == before


def test_dcmsign_signed_ct_is_accepted(clinical, served, tmp_path: Path):
    dcmsign = shutil.which("dcmsign")
    if dcmsign is None:
        pytest.fail("dcmsign (DCMTK) is not installed: run `make sysdeps` (apt-get install dcmtk)")
    out = tmp_path / "ct_dcmsign.dcm"
    cmd = [dcmsign, "--sign", str(clinical.key), str(clinical.cert), "--profile-creator",
           "--mac-sha256", get_testdata_file("CT_small.dcm"), str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resp = _post(served[0], out.read_bytes(), clinical.token)
    assert resp.status_code == 200, resp.text
    assert resp.json()["verification"]["signatures"][0]["creator"] is True


def test_rgb_ultrasound_j2k_through_the_gate(tmp_path: Path):
    key, cert = generate_signer(tmp_path / "us", "ultrasound")
    body = _signed_bytes("US1_J2KR.dcm", key, cert)
    rules = ImageRules(modalities=("US",), resize=True)
    policy = ImagePolicy(TrustStore.from_dir(tmp_path / "us"), 3, SIZE, rules)
    checked = check_upload(body, policy)
    want = fit_image(_image("US1_J2KR.dcm"), InputContract(3, SIZE))
    np.testing.assert_array_equal(checked.tensor[0].numpy(), want)
    grey = ImagePolicy(policy.trust, 1, SIZE, rules)
    with pytest.raises(Refusal) as exc:
        check_upload(body, grey)
    assert (exc.value.http_status, exc.value.code) == (422, "wrong_shape")
