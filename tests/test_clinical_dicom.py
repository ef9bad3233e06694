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
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from clinical_service import (
    CLINICAL,
    SIZE,
    Clinical,
    CountingModel,
    dcmsign_signed,
    make_clinical,
    read,
    serving,
    signed_bytes,
)
from medsec.errors import MedsecError
from medsec.imaging.pixels import InputContract, dicom_image, fit_image
from medsec.integrity import (
    TrustStore,
    dicom_to_image,
    generate_signer,
    image_to_dicom,
)
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.models import create_model, save_checkpoint
from medsec.service.app import ServiceState
from medsec.service.config import DimseSection, ImageRules, parse_config
from medsec.service.gate import ImagePolicy, Refusal, check_upload


def _image(name: str, intensity: str = "stored", window=None) -> np.ndarray:
    return dicom_image(read(name), intensity, window)


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


def test_checkpoint_contract_must_fit_the_model(tmp_path: Path):
    meta = {"in_channels": 1, "image_size": SIZE, "input": InputContract(3, SIZE).to_dict()}
    with pytest.raises(MedsecError, match="disagrees"):
        InputContract.from_checkpoint_meta(meta)
    with pytest.raises(MedsecError, match="malformed"):
        InputContract.from_dict({"channels": 1})
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=SIZE)
    with pytest.raises(MedsecError, match="does not fit the model"):
        save_checkpoint(
            tmp_path / "m.pt", model, arch="small-cnn", data_hash="x", image_size=SIZE,
            metrics={}, settings={}, input_contract=InputContract(1, 128).to_dict(),
        )  # fmt: skip
    assert not (tmp_path / "m.pt").exists()


def test_monochrome1_cr_is_inverted_over_its_15_bit_range():
    ds = read("RG1_UNCI.dcm")
    stored = ds.pixel_array.astype(np.float64)
    assert (ds.BitsStored, ds.PhotometricInterpretation) == (15, "MONOCHROME1")
    x = dicom_image(ds, "stored")[0]
    np.testing.assert_allclose(x, 1 - stored / (2**15 - 1), atol=1e-6)
    viewer = dicom_image(ds, "voi-minmax")[0]
    assert viewer.shape == (1955, 1841) and viewer.min() == 0 and viewer.max() == 1
    # the densest stored value is the darkest after MONOCHROME1 inversion
    assert viewer.flat[int(np.argmax(stored))] == pytest.approx(0.0)


def test_ct_rescale_and_fixed_window_in_hounsfield_units():
    ds = read("CT_small.dcm")
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
    assert read(compressed).file_meta.TransferSyntaxUID.is_compressed
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
    broken = read("MR_small_RLE.dcm")
    broken.PixelData = broken.PixelData[:-400]
    with pytest.raises(MedsecError, match="cannot decode pixel data"):
        dicom_image(broken)
    with pytest.raises(MedsecError, match="window goes with"):
        InputContract(1, SIZE, "voi-minmax", (40.0, 400.0))


# ------------------------------------------------------------- the service, over TLS


@pytest.fixture(scope="module")
def clinical(tmp_path_factory: pytest.TempPathFactory) -> Clinical:
    return make_clinical(tmp_path_factory.mktemp("clinical"))


@pytest.fixture(scope="module")
def served(clinical: Clinical) -> Iterator[tuple[httpx.Client, ServiceState, CountingModel]]:
    with serving(clinical) as running:
        yield running


def _post(client: httpx.Client, body: bytes, token: str) -> httpx.Response:
    headers = {"Content-Type": "application/dicom", "Authorization": f"Bearer {token}"}
    return client.post("/v1/predict", content=body, headers=headers)


