"""The service under attack (issue 16): a Deflate bomb, slow and vanishing clients against the
real uvicorn with short timeouts, and a `serve init` that must be all-or-nothing, escape what
it writes, refuse bad ports and keep the signing keys out of the service directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import tomllib
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medsec.integrity import image_to_dicom, sign_dataset, verify_dataset
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.service.app import ServiceState
from medsec.service.bootstrap import init_service_dir
from medsec.service.config import ServiceConfig, load_config
from medsec.service.server import build_state
from medsec.service.tls import make_tls_material
from test_service import _checkpoint, _image, _post, _with, main, running

MAX_BODY = 64 * 1024
MAX_INFLATED = 1 << 20
BOMB_INFLATED = 32 << 20  # what one bomb would cost unguarded: 32x the inflation limit


@dataclass
class Svc:
    root: Path
    config: ServiceConfig
    token: str
    ca: ssl.SSLContext
    key: Path
    cert: Path


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Svc:
    root = tmp_path_factory.mktemp("hardening")
    _checkpoint(root / "victim.pt")
    result = init_service_dir(root / "svc", root / "victim.pt", port=0, client="alice")
    assert result.modality_key is not None and result.modality_cert is not None
    config = _with(
        load_config(result.config),
        server={
            "max_body_bytes": MAX_BODY,
            "max_inflated_bytes": MAX_INFLATED,
            "header_timeout_s": 0.5,
            "body_timeout_s": 0.5,
            "max_connections": 4,
        },
        rate_limit={"rate_per_s": 1000.0, "burst": 1000},
    )
    ca = ssl.create_default_context(cafile=str(result.ca_cert))
    return Svc(root, config, result.token, ca, result.modality_key, result.modality_cert)


@pytest.fixture
def served(svc: Svc, tmp_path: Path) -> Iterator[tuple[str, ServiceState]]:
    """A fresh server with its own audit log per test."""
    state = build_state(_with(svc.config, audit={"path": tmp_path / "audit.jsonl"}))
    with running(state) as url:
        yield url, state
    state.audit.close()


def _audit(state: ServiceState) -> list[dict]:
    return [json.loads(line) for line in state.audit.path.read_text().splitlines()]


def _deflated(svc: Svc, seed: int = 0) -> bytes:
    """A genuine signed file in the Deflated Explicit VR Little Endian transfer syntax."""
    ds = image_to_dicom(_image(seed), seed=seed)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return dataset_bytes(sign_dataset(ds, svc.key, svc.cert))


def _bomb(inflated: int) -> bytes:
    """A well-formed Deflated DICOM file whose dataset inflates to ``inflated`` bytes: a small
    image dataset, then a Pixel Data of zeros, deflated in chunks (never held whole)."""
    ds = image_to_dicom(np.zeros((8, 8), np.float32))
    del ds.PixelData
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    zeros = inflated - len(body.getvalue()) - 12
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [head.getvalue(), deflate.compress(body.getvalue())]
    out.append(deflate.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, zeros)))
    chunk = bytes(1 << 20)
    for start in range(0, zeros, len(chunk)):
        out.append(deflate.compress(chunk[: zeros - start]))
    out.append(deflate.flush())
    return b"".join(out)


# ------------------------------------------------------------------ item 1: the Deflate bomb


def test_deflate_bomb_is_refused_before_inflating_and_genuine_deflated_files_pass(
    svc: Svc, served: tuple[str, ServiceState]
):
    url, state = served
    bomb = _bomb(BOMB_INFLATED)
    assert len(bomb) < MAX_BODY  # it passes the body limit, as the attack did
    genuine = _deflated(svc, seed=1)
    (svc.root / "genuine.dcm").write_bytes(genuine)
    assert verify_dataset(svc.root / "genuine.dcm", state.policy.trust).ok  # medsec verify
    dcmsign = shutil.which("dcmsign")
    if dcmsign is None:
        pytest.fail("dcmsign (DCMTK) is not installed: run `make sysdeps` (apt-get install dcmtk)")
    args = [dcmsign, "--verify", "+cf", str(svc.cert), str(svc.root / "genuine.dcm")]
    assert subprocess.run(args, capture_output=True, timeout=60).returncode == 0  # DCMTK agrees

    statuses: list[int] = []
    lock = threading.Lock()

    def attacker() -> None:
        with httpx.Client(base_url=url, verify=svc.ca, timeout=30) as c:
            for _ in range(10):
                code = _post(c, bomb, svc.token).status_code
                with lock:
                    statuses.append(code)

    tracemalloc.start()
    try:
        threads = [threading.Thread(target=attacker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert statuses == [413] * 40
    # everything Python allocated while 40 bombs came in, at its peak: far below one inflation
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
    refusals = _audit(state)
    assert [e["code"] for e in refusals] == ["too_large"] * 40
    assert "inflates beyond" in refusals[0]["reason"]

    with httpx.Client(base_url=url, verify=svc.ca, timeout=30) as c:
        resp = _post(c, genuine, svc.token)
    assert resp.status_code == 200, resp.text
    assert resp.json()["verification"]["status"] == "VERIFIED"
    assert _post_tampered(url, svc, genuine) == 403  # and it is really checked


def _post_tampered(url: str, svc: Svc, genuine: bytes) -> int:
    """The genuine Deflated file with one pixel changed, re-deflated: must be refused."""
    ds = dcmread(DicomBytesIO(genuine))
    pixels = bytearray(ds.PixelData)
    pixels[100] ^= 0x01
    ds.PixelData = bytes(pixels)
    with httpx.Client(base_url=url, verify=svc.ca, timeout=30) as c:
        return _post(c, dataset_bytes(ds), svc.token).status_code


# ------------------------------------------------------------------ item 2: slow clients


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _tls(svc: Svc, url: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", _port(url)), timeout=10)
    return svc.ca.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_all(sock: ssl.SSLSocket) -> bytes:
    """Everything until the server closes (b'' if it just hangs up)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    return data


