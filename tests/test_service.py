"""The inference service end to end: a real uvicorn server on 127.0.0.1 over TLS, real clients.

One generated service directory (``medsec serve init``) is shared by the module; each bad input
of the issue gets its status code and one-line reason, the service stays up, every request is
in the audit chain, and an adversarially perturbed copy of a signed image is refused while the
clean original is accepted.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

from medsec import cli
from medsec.integrity import dicom_to_image, generate_signer, image_to_dicom, sign_dataset
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.models import Victim, create_model, save_checkpoint
from medsec.service import cli as service_cli
from medsec.service.access import hash_token, new_token
from medsec.service.app import ServiceState
from medsec.service.audit import verify_log
from medsec.service.bootstrap import init_service_dir
from medsec.service.config import ServiceConfig, load_config
from medsec.service.server import build_state, make_server
from medsec.service.tls import make_tls_material

SIZE = 64
MAX_BODY = 64 * 1024
# `medsec` with only the service's verbs: the real main() (error lines, exit codes), without
# importing the other verbs' modules.
MEDSEC = (
    "import sys; from medsec import cli; from medsec.service import cli as s; "
    "cli._registrars = lambda: [s.register]; sys.exit(cli.main(sys.argv[1:]))"
)


def main(argv: list[str]) -> int:
    """In-process ``medsec ARGV`` limited to the service verbs."""
    saved = cli._registrars
    cli._registrars = lambda: [service_cli.register]
    try:
        return cli.main(argv)
    finally:
        cli._registrars = saved


@dataclass
class Env:
    root: Path
    config_path: Path
    config: ServiceConfig
    token: str
    bob_token: str
    ca: ssl.SSLContext
    key: Path  # trusted modality signer
    cert: Path
    model: Victim


def _checkpoint(path: Path) -> Victim:
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=SIZE)
    save_checkpoint(
        path, model, arch="small-cnn", data_hash="test", image_size=SIZE, metrics={}, settings={}
    )
    return model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("service")
    model = _checkpoint(root / "victim.pt")
    result = init_service_dir(root / "svc", root / "victim.pt", port=0, client="alice")
    bob_token = new_token()
    text = result.config.read_text().replace(
        "max_body_bytes = 1048576", f"max_body_bytes = {MAX_BODY}"
    )
    text += f'\n[[clients]]\nname = "bob"\ntoken_sha256 = "{hash_token(bob_token)}"\n'
    text += "rate_per_s = 0.001\nburst = 2\n"
    result.config.write_text(text)
    assert result.modality_key is not None and result.modality_cert is not None
    return Env(
        root=root,
        config_path=result.config,
        config=load_config(result.config),
        token=result.token,
        bob_token=bob_token,
        ca=ssl.create_default_context(cafile=str(result.ca_cert)),
        key=result.modality_key,
        cert=result.modality_cert,
        model=model,
    )


def _with(config: ServiceConfig, **sections: dict[str, Any]) -> ServiceConfig:
    """``config`` with some keys of some sections replaced."""
    update = {k: getattr(config, k).model_copy(update=v) for k, v in sections.items()}
    return config.model_copy(update=update)


@contextmanager
def running(state: ServiceState) -> Iterator[str]:
    """Serve ``state`` with uvicorn in a thread; yields the https base URL."""
    server = make_server(state, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def service(env: Env) -> Iterator[tuple[str, ServiceState]]:
    state = build_state(env.config)
    with running(state) as url:
        yield url, state
    state.audit.close()


@pytest.fixture
def client(env: Env, service: tuple[str, ServiceState]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service[0], verify=env.ca, timeout=30) as c:
        yield c


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth, structured grey image (a blob on a gradient) in [0,1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    img = 0.3 * xx + 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def _signed(env: Env, seed: int = 0, size: int = SIZE, modality: str = "OT") -> Dataset:
    ds = image_to_dicom(_image(seed, size), seed=seed, modality=modality)
    return sign_dataset(ds, env.key, env.cert)


def _post(
    c: httpx.Client, body: bytes, token: str | None, ctype: str = "application/dicom"
) -> httpx.Response:
    headers = {"Content-Type": ctype}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return c.post("/v1/predict", content=body, headers=headers)


def _refused(resp: httpx.Response, status: int, code: str) -> str:
    """Assert a refusal: status, code, one-line reason, no traceback; returns the reason."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code, body
    assert "\n" not in body["error"] and "Traceback" not in resp.text
    assert "prediction" not in body
    return str(body["error"])