def test_signed_clinical_files_are_classified_as_the_loader_reads_them(clinical, served):
    client, state, counting = served
    assert state.policy.contract == InputContract(1, SIZE, "voi-minmax")
    info = client.get("/v1/info", headers={"Authorization": f"Bearer {clinical.token}"})
    assert info.json()["model"]["input"]["intensity"] == "voi-minmax"
    for i, name in enumerate(clinical.names):
        body = signed_bytes(name, clinical.key, clinical.cert)
        before = counting.calls
        resp = _post(client, body, clinical.token)
        assert resp.status_code == 200, (name, resp.text)
        out = resp.json()
        ds = read(name)
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
    signed = pydicom.dcmread(io.BytesIO(signed_bytes("JPEG-LL.dcm", clinical.key, clinical.cert)))
    frag = bytearray(signed.PixelData)
    frag[len(frag) // 2] ^= 0x01  # one bit of the JPEG Lossless bit stream
    signed.PixelData = bytes(frag)
    rogue_key, rogue_cert = generate_signer(tmp_path / "rogue", "rogue modality")
    before = counting.calls
    tampered = _post(client, dataset_bytes(signed), clinical.token)
    assert (tampered.status_code, tampered.json()["code"]) == (403, "tampered")
    rogue = _post(client, signed_bytes("CT_small.dcm", rogue_key, rogue_cert), clinical.token)
    assert (rogue.status_code, rogue.json()["code"]) == (403, "untrusted_signer")
    unsigned = _post(client, Path(get_testdata_file("MR_small.dcm")).read_bytes(), clinical.token)
    assert (unsigned.status_code, unsigned.json()["code"]) == (403, "unsigned")
    assert counting.calls == before


def test_dcmsign_signed_ct_is_accepted(clinical, served, tmp_path: Path):
    body = dcmsign_signed("CT_small.dcm", clinical.key, clinical.cert, tmp_path / "ct.dcm")
    resp = _post(served[0], body, clinical.token)
    assert resp.status_code == 200, resp.text
    assert resp.json()["verification"]["signatures"][0]["creator"] is True


def test_rgb_ultrasound_j2k_through_the_gate(tmp_path: Path):
    key, cert = generate_signer(tmp_path / "us", "ultrasound")
    body = signed_bytes("US1_J2KR.dcm", key, cert)
    rules = ImageRules(modalities=("US",), resize=True)
    policy = ImagePolicy(TrustStore.from_dir(tmp_path / "us"), 3, SIZE, rules)
    checked = check_upload(body, policy)
    want = fit_image(_image("US1_J2KR.dcm"), InputContract(3, SIZE))
    np.testing.assert_array_equal(checked.tensor[0].numpy(), want)
    grey = ImagePolicy(policy.trust, 1, SIZE, rules)
    with pytest.raises(Refusal) as exc:
        check_upload(body, grey)
    assert (exc.value.http_status, exc.value.code) == (422, "wrong_shape")


# ------------------------------------------------------------- config sections


def _config(dimse: str) -> dict:
    base = """
[tls]
cert = "c.pem"
key = "k.pem"
[model]
checkpoint = "m.pt"
manifest = "m.sig"
trust = "t"
[images]
trust = "i"
[audit]
path = "a.jsonl"
[[clients]]
name = "a"
token_sha256 = "%s"
""" % ("0" * 64)
    return tomllib.loads(base + dimse)


def test_dimse_and_results_config_sections_are_validated():
    plain = parse_config(_config(""), Path("/x"))
    assert plain.dimse is None and plain.results is None
    results = parse_config(_config('[results]\ndir = "r"\nkey = "k"\ncert = "c"'), Path("/x"))
    assert results.results is not None and results.results.dir == Path("/x/r")
    with pytest.raises(MedsecError, match=r"\[results\]: missing 'cert'"):
        parse_config(_config('[results]\ndir = "r"\nkey = "k"'), Path("/x"))
    dimse = parse_config(_config('[dimse]\ncalling_ae_titles = ["CT1"]'), Path("/x")).dimse
    assert dimse == DimseSection(host=None, port=11112, ae_title="MEDSEC",
                                 calling_ae_titles=("CT1",), tls=True)  # fmt: skip
    for bad, message in [
        ('ae_title = "A_TITLE_FAR_TOO_LONG"', "not an AE title"),
        ('calling_ae_titles = ["OK", ""]', "not an AE title"),
        ("port = 70000", "less than or equal to 65535"),
        ('tls = "yes"', "valid boolean"),
        ("aet = 1", "unknown key 'aet'"),
    ]:
        with pytest.raises(MedsecError, match=message):
            parse_config(_config(f"[dimse]\n{bad}"), Path("/x"))