def _headers(svc: Svc, length: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {svc.token}\r\n"
        f"Content-Type: application/dicom\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_slow_and_vanishing_clients_are_cut_off_and_never_a_500(
    svc: Svc, served: tuple[str, ServiceState], caplog
):
    url, state = served
    uvicorn_log = logging.getLogger("uvicorn")  # it does not propagate to the root logger
    uvicorn_log.addHandler(caplog.handler)
    try:
        _slow_and_vanishing(svc, url, state)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    problems = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]
    with httpx.Client(base_url=url, verify=svc.ca, timeout=30) as c:  # still serving
        assert c.get("/healthz").status_code == 200


def _slow_and_vanishing(svc: Svc, url: str, state: ServiceState) -> None:
    # a TCP connection that never starts its TLS handshake: dropped after the same deadline
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as mute:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # a reset is a close too
            assert mute.recv(100) == b""
        assert 0.3 < time.monotonic() - started < 5
    # headers that never finish: the connection is closed after header_timeout_s
    with _tls(svc, url) as slow:
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert _read_all(slow) == b""
        assert 0.3 < time.monotonic() - started < 5
    # a body trickled one byte every 0.1 s: 408 once body_timeout_s is spent
    with _tls(svc, url) as trickle:
        trickle.sendall(_headers(svc, 5000))
        trickle.settimeout(0.1)
        started, reply = time.monotonic(), b""
        while not reply and time.monotonic() - started < 5:
            try:
                reply = trickle.recv(65536)
            except TimeoutError:
                trickle.sendall(b"\0")
        trickle.settimeout(10)
        reply += _read_all(trickle)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    # clients that hang up mid-body: audited as 499, nothing logged as an error
    for _ in range(5):
        with _tls(svc, url) as gone:
            gone.sendall(_headers(svc, 5000) + b"\0" * 100)
    deadline = time.monotonic() + 10
    while state.audit.lines < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    entries = _audit(state)
    assert [e["status"] for e in entries] == [408] + [499] * 5
    assert entries[1]["code"] == "client_closed"


def test_connections_beyond_the_cap_are_closed_at_once(svc: Svc, tmp_path: Path):
    # idle connections must outlive the set-up here, so a header deadline longer than it takes
    config = _with(svc.config, server={"header_timeout_s": 30.0}, audit={"path": tmp_path / "a"})
    state = build_state(config)
    try:
        with running(state) as url:
            _fill_and_refuse(svc, url, config.server.max_connections)
    finally:
        state.audit.close()


def _fill_and_refuse(svc: Svc, url: str, cap: int) -> None:
    idle = [_tls(svc, url) for _ in range(cap)]
    try:
        with _tls(svc, url) as extra:
            reply = _read_all(extra)
        head, _, text = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and text.startswith(b"too many open connections")
        assert f"content-length: {len(text)}\r\n".encode() in head + b"\r\n"
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10  # the slots come back once the idle ones are gone
    while True:
        try:
            with httpx.Client(base_url=url, verify=svc.ca, timeout=5) as c:
                if c.get("/healthz").status_code == 200:
                    return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the connection slots did not come back"
        time.sleep(0.1)


# ------------------------------------------------------------------ serve init (items 5-9)


