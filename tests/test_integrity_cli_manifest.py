"""`medsec keys/sign/verify` exit codes, and signed manifests for non-DICOM data."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medsec.errors import MedsecError
from medsec.integrity import TrustStore
from medsec.integrity.cli import register
from medsec.integrity.manifest import build_manifest, verify_manifest


def run(*argv: str | Path) -> int:
    """The verbs as the medsec CLI runs them (MedsecError -> its exit code)."""
    parser = argparse.ArgumentParser(prog="medsec")
    sub = parser.add_subparsers(dest="verb", required=True)
    register(sub)
    args = parser.parse_args([str(a) for a in argv])
    try:
        return int(args.func(args))
    except MedsecError as exc:
        return exc.exit_code


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    assert run("keys", "ca", "--out", root / "ca") == 0
    assert run("keys", "init", "--out", root / "rsa", "--ca-dir", root / "ca") == 0
    assert run("keys", "init", "--out", root / "ed", "--type", "ed25519") == 0
    assert run("keys", "init", "--out", root / "rogue") == 0
    (root / "trust").mkdir()
    shutil.copy(root / "ca" / "ca_cert.pem", root / "trust")
    shutil.copy(root / "ed" / "signer_cert.pem", root / "trust" / "ed.pem")
    return root


def test_keys_refuse_overwrite_and_key_mode(keys: Path, capsys: pytest.CaptureFixture) -> None:
    assert (keys / "rsa" / "signer_key.pem").stat().st_mode & 0o777 == 0o600
    assert run("keys", "init", "--out", keys / "rsa") == 2
    assert "BEGIN" not in capsys.readouterr().out  # key material is never printed


def test_dicom_exit_codes(keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = Path(get_testdata_file("CT_small.dcm"))
    signed, k = tmp_path / "s.dcm", keys / "rsa"
    assert run("sign", src, signed, "--key", k / "signer_key.pem",
               "--cert", k / "signer_cert.pem") == 0  # fmt: skip
    trust = keys / "trust"
    assert run("verify", signed, "--trust", trust, "--require-creator") == 0
    # exit 1: tampered pixel data
    ds = pydicom.dcmread(signed)
    px = bytearray(ds.PixelData)
    px[100] ^= 1
    ds.PixelData = bytes(px)
    ds.save_as(tmp_path / "t.dcm")
    capsys.readouterr()
    assert run("verify", tmp_path / "t.dcm", "--trust", trust) == 1
    assert "signature #1" in capsys.readouterr().err
    # exit 3: stripped, signatures required by default; 0 only in the lax mode
    ds = pydicom.dcmread(signed)
    del ds.DigitalSignaturesSequence
    del ds.MACParametersSequence
    ds.save_as(tmp_path / "stripped.dcm")
    assert run("verify", tmp_path / "stripped.dcm", "--trust", trust, "--require-signature") == 3
    assert run("verify", tmp_path / "stripped.dcm", "--trust", trust) == 3
    capsys.readouterr()
    assert run("verify", tmp_path / "stripped.dcm", "--trust", trust, "--allow-unsigned") == 0
    assert "NOT VERIFIED" in capsys.readouterr().out
    # exit 4: untrusted signer
    rogue = tmp_path / "rogue.dcm"
    assert run("sign", src, rogue, "--key", keys / "rogue" / "signer_key.pem",
               "--cert", keys / "rogue" / "signer_cert.pem") == 0  # fmt: skip
    assert run("verify", rogue, "--trust", trust) == 4
    # exit 2: truncated file, missing trust store, existing output
    (tmp_path / "cut.dcm").write_bytes(signed.read_bytes()[:1000])
    assert run("verify", tmp_path / "cut.dcm", "--trust", trust) == 2
    assert run("verify", signed, "--trust", tmp_path / "nowhere") == 2
    assert run("sign", src, signed, "--key", k / "signer_key.pem",
               "--cert", k / "signer_cert.pem") == 2  # fmt: skip


def test_creator_required_exit_5(keys: Path, tmp_path: Path) -> None:
    ec_dir = tmp_path / "ec"
    assert run("keys", "init", "--out", ec_dir, "--type", "ec") == 0
    signed = tmp_path / "ec.dcm"
    key, cert = ec_dir / "signer_key.pem", ec_dir / "signer_cert.pem"
    src = get_testdata_file("MR_small.dcm")
    assert run("sign", src, signed, "--profile", "none", "--key", key, "--cert", cert) == 0
    assert run("verify", signed, "--trust", ec_dir) == 0
    assert run("verify", signed, "--trust", ec_dir, "--require-creator") == 5


def test_verify_help_documents_exit_codes(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run("verify", "--help")
    out = capsys.readouterr().out
    for code in ("0  verified", "1  verification failed", "2  usage", "3  signature required",
                 "4  signature valid but signer not trusted", "5  no signature meets"):  # fmt: skip
        assert code in out


def test_manifest_npz_and_png(keys: Path, tmp_path: Path) -> None:
    ed = keys / "ed"
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    np.savez(npz, images=rng.random((4, 8, 8)).astype(np.float32), labels=np.arange(4))
    png = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(png)
    trust = keys / "trust"
    for data in (npz, png):
        manifest = Path(f"{data}.sig.json")
        assert run("sign", data, manifest, "--key", ed / "signer_key.pem",
                   "--cert", ed / "signer_cert.pem", "--meta", "split=test") == 0  # fmt: skip
        assert json.loads(manifest.read_text())["payload"]["metadata"] == {"split": "test"}
        assert run("verify", data, "--trust", trust, "--require-signature") == 0
        assert run("verify", data, "--trust", keys / "rogue") == 4
    # One pixel, one label: both caught. A re-encoded but identical PNG still verifies.
    z = dict(np.load(npz))
    z["labels"][2] += 1
    np.savez(npz, **z)
    assert run("verify", npz, "--trust", trust) == 1
    Image.open(png).save(tmp_path / "img2.png", compress_level=1)
    shutil.copy(f"{png}.sig.json", tmp_path / "img2.png.sig.json")
    assert run("verify", tmp_path / "img2.png", "--trust", trust) == 0
    pixels = np.asarray(Image.open(png)).copy()
    pixels[3, 4] ^= 1
    Image.fromarray(pixels).save(png)
    assert run("verify", png, "--trust", trust) == 1
    Path(f"{png}.sig.json").unlink()
    assert run("verify", png, "--trust", trust, "--require-signature") == 3


def test_manifest_api_rejects_each_change(keys: Path) -> None:
    ed = keys / "ed"
    trust = TrustStore.from_dir(keys / "trust")
    arrays = {"x": np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 4)}
    m = build_manifest(arrays, ed / "signer_key.pem", ed / "signer_cert.pem",
                       metadata={"label": 1})  # fmt: skip
    assert verify_manifest(m, arrays, trust, metadata={"label": 1}).ok
    # Byte order does not matter (canonical little-endian), values do.
    assert verify_manifest(m, {"x": arrays["x"].astype(">f8")}, trust).ok
    assert "shape" in verify_manifest(m, {"x": arrays["x"].reshape(4, 3)}, trust).reason
    assert "dtype" in verify_manifest(m, {"x": arrays["x"].astype(np.float32)}, trust).reason
    changed = arrays["x"].copy()
    changed[1, 2] = np.nextafter(changed[1, 2], 2)
    assert "sha256" in verify_manifest(m, {"x": changed}, trust).reason
    assert not verify_manifest(m, arrays, trust, metadata={"label": 0}).ok
    forged = json.loads(json.dumps(m))
    forged["payload"]["metadata"]["label"] = 0
    assert "signature does not match" in verify_manifest(forged, arrays, trust).reason
    # A genuine manifest by a different key in place of the signer's: untrusted.
    rogue = keys / "rogue"
    other = build_manifest(arrays, rogue / "signer_key.pem", rogue / "signer_cert.pem")
    assert verify_manifest(other, arrays, trust).exit_code == 4
