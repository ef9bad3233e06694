"""DICOM signatures: byte stream vs dcmsign, the interop matrix, MACs, keys, policies."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medsec.integrity import (
    Status,
    TrustStore,
    generate_ca,
    generate_signer,
    image_to_dicom,
    issue_signer,
    sign_dataset,
    sign_file,
    verify_dataset,
)
from medsec.integrity.dicom_signature import dataset_bytes, mac_stream_bytes

DCMSIGN = shutil.which("dcmsign")


def _dcmsign() -> str:
    if DCMSIGN is None:
        pytest.fail("dcmsign (DCMTK) is not installed: run `make sysdeps` (apt-get install dcmtk)")
    return DCMSIGN


def dcmsign(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_dcmsign(), *map(str, args)], capture_output=True, text=True, timeout=60)


def dcm_verify(path: Path, cert: Path, *policy: str) -> int:
    return dcmsign("--verify", "+cf", cert, *policy, path).returncode


@dataclass(frozen=True)
class Signer:
    key: Path
    cert: Path
    trust: TrustStore
    anchor: Path  # what dcmsign gets with +cf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Signer]:
    root = tmp_path_factory.mktemp("pki")
    out: dict[str, Signer] = {}
    for name, key_type in (("rsa", "rsa"), ("other", "rsa"), ("ec", "ec")):
        key, cert = generate_signer(root / name, f"modality {name}", key_type=key_type)
        out[name] = Signer(key, cert, TrustStore.from_dir(root / name), cert)
    ca_key, ca_cert = generate_ca(root / "ca")
    key, cert = issue_signer(ca_key, ca_cert, root / "issued", "CT scanner 7")
    trust_dir = root / "ca_trust"
    trust_dir.mkdir()
    shutil.copy(ca_cert, trust_dir / "ca.pem")
    out["issued"] = Signer(key, cert, TrustStore.from_dir(trust_dir), ca_cert)
    return out


def _generated(tmp: Path, name: str, shape: tuple[int, ...]) -> Path:
    image = np.random.default_rng(len(shape)).random(shape).astype(np.float32)
    path = tmp / f"{name}.dcm"
    image_to_dicom(image, seed=3).save_as(path, enforce_file_format=True)
    return path


# pydicom-data / pydicom test files covering the encodings a verifier meets.
REAL_FILES = [
    "RG1_UNCI.dcm",  # 1955x1841 chest radiograph
    "CT_small.dcm",  # explicit VR LE with many private elements
    "MR_small.dcm",
    "MR_small_implicit.dcm",  # implicit VR
    "MR_small_bigendian.dcm",  # explicit VR big endian (OW byte-swapped for the MAC)
    "JPEG2000.dcm",  # encapsulated pixel data and nested sequences
    "MR_small_jp2klossless.dcm",  # GDCM wrote its encapsulated pixel data as OW (not OB)
    "MR_small_jpeg_ls_lossless.dcm",  # the same, JPEG-LS
    "SC_rgb.dcm",
    "rtplan.dcm",  # deep sequences, no pixel data
]
GENERATED = {"gen_mono": (64, 48), "gen_rgb": (3, 32, 40)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("src")
    found = {n: Path(get_testdata_file(n)) for n in REAL_FILES}
    for name, shape in GENERATED.items():
        found[name] = _generated(tmp, name, shape)
    return found


ALL_SOURCES = REAL_FILES + list(GENERATED)


def tamper(path: Path, out: Path) -> str:
    """Change one signed value (a pixel byte, or a name without pixel data); return what."""
    ds = pydicom.dcmread(path)
    if "PixelData" in ds:
        data = bytearray(ds.PixelData)
        i = len(data) * 2 // 3
        data[i] = (data[i] + 1) % 256
        ds.PixelData = bytes(data)
        what = "pixel"
    else:
        ds.PatientName = "Tampered^Name"
        what = "header"
    ds.save_as(out)
    return what


@pytest.mark.parametrize("name", ALL_SOURCES)
def test_mac_stream_matches_dcmsign_dump(
    name: str, sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    s = pki["rsa"]
    signed, dump = tmp_path / "s.dcm", tmp_path / "stream.bin"
    r = dcmsign("--sign", s.key, s.cert, "--mac-sha256", "--dump", dump, sources[name], signed)
    assert r.returncode == 0, r.stderr
    assert mac_stream_bytes(pydicom.dcmread(signed)) == dump.read_bytes()


@pytest.mark.parametrize("name", ALL_SOURCES)
@pytest.mark.parametrize("signed_by", ["medsec", "dcmsign"])
def test_interop_matrix(
    name: str, signed_by: str, sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    """Signed by medsec/dcmsign x verified by medsec/dcmsign x clean/tampered."""
    s = pki["rsa"]
    signed = tmp_path / "signed.dcm"
    if signed_by == "medsec":
        sign_file(sources[name], signed, s.key, s.cert, profile="creator")
    else:
        # dcmsign's default MAC is RIPEMD-160, which medsec must verify without cryptography.
        mac = "--mac-ripemd160" if ALL_SOURCES.index(name) % 2 else "--mac-sha256"
        r = dcmsign("--sign", s.key, s.cert, "--profile-creator", mac, sources[name], signed)
        assert r.returncode == 0, r.stderr
    clean = verify_dataset(signed, s.trust, require_creator=True)
    assert clean.ok, clean.reason
    assert clean.status is Status.VERIFIED
    assert dcm_verify(signed, s.anchor, "--require-creator") == 0

    tampered = tmp_path / "tampered.dcm"
    tamper(signed, tampered)
    bad = verify_dataset(tampered, s.trust)
    assert not bad.ok
    assert bad.status is Status.INVALID
    assert "signature #1" in bad.reason and "does not match" in bad.reason
    assert dcm_verify(tampered, s.anchor) == 101


@pytest.mark.parametrize("mac", ["ripemd160", "md5", "sha1", "sha256", "sha384", "sha512"])
def test_every_mac_algorithm_from_dcmsign_verifies(
    mac: str, sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    s = pki["rsa"]
    signed = tmp_path / "s.dcm"
    r = dcmsign("--sign", s.key, s.cert, f"--mac-{mac}", sources["CT_small.dcm"], signed)
    assert r.returncode == 0, r.stderr
    result = verify_dataset(signed, s.trust)
    assert result.ok, result.reason
    assert result.signatures[0].mac_algorithm == mac.upper()
    tamper(signed, tmp_path / "t.dcm")
    assert verify_dataset(tmp_path / "t.dcm", s.trust).status is Status.INVALID


@pytest.mark.parametrize("mac", ["sha384", "sha512"])
def test_medsec_sha2_variants_verify_in_dcmsign(
    mac: str, sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    s = pki["issued"]
    out = sign_file(sources["MR_small.dcm"], tmp_path / "s.dcm", s.key, s.cert, mac=mac)
    assert verify_dataset(out, s.trust).ok
    assert dcm_verify(out, s.anchor, "--require-sig") == 0


def test_weak_mac_refused_for_new_signatures(
    sources: dict[str, Path], pki: dict[str, Signer]
) -> None:
    ds = pydicom.dcmread(sources["CT_small.dcm"])
    with pytest.raises(Exception, match="not allowed for new signatures"):
        sign_dataset(ds, pki["rsa"].key, pki["rsa"].cert, mac="md5")


def test_ec_signatures_both_ways(
    sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    s = pki["ec"]
    mine = sign_file(sources["CT_small.dcm"], tmp_path / "m.dcm", s.key, s.cert, profile="none")
    assert verify_dataset(mine, s.trust).ok
    assert dcm_verify(mine, s.anchor) == 0
    theirs = tmp_path / "d.dcm"
    r = dcmsign("--sign", s.key, s.cert, "--mac-sha256", sources["CT_small.dcm"], theirs)
    assert r.returncode == 0, r.stderr
    assert verify_dataset(theirs, s.trust).ok
    # An EC signature is not a Creator *RSA* signature, for medsec and for dcmsign.
    creator = verify_dataset(theirs, s.trust, require_creator=True)
    assert creator.status is Status.PROFILE and "Creator RSA" in creator.reason
    assert dcm_verify(theirs, s.anchor, "--require-creator") != 0
    with pytest.raises(Exception, match="needs an RSA key"):
        sign_file(sources["CT_small.dcm"], tmp_path / "x.dcm", s.key, s.cert, profile="creator")


def test_several_signatures_both_ways(
    sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    a, b = pki["rsa"], pki["issued"]
    ds = pydicom.dcmread(sources["CT_small.dcm"])
    sign_dataset(ds, a.key, a.cert)
    sign_dataset(ds, b.key, b.cert, profile="base")
    assert [int(i.MACIDNumber) for i in ds.MACParametersSequence] == [0, 1]
    both = TrustStore(a.trust.anchors + b.trust.anchors)
    path = tmp_path / "two.dcm"
    ds.save_as(path)
    result = verify_dataset(path, both)
    assert result.ok and len(result.signatures) == 2, result.reason
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(a.anchor.read_bytes() + b.anchor.read_bytes())
    assert dcm_verify(path, anchors) == 0
    # Only one signer trusted: the other signature is named as untrusted.
    partial = verify_dataset(path, a.trust)
    assert partial.status is Status.UNTRUSTED and partial.reason.startswith("signature #2")
    # dcmsign adds a third signature on top of medsec's two.
    three = tmp_path / "three.dcm"
    r = dcmsign("--sign", a.key, a.cert, "--mac-sha512", path, three)
    assert r.returncode == 0, r.stderr
    result = verify_dataset(three, both)
    assert result.ok and len(result.signatures) == 3, result.reason


def test_signature_in_sequence_item(
    sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    s = pki["rsa"]
    out = tmp_path / "item.dcm"
    r = dcmsign("--sign-item", s.key, s.cert, "BeamSequence[0]", "--mac-sha256",
                sources["rtplan.dcm"], out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    strict = verify_dataset(out, s.trust)
    assert strict.status is Status.INVALID and "not covered" in strict.reason
    relaxed = verify_dataset(out, s.trust, allow_unsigned_elements=True)
    assert relaxed.ok, relaxed.reason
    assert relaxed.signatures[0].location == "(300A,00B0)[0]"
    ds = pydicom.dcmread(out)
    ds.BeamSequence[0].BeamName = "changed"
    bad = verify_dataset(ds, s.trust, allow_unsigned_elements=True)
    assert bad.status is Status.INVALID and "(300A,00B0)[0]" in bad.reason


def test_roundtrip_through_pydicom_keeps_signature(
    sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    s = pki["rsa"]
    for name in ("RG1_UNCI.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"):
        signed = sign_file(sources[name], tmp_path / f"s_{name}", s.key, s.cert)
        again = tmp_path / f"rt_{name}"
        pydicom.dcmread(signed).save_as(again)
        assert again.read_bytes() == signed.read_bytes()
        assert verify_dataset(again, s.trust).ok
        assert dcm_verify(again, s.anchor) == 0


def test_in_memory_signature_equals_file_signature(
    sources: dict[str, Path], pki: dict[str, Signer]
) -> None:
    s = pki["rsa"]
    ds = pydicom.dcmread(sources["SC_rgb.dcm"])
    sign_dataset(ds, s.key, s.cert)
    assert verify_dataset(ds, s.trust, require_creator=True).ok
    reread = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dataset_bytes(ds)))
    assert verify_dataset(reread, s.trust, require_creator=True).ok


def test_sign_file_never_overwrites(
    sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    s = pki["rsa"]
    out = sign_file(sources["CT_small.dcm"], tmp_path / "o.dcm", s.key, s.cert)
    before = out.read_bytes()
    with pytest.raises(Exception, match="refusing to overwrite"):
        sign_file(sources["CT_small.dcm"], out, s.key, s.cert)
    assert out.read_bytes() == before
    with pytest.raises(Exception, match="never overwritten"):
        sign_file(out, out, s.key, s.cert, overwrite=True)


def test_keys_mode_and_no_overwrite(tmp_path: Path) -> None:
    key, _cert = generate_signer(tmp_path / "k", key_type="ec")
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    with pytest.raises(Exception, match="refusing to overwrite"):
        generate_signer(tmp_path / "k")
    assert key.read_bytes() == before
    # The trust store ignores the private key next to the certificate.
    assert len(TrustStore.from_dir(tmp_path / "k").anchors) == 1
    with pytest.raises(Exception, match="no certificates"):
        TrustStore.from_dir(tmp_path)


@pytest.mark.parametrize("name", ALL_SOURCES)
def test_bytes_as_read_and_reencoded_values_give_one_stream(
    name: str, sources: dict[str, Path], pki: dict[str, Signer], tmp_path: Path
) -> None:
    """Unread elements are hashed as the bytes read, read ones re-encoded: same stream."""
    s = pki["rsa"]
    signed = sign_file(sources[name], tmp_path / "s.dcm", s.key, s.cert, profile="none")
    as_read = mac_stream_bytes(pydicom.dcmread(signed))
    converted = pydicom.dcmread(signed)
    for elem in converted.iterall():  # converts every element, in sequence items too
        assert elem.value is not None or elem.VR != "SQ"
    assert mac_stream_bytes(converted) == as_read
    assert verify_dataset(converted, s.trust).ok