def _init(root: Path, *extra: str) -> list[str]:
    return ["serve", "init", "--out", str(root / "svc"), "--checkpoint", str(root / "m.pt"), *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_client_names_cannot_inject_config(svc: Svc, tmp_path: Path, capsys):
    _checkpoint(tmp_path / "m.pt")
    evil = 'x"\n[[clients]]\nname = "mallory"\ntoken_sha256 = "' + "0" * 64 + '"\n#'
    assert main(_init(tmp_path, "--client", evil)) == 2
    assert "client name" in _one_line_error(capsys)
    assert not (tmp_path / "svc").exists() and not (tmp_path / "svc-keys").exists()
    assert main(["serve", "token", "--name", evil]) == 2
    assert "client name" in _one_line_error(capsys)
    # a value init copies from the user (the checkpoint's file name) is escaped, not pasted
    odd = tmp_path / 'm"\n[images]\ntrust = "x.pt'
    shutil.copyfile(tmp_path / "m.pt", odd)
    result = init_service_dir(tmp_path / "odd", odd, client="ward-7")
    data = tomllib.loads(result.config.read_text())
    assert data["model"]["checkpoint"] == f"model/{odd.name}"
    assert [c["name"] for c in data["clients"]] == ["ward-7"]
    assert load_config(result.config).model.checkpoint.read_bytes() == odd.read_bytes()


def test_failed_init_leaves_nothing_and_names_the_input(svc: Svc, tmp_path: Path, capsys):
    (tmp_path / "m.pt").write_text("this is not a checkpoint\n")
    assert main(_init(tmp_path, "--out", str(tmp_path / "deep" / "svc"))) == 2
    err = _one_line_error(capsys)
    assert str(tmp_path / "m.pt") in err and "deep" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no half-built leftovers
    _checkpoint(tmp_path / "m.pt")
    assert main(_init(tmp_path, "--out", str(tmp_path / "deep" / "svc"))) == 0  # retry works
    assert (tmp_path / "deep" / "svc" / "config.toml").is_file()


def test_bad_ports_and_unwritable_outputs_are_one_line_errors(tmp_path: Path, capsys):
    _checkpoint(tmp_path / "m.pt")
    for port in ("70000", "-1", "http"):
        with pytest.raises(SystemExit) as exc:
            main(_init(tmp_path, "--port", port))
        assert exc.value.code == 2 and "not a TCP port" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(_init(tmp_path, "--out", str(tmp_path / "file"))) == 2
    assert "not a directory" in _one_line_error(capsys)
    assert main(_init(tmp_path, "--out", str(tmp_path / "file" / "svc"))) == 2
    assert "Not a directory" in _one_line_error(capsys)
    if os.geteuid() != 0:  # root writes anywhere: a read-only directory refuses others only
        (tmp_path / "ro").mkdir(mode=0o500)
        assert main(_init(tmp_path, "--out", str(tmp_path / "ro" / "svc"))) == 2
        assert "Permission denied" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.pt"] + (
        ["ro"] if os.geteuid() != 0 else []
    )


def test_signing_keys_stay_out_of_the_service_directory(svc: Svc, tmp_path: Path, capsys):
    _checkpoint(tmp_path / "m.pt")
    assert main(_init(tmp_path, "--keys-out", str(tmp_path / "offline"))) == 0
    assert str(tmp_path / "offline") in capsys.readouterr().out
    service, keys = tmp_path / "svc", tmp_path / "offline"

    def private(d: Path) -> list[str]:
        return sorted(
            str(p.relative_to(d))
            for p in d.rglob("*")
            if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
        )

    assert private(service) == ["tls/server_key.pem"]  # the one key a TLS server must hold
    assert private(keys) == [
        "modality/signer_key.pem",
        "model_signer/signer_key.pem",
        "tls_ca/ca_key.pem",
    ]
    assert (keys.stat().st_mode & 0o077) == 0
    # the service still starts from what it holds, and the offline key really is its signer
    state = build_state(load_config(service / "config.toml"))
    state.audit.close()
    model_cert = (keys / "model_signer" / "signer_cert.pem").read_bytes()
    assert (service / "model_trust" / "signer_cert.pem").read_bytes() == model_cert
    inside = ["--out", str(tmp_path / "svc2"), "--keys-out", str(tmp_path / "svc2" / "keys")]
    assert main(_init(tmp_path, *inside)) == 2
    assert "must lie outside" in _one_line_error(capsys)


def test_operator_tls_certificate_replaces_the_generated_ca(tmp_path: Path, capsys):
    _checkpoint(tmp_path / "m.pt")
    pki = make_tls_material(tmp_path / "pki", ["127.0.0.1"])  # the hospital's CA and server
    other = make_tls_material(tmp_path / "other", ["127.0.0.1"])
    mismatched = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(other["server_key"])]
    assert main(_init(tmp_path, *mismatched)) == 2
    assert "unusable" in _one_line_error(capsys)
    assert not (tmp_path / "svc").exists() and not (tmp_path / "svc-keys").exists()
    pair = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])]
    assert main(_init(tmp_path, *pair)) == 0
    assert "TLS CA:" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "svc" / "tls").iterdir()) == [
        "server_cert.pem",
        "server_key.pem",
    ]
    assert not (tmp_path / "svc-keys" / "tls_ca").exists()  # no CA was made, so no CA key
    assert (tmp_path / "svc" / "tls" / "server_key.pem").stat().st_mode & 0o777 == 0o600
    state = build_state(load_config(tmp_path / "svc" / "config.toml"))
    hospital = ssl.create_default_context(cafile=str(pki["ca_cert"]))
    with running(state) as url:
        assert httpx.get(url + "/healthz", verify=hospital, timeout=10).status_code == 200
    state.audit.close()