# ------------------------------------------------------------------ accepted, with its evidence


def test_signed_image_is_accepted_and_prediction_is_the_models(env: Env, client: httpx.Client):
    ds = _signed(env, seed=1)
    resp = _post(client, dataset_bytes(ds), env.token)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["sop_instance_uid"] == ds.SOPInstanceUID
    assert body["verification"]["ok"] and body["verification"]["status"] == "VERIFIED"
    assert body["verification"]["signatures"][0]["mac"] == "SHA256"
    assert body["verification"]["signatures"][0]["creator"] is True
    with torch.no_grad():
        x = torch.from_numpy(dicom_to_image(ds))[None, None]
        want = torch.softmax(env.model(x), 1)[0].numpy()
    assert body["prediction"]["label"] == int(want.argmax())
    np.testing.assert_allclose(body["prediction"]["probabilities"], want, atol=1e-5)
    assert body["model_sha256"] == env.config.model.sha256


def test_health_is_open_everything_else_needs_a_token(env: Env, client: httpx.Client):
    assert client.get("/healthz").json() == {"status": "ok"}
    resp = client.get("/v1/info")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/v1/info", headers={"Authorization": "Bearer msk_not-the-token"})
    assert wrong.status_code == 401
    info = client.get("/v1/info", headers={"Authorization": f"Bearer {env.token}"}).json()
    assert info["client"] == "alice" and info["policy"]["require_creator"] is True
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404


# ------------------------------------------------------------------ every bad input of the issue


def test_missing_and_wrong_token_are_401(env: Env, client: httpx.Client):
    body = dataset_bytes(_signed(env))
    _refused(_post(client, body, None), 401, "unauthorized")
    _refused(_post(client, body, "msk_wrong"), 401, "unauthorized")
    resp = client.post(
        "/v1/predict",
        content=body,
        headers={"Authorization": f"Basic {env.token}", "Content-Type": "application/dicom"},
    )
    _refused(resp, 401, "unauthorized")


def test_unsigned_image_is_403(env: Env, client: httpx.Client):
    unsigned = image_to_dicom(_image(2), seed=2)
    reason = _refused(_post(client, dataset_bytes(unsigned), env.token), 403, "unsigned")
    assert "no digital signature" in reason


def test_tampered_header_is_403(env: Env, client: httpx.Client):
    ds = _signed(env, seed=3)
    ds.PatientID = "SOMEONE-ELSE"
    reason = _refused(_post(client, dataset_bytes(ds), env.token), 403, "tampered")
    assert "modified after signing" in reason


def test_untrusted_signer_is_403(env: Env, client: httpx.Client):
    key, cert = generate_signer(env.root / "rogue", "rogue modality")
    ds = sign_dataset(image_to_dicom(_image(4), seed=4), key, cert)
    reason = _refused(_post(client, dataset_bytes(ds), env.token), 403, "untrusted_signer")
    assert "rogue modality" in reason


