"""Issue 16, integrity part: what an attacker or a careless tester feeds to sign and verify."""

from __future__ import annotations

import argparse
import io
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medsec.errors import MedsecError
from medsec.integrity import (
    Status,
    TrustStore,
    generate_signer,
    image_to_dicom,
    sign_file,
    verify_dataset,
)
from medsec.integrity.cli import register
from medsec.integrity.mac_stream import MAX_SEQUENCE_DEPTH


def run(*argv: str | Path) -> int:
    """The verbs as the medsec CLI runs them (MedsecError -> its exit code)."""
    parser = argparse.ArgumentParser(prog="medsec")
    sub = parser.add_subparsers(dest="verb", required=True)
    register(sub)
    args = parser.parse_args([str(a) for a in argv])
    try:
        return int(args.func(args))
    except MedsecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def dcmsign(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("dcmsign")
    if exe is None:
        pytest.fail("dcmsign (DCMTK) is not installed: run `make sysdeps`")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(key, certificate, trust directory) of one RSA signer."""
    d = tmp_path_factory.mktemp("hardening")
    key, cert = generate_signer(d / "signer")
    return key, cert, d / "signer"


def small_dicom(path: Path, size: int = 128) -> Path:
    image = np.random.default_rng(0).random((size, size)).astype(np.float32)
    image_to_dicom(image, seed=0).save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------- item 3: truncated input


def test_sign_refuses_a_file_cut_inside_pixel_data(pki, tmp_path: Path) -> None:
    key, cert, trust_dir = pki
    full = small_dicom(tmp_path / "full.dcm").read_bytes()
    pixels = 128 * 128  # 8-bit, the last element of the file
    trust = TrustStore.from_dir(trust_dir)
    # The cut (13580 of 32768 pixel bytes, scaled), and one byte short.
    for cut in (len(full) - pixels + pixels * 13580 // 32768, len(full) - 1):
        cut_file = tmp_path / f"cut{cut}.dcm"
        cut_file.write_bytes(full[:cut])
        out = tmp_path / f"signed{cut}.dcm"
        with pytest.raises(MedsecError, match=r"truncated in element \(7FE0,0010\)"):
            sign_file(cut_file, out, key, cert)
        assert not out.exists()
        # The verifier refuses the same file for the same reason.
        result = verify_dataset(cut_file, trust, require_signature=False)
        assert result.status is Status.UNREADABLE and "(7FE0,0010)" in result.reason
    # Stray bytes after the last element: refused by both (dcmsign: premature end of stream).
    signed = sign_file(tmp_path / "full.dcm", tmp_path / "ok.dcm", key, cert)
    (tmp_path / "tail.dcm").write_bytes(signed.read_bytes() + b"abc")
    assert verify_dataset(tmp_path / "tail.dcm", trust).status is Status.UNREADABLE
    assert dcmsign("--verify", "+cf", cert, tmp_path / "tail.dcm").returncode == 20
    with pytest.raises(MedsecError, match="stray byte"):
        sign_file(tmp_path / "tail.dcm", tmp_path / "x.dcm", key, cert)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "rtplan.dcm", "MR_small_bigendian.dcm"])
def test_signer_refuses_whatever_the_verifier_cannot_read(pki, tmp_path: Path, name) -> None:
    """Every cut of a real file: sign refuses exactly when verify says unreadable."""
    key, cert, trust_dir = pki
    trust = TrustStore.from_dir(trust_dir)
    full = Path(get_testdata_file(name)).read_bytes()
    refused = 0
    for cut in range(140, len(full), len(full) // 23):
        path = tmp_path / "cut.dcm"
        path.write_bytes(full[:cut])
        unreadable = verify_dataset(path, trust).status is Status.UNREADABLE
        try:
            sign_file(path, tmp_path / "s.dcm", key, cert, profile="none", overwrite=True)
        except MedsecError:
            refused += 1
            assert unreadable, cut
        else:
            assert not unreadable, cut
    assert refused >= 20  # nearly every cut falls inside an element


# ----------------------------------------------------------------- item 5: bombs, nesting


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels (the size check happens on open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_png_is_a_one_line_error(pki, tmp_path: Path, capsys) -> None:
    key, cert, _ = pki
    assert Image.MAX_IMAGE_PIXELS is not None
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1  # > 178 MP: PIL's error, not its warning
    bomb = _png_header_only(tmp_path / "bomb.png", side, side)
    assert run("sign", bomb, tmp_path / "bomb.png.sig.json", "--key", key, "--cert", cert) == 2
    err = capsys.readouterr().err
    assert "decompression bomb" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bomb.png.sig.json").exists()


SEQ_TAG = struct.pack("<HH", 0x0040, 0xA730)  # Content Sequence


def nested(depth: int, defined: bool) -> bytes:
    """One Content Sequence nested ``depth`` levels deep, built without recursion."""
    leaf = struct.pack("<HH", 0x0040, 0xA160) + b"UT\0\0" + struct.pack("<I", 4) + b"deep"
    if not defined:
        head = SEQ_TAG + b"SQ\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        tail = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
        return head * depth + leaf + tail * depth
    body = leaf
    for _ in range(depth):
        item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body
        body = SEQ_TAG + b"SQ\0\0" + struct.pack("<I", len(item)) + item
    return body


def nested_file(path: Path, depth: int, defined: bool) -> Path:
    """A small image with the nested sequence inserted before its Pixel Data."""
    buf = io.BytesIO()
    image_to_dicom(np.full((8, 8), 0.5, np.float32), seed=0).save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    pos = pydicom.dcmread(io.BytesIO(data)).get_item(0x7FE00010).value_tell - 12
    path.write_bytes(data[:pos] + nested(depth, defined) + data[pos:])
    return path


@pytest.mark.parametrize("defined", [True, False], ids=["defined", "undefined"])
def test_deep_nesting_signed_and_verified_or_refused_in_one_line(
    pki, tmp_path: Path, defined: bool, capsys
) -> None:
    key, cert, trust_dir = pki
    limit = sys.getrecursionlimit()
    for depth in (300, MAX_SEQUENCE_DEPTH):
        src = nested_file(tmp_path / f"n{depth}.dcm", depth, defined)
        out = tmp_path / f"s{depth}.dcm"
        assert run("sign", src, out, "--key", key, "--cert", cert) == 0
        assert run("verify", out, "--trust", trust_dir) == 0
        if depth == 300:  # dcmsign agrees both ways (its MAC stream drops delimiters past 16 KB)
            assert dcmsign("--verify", "+cf", cert, out).returncode == 0
            theirs = tmp_path / "dcmsign300.dcm"
            r = dcmsign("--sign", key, cert, "--mac-sha256", src, theirs)
            assert r.returncode == 0, r.stderr
            assert run("verify", theirs, "--trust", trust_dir) == 0
    capsys.readouterr()
    for depth in (MAX_SEQUENCE_DEPTH + 1, 20000):
        src = nested_file(tmp_path / f"n{depth}.dcm", depth, defined)
        assert run("sign", src, tmp_path / f"s{depth}.dcm", "--key", key, "--cert", cert) == 2
        assert run("verify", src, "--trust", trust_dir) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all(f"deeper than {MAX_SEQUENCE_DEPTH} levels" in e for e in err)
    assert sys.getrecursionlimit() == limit  # raised only while medsec works


def test_the_service_gate_takes_the_nesting_that_sign_and_verify_take(pki, tmp_path: Path):
    """The upload check gives pydicom the same room as the CLI: a signed image nested 300
    levels deep (undefined lengths) is accepted, one deeper than the limit is refused (422)."""
    from medsec.integrity import TrustStore
    from medsec.service.gate import ImagePolicy, Refusal, check_upload

    key, cert, trust_dir = pki
    policy = ImagePolicy(trust=TrustStore.from_dir(trust_dir), channels=1, image_size=8)
    src = nested_file(tmp_path / "n300.dcm", 300, defined=False)
    assert run("sign", src, tmp_path / "s300.dcm", "--key", key, "--cert", cert) == 0
    checked = check_upload((tmp_path / "s300.dcm").read_bytes(), policy)
    assert checked.verification is not None and checked.verification.ok
    for depth in (MAX_SEQUENCE_DEPTH + 1, 20000):
        deep = nested_file(tmp_path / "deep.dcm", depth, defined=False)
        with pytest.raises(Refusal) as refusal:
            check_upload(deep.read_bytes(), policy)
        assert refusal.value.http_status == 422 and refusal.value.code == "too_deep", depth


# ----------------------------------------------------------------- item 9: unsigned, weak MACs


def test_verify_without_flags_fails_for_anything_unsigned(pki, tmp_path: Path, capsys) -> None:
    _, _, trust = pki
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    png = tmp_path / "scan.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    unsigned_dicom = small_dicom(tmp_path / "unsigned.dcm", 8)
    capsys.readouterr()
    assert run("verify", empty, "--trust", trust) == 2
    assert "empty file" in capsys.readouterr().err
    for path in (text, png, unsigned_dicom):
        assert run("verify", path, "--trust", trust) == 3, path
        out = capsys.readouterr()
        assert "OK" not in out.out and "FAILED (missing)" in out.err
        assert "--allow-unsigned" in out.err
        # The lax mode, asked for: exit 0, but never the word OK.
        assert run("verify", path, "--trust", trust, "--allow-unsigned") == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{path}: NOT VERIFIED") and ": OK" not in out


@pytest.mark.parametrize("mac", ["sha1", "ripemd160", "md5", "sha256"])
def test_weak_macs_verify_with_a_warning(pki, tmp_path: Path, mac: str, capsys) -> None:
    key, cert, trust = pki
    signed = tmp_path / "s.dcm"
    r = dcmsign("--sign", key, cert, f"--mac-{mac}", get_testdata_file("CT_small.dcm"), signed)
    assert r.returncode == 0, r.stderr
    capsys.readouterr()
    assert run("verify", signed, "--trust", trust) == 0
    out = capsys.readouterr()
    assert ": OK:" in out.out
    warnings = [line for line in out.err.splitlines() if "warning:" in line]
    if mac == "sha256":
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"uses {mac.upper()}" in warnings[0]
        assert "re-sign with SHA-256" in warnings[0]