def test_oversized_body_is_413_declared_or_streamed(env: Env, client: httpx.Client):
    big = b"\0" * (MAX_BODY + 1)
    _refused(_post(client, big, env.token), 413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for _ in range(8):
            yield b"\0" * (MAX_BODY // 4)

    headers = {"Authorization": f"Bearer {env.token}", "Content-Type": "application/dicom"}
    _refused(client.post("/v1/predict", content=chunks(), headers=headers), 413, "too_large")


@pytest.mark.parametrize("cut", [10, 700, 3000, 6000])
def test_truncated_dicom_is_422(env: Env, client: httpx.Client, cut: int):
    body = dataset_bytes(_signed(env, seed=5))
    _refused(_post(client, body[: len(body) - cut], env.token), 422, "truncated")


@pytest.mark.parametrize(
    "body", [b"not a dicom file at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 300, b"\0" * 200]
)
def test_not_dicom_is_415(env: Env, client: httpx.Client, body: bytes):
    _refused(_post(client, body, env.token), 415, "not_dicom")


def test_wrong_modality_is_422(env: Env, client: httpx.Client):
    ds = _signed(env, seed=6, modality="CT")
    reason = _refused(_post(client, dataset_bytes(ds), env.token), 422, "wrong_modality")
    assert "'CT'" in reason


def test_wrong_shape_is_refused_without_resize_policy(env: Env, client: httpx.Client):
    ds = _signed(env, seed=7, size=32)
    reason = _refused(_post(client, dataset_bytes(ds), env.token), 422, "wrong_shape")
    assert "32x32" in reason


def test_malformed_requests(env: Env, client: httpx.Client):
    body = dataset_bytes(_signed(env, seed=8))
    _refused(_post(client, body, env.token, ctype="text/plain"), 415, "unsupported_media_type")
    _refused(_post(client, b"", env.token), 400, "empty_body")
    assert client.get("/v1/predict").status_code == 405
    # bytes httpx would never send: a broken HTTP request over the same TLS port
    port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        env.ca.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n")
        reply = tls.recv(4096).decode("latin-1")
    assert reply.startswith("HTTP/1.1 400") and "Traceback" not in reply
    assert client.get("/healthz").status_code == 200


def test_rate_limit_is_per_client_429(env: Env, client: httpx.Client):
    body = dataset_bytes(_signed(env, seed=9))
    assert _post(client, body, env.bob_token).status_code == 200
    assert _post(client, body, env.bob_token).status_code == 200
    resp = _post(client, body, env.bob_token)
    _refused(resp, 429, "rate_limited")
    assert int(resp.headers["retry-after"]) >= 1
    assert _post(client, body, env.token).status_code == 200  # alice has her own bucket


# ------------------------------------------------------------------ the study's attack, refused


def test_adversarial_perturbation_of_signed_image_is_refused(env: Env, client: httpx.Client):
    clean = _signed(env, seed=10)
    x = torch.from_numpy(dicom_to_image(clean))[None, None].requires_grad_(True)
    logits = env.model(x)
    label = int(logits.argmax())
    torch.nn.functional.cross_entropy(logits, torch.tensor([label])).backward()
    assert x.grad is not None
    step = (2 * torch.sign(x.grad[0, 0])).to(torch.int16).numpy()  # FGSM, 2 grey levels
    pixels = np.frombuffer(clean.PixelData, np.uint8).reshape(SIZE, SIZE).astype(np.int16)
    adv_pixels = np.clip(pixels + step, 0, 255).astype(np.uint8)
    assert 0 < np.abs(adv_pixels.astype(int) - pixels).max() <= 2

    adv = copy.deepcopy(clean)
    adv.PixelData = adv_pixels.tobytes()
    with torch.no_grad():  # it is an attack: the model trusts its own answer less
        p_clean = torch.softmax(env.model(x.detach()), 1)[0, label]
        x_adv = torch.from_numpy(dicom_to_image(adv))[None, None]
        p_adv = torch.softmax(env.model(x_adv), 1)[0, label]
    assert p_adv < p_clean

    _refused(_post(client, dataset_bytes(adv), env.token), 403, "tampered")
    ok = _post(client, dataset_bytes(clean), env.token)
    assert ok.status_code == 200 and ok.json()["prediction"]["label"] == label


# ------------------------------------------------------------------ steady, audited


def test_concurrent_requests_are_all_answered_and_audited(
    env: Env, service: tuple[str, ServiceState]
):
    url, state = service
    bodies = [dataset_bytes(_signed(env, seed=20 + i)) for i in range(4)]
    bodies.append(b"garbage")
    before = state.audit.lines
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, verify=env.ca, timeout=30) as c:
            for j in range(6):
                resp = _post(c, bodies[(i + j) % len(bodies)], env.token)
                with lock:
                    statuses.append(resp.status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(statuses)) == [200, 415] and len(statuses) == 36
    assert state.audit.lines - before == 36
    check = verify_log(env.config.audit.path)
    assert check.ok and check.lines == state.audit.lines


def test_audit_log_records_decisions_and_cli_detects_edits(
    env: Env, client: httpx.Client, service: tuple[str, ServiceState], tmp_path: Path, capsys
):
    ds = _signed(env, seed=30)
    _post(client, dataset_bytes(ds), env.token)
    _post(client, b"", None)
    assert client.get("/healthz").status_code == 200  # the service is still up
    lines = env.config.audit.path.read_text().splitlines()
    last, accepted = json.loads(lines[-1]), json.loads(lines[-2])
    assert last["status"] == 401 and last["client"] is None
    assert accepted["status"] == 200 and accepted["client"] == "alice"
    assert accepted["sop_instance_uid"] == ds.SOPInstanceUID
    assert accepted["verification"]["status"] == "VERIFIED"
    assert accepted["prediction"]["label"] in (0, 1)
    assert accepted["model_sha256"] == env.config.model.sha256
    assert last["prev"] == accepted["hash"]

    def verify_copy(mutated: list[str]) -> tuple[int, str]:
        path = tmp_path / "copy.jsonl"
        path.write_text("\n".join(mutated) + "\n")
        code = main(["audit", "verify", str(path)])
        return code, capsys.readouterr().out

    assert verify_copy(lines)[0] == 0
    edited = list(lines)
    entry = json.loads(lines[2])
    entry["client"] = "mallory"
    edited[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    code, out = verify_copy(edited)
    assert code == 1 and "line 3" in out and "edited" in out
    code, out = verify_copy(lines[:1] + lines[2:])
    assert code == 1 and "line 2" in out
    code, out = verify_copy([lines[0], lines[2], lines[1], *lines[3:]])
    assert code == 1 and "line 2" in out
    # a cut-off tail is caught through the head file next to the log
    shutil.copy(f"{env.config.audit.path}.head", tmp_path / "copy.jsonl.head")
    state = service[1]
    assert len(lines) == state.audit.lines
    code, out = verify_copy(lines[:-2])
    assert code == 1 and "tail cut" in out


# ------------------------------------------------------------------ transport


def test_plain_http_and_unknown_ca_are_refused(env: Env, service: tuple[str, ServiceState]):
    url = service[0]
    with pytest.raises(httpx.TransportError):
        httpx.get(url.replace("https", "http") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", verify=ssl.create_default_context(), timeout=5)


def test_mutual_tls_requires_a_client_certificate(env: Env, tmp_path: Path):
    tls = make_tls_material(tmp_path / "tls", ["127.0.0.1"], clients=["gateway"])
    config = _with(
        env.config,
        tls={"cert": tls["server_cert"], "key": tls["server_key"], "client_ca": tls["ca_cert"]},
        audit={"path": tmp_path / "audit.jsonl"},
    )
    state = build_state(config)
    ca = ssl.create_default_context(cafile=str(tls["ca_cert"]))
    with running(state) as url:
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/healthz", verify=ca, timeout=5).raise_for_status()
        mutual = ssl.create_default_context(cafile=str(tls["ca_cert"]))
        mutual.load_cert_chain(tls["gateway_cert"], tls["gateway_key"])
        with httpx.Client(base_url=url, verify=mutual, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            body = dataset_bytes(_signed(env, seed=40))
            assert _post(c, body, env.token).status_code == 200
    state.audit.close()


# ------------------------------------------------------------------ start-up refusals, real CLI


def _fresh_dir(env: Env, name: str) -> Path:
    result = init_service_dir(env.root / name, env.root / "victim.pt", port=0)
    return result.config


def _serve_fails(config: Path, capsys) -> str:
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_refuses_to_start_with_tampered_or_unsigned_model(env: Env, capsys):
    config = _fresh_dir(env, "tampered")
    ckpt = config.parent / "model" / "victim.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    assert "differs from the pinned" in _serve_fails(config, capsys)
    lines = config.read_text().splitlines()
    config.write_text("\n".join(x for x in lines if not x.startswith("sha256 = ")) + "\n")
    assert "signature check failed" in _serve_fails(config, capsys)

    config = _fresh_dir(env, "resigned")  # signed, but by a key the service does not trust
    key, cert = generate_signer(env.root / "rogue-model", "rogue", "ed25519")
    ckpt = config.parent / "model" / "victim.pt"
    args = ["--checkpoint", str(ckpt), "--key", str(key), "--cert", str(cert), "--force"]
    assert main(["serve", "sign-model", *args]) == 0
    capsys.readouterr()
    assert "untrusted" in _serve_fails(config, capsys)

    config = _fresh_dir(env, "nosig")
    (config.parent / "model" / "victim.pt.sig.json").unlink()
    assert "model signature" in _serve_fails(config, capsys)


def test_refuses_to_start_on_broken_audit_log_or_bad_tls(env: Env, capsys):
    config = _fresh_dir(env, "brokenaudit")
    log = config.parent / "audit" / "audit.jsonl"
    log.parent.mkdir()
    log.write_text('{"seq": 1, "prev": "x", "hash": "y"}\n')
    assert "broken at line 1" in _serve_fails(config, capsys)

    config = _fresh_dir(env, "auditunderfile")
    text = config.read_text().replace('path = "audit/audit.jsonl"', 'path = "config.toml/a.jsonl"')
    config.write_text(text)
    assert "cannot open" in _serve_fails(config, capsys)

    config = _fresh_dir(env, "badtls")
    (config.parent / "tls" / "server_key.pem").write_text("not a key\n")
    assert "TLS certificate" in _serve_fails(config, capsys)


def test_cli_serve_runs_the_real_service(env: Env, tmp_path: Path):
    result = init_service_dir(tmp_path / "svc", env.root / "victim.pt", port=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = result.config.read_text().replace("port = 0", f"port = {port}")
    result.config.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-c", MEDSEC, "serve", "--config", str(result.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        ca = ssl.create_default_context(cafile=str(result.ca_cert))
        deadline = time.monotonic() + 40
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                resp = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ca, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "medsec serve did not come up"
                time.sleep(0.2)
        assert resp.json() == {"status": "ok"}
        assert result.modality_key is not None and result.modality_cert is not None
        ds = sign_dataset(
            image_to_dicom(_image(50), seed=50), result.modality_key, result.modality_cert
        )
        headers = {"Authorization": f"Bearer {result.token}", "Content-Type": "application/dicom"}
        resp = httpx.post(
            f"https://127.0.0.1:{port}/v1/predict",
            content=dataset_bytes(ds),
            headers=headers,
            verify=ca,
        )
        assert resp.status_code == 200, resp.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert verify_log(tmp_path / "svc" / "audit" / "audit.jsonl").lines == 1


def test_cli_init_prints_the_token_once_and_stores_only_its_hash(env: Env, tmp_path: Path, capsys):
    out = tmp_path / "svc"
    assert (
        main(["serve", "init", "--out", str(out), "--checkpoint", str(env.root / "victim.pt")]) == 0
    )
    printed = capsys.readouterr().out
    token = next(line for line in printed.splitlines() if line.startswith("msk_"))
    config_text = (out / "config.toml").read_text()
    assert token not in config_text and hash_token(token) in config_text
    assert f"medsec serve --config {out / 'config.toml'}" in printed
    assert load_config(out / "config.toml").model.sha256 == env.config.model.sha256
    assert main(["serve", "init", "--out", str(out), "--checkpoint", "x.pt"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["serve", "token", "--name", "ward-7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    new = lines[0].rsplit(" ", 1)[1]
    assert f'token_sha256 = "{hash_token(new)}"' in lines and 'name = "ward-7"' in lines
    assert main(["serve"]) == 2 and "--config" in capsys.readouterr().err


def test_unauthenticated_floods_are_throttled_per_address(env: Env, tmp_path: Path):
    # no refill during the test: a refused request closes its connection (its body is not
    # read), so each one pays a new TLS handshake
    limits = {"burst": 3, "rate_per_s": 0.001}
    config = _with(env.config, rate_limit=limits, audit={"path": tmp_path / "audit.jsonl"})
    state = build_state(config)
    with running(state) as url, httpx.Client(base_url=url, verify=env.ca, timeout=30) as c:
        codes = [_post(c, b"x", "msk_guess").status_code for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        assert _post(c, dataset_bytes(_signed(env, seed=60)), env.token).status_code == 200
    state.audit.close()
    assert verify_log(tmp_path / "audit.jsonl").lines == 6
