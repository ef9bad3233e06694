"""Service parts without a server: gate policies, token bucket, config validation, audit chain."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medsec.errors import MedsecError
from medsec.integrity import TrustStore, generate_signer, image_to_dicom, sign_dataset
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.service.access import Authenticator, RateLimiter, hash_token, new_token
from medsec.service.audit import AuditLog, verify_log
from medsec.service.config import ClientConfig, ImageRules, parse_config
from medsec.service.gate import ImagePolicy, Refusal, check_upload


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrustStore]:
    d = tmp_path_factory.mktemp("signer")
    key, cert = generate_signer(d)
    return key, cert, TrustStore.from_dir(d)


def _upload(signer: tuple[Path, Path, TrustStore], size: int = 64, mac: str = "sha256") -> bytes:
    img = np.linspace(0, 1, size * size, dtype=np.float32).reshape(size, size)
    return dataset_bytes(sign_dataset(image_to_dicom(img), signer[0], signer[1], mac=mac))


def test_resize_policy_accepts_other_sizes_only_when_configured(signer):
    body = _upload(signer, size=40)
    strict = ImagePolicy(trust=signer[2], channels=1, image_size=64)
    with pytest.raises(Refusal) as exc:
        check_upload(body, strict)
    assert exc.value.http_status == 422 and exc.value.code == "wrong_shape"
    assert exc.value.sop_instance_uid  # refusals after parsing still name the image
    lenient = ImagePolicy(signer[2], 1, 64, ImageRules(resize=True))
    checked = check_upload(body, lenient)
    assert checked.resized and tuple(checked.tensor.shape) == (1, 1, 64, 64)
    assert float(checked.tensor.min()) >= 0.0 and float(checked.tensor.max()) <= 1.0


def test_gate_passes_exactly_the_signed_pixels(signer):
    body = _upload(signer)
    checked = check_upload(body, ImagePolicy(trust=signer[2], channels=1, image_size=64))
    want = np.rint(np.linspace(0, 1, 64 * 64).reshape(64, 64) * 255) / 255
    np.testing.assert_allclose(checked.tensor[0, 0].numpy(), want, atol=1e-6)
    assert checked.verification is not None and checked.verification.ok


def test_weak_signature_hash_is_refused_by_policy(signer):
    body = _upload(signer, mac="sha256")
    policy = ImagePolicy(signer[2], 1, 64, ImageRules(min_mac="SHA384"))
    with pytest.raises(Refusal) as exc:
        check_upload(body, policy)
    assert (exc.value.http_status, exc.value.code) == (403, "weak_hash")
    assert "SHA256" in exc.value.reason
    assert check_upload(_upload(signer, mac="sha512"), policy).verification is not None


def test_channel_mismatch_and_pixel_length_are_checked(signer):
    body = _upload(signer)
    with pytest.raises(Refusal, match="channel"):
        check_upload(body, ImagePolicy(trust=signer[2], channels=3, image_size=64))
    unsigned = image_to_dicom(np.zeros((64, 64), np.float32))
    unsigned.PixelData = unsigned.PixelData[:-64]
    rules = ImageRules(require_signature=False, require_creator=False)
    policy = ImagePolicy(trust=signer[2], channels=1, image_size=64, rules=rules)
    with pytest.raises(Refusal) as exc:
        check_upload(dataset_bytes(unsigned), policy)
    assert exc.value.code == "bad_pixels" and "expected 4096" in exc.value.reason


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    limiter = RateLimiter(2.0, 3, {"slow": (0.5, 1)}, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [None, None, None]
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.acquire("a") is None and limiter.acquire("a") is not None
    assert limiter.acquire("slow") is None and limiter.acquire("slow") == pytest.approx(2.0)
    now[0] = 100.0  # a long pause refills no more than the burst
    assert [limiter.acquire("a") for _ in range(4)][-1] is not None


def test_tokens_are_stored_hashed_and_matched_exactly():
    token = new_token()
    auth = Authenticator((ClientConfig(name="alice", token_sha256=hash_token(token)),))
    assert auth.client_for(f"Bearer {token}") == "alice"
    assert auth.client_for(f"bearer {token}") == "alice"
    for header in (None, "", token, f"Bearer {token}x", f"Basic {token}", "Bearer "):
        assert auth.client_for(header) is None
    assert token not in hash_token(token) and len(hash_token(token)) == 64


def _minimal(**override: object) -> dict:
    data = {
        "tls": {"cert": "c.pem", "key": "k.pem"},
        "model": {"checkpoint": "m.pt", "manifest": "m.pt.sig.json", "trust": "mt"},
        "images": {"trust": "it"},
        "audit": {"path": "a.jsonl"},
        "clients": [{"name": "a", "token_sha256": "ab" * 32}],
    }
    data.update(override)
    return data


def test_config_paths_are_relative_to_the_file_and_defaults_are_strict(tmp_path: Path):
    cfg = parse_config(_minimal(), tmp_path)
    assert cfg.model.checkpoint == tmp_path / "m.pt" and cfg.tls.client_ca is None
    rules = cfg.images
    assert rules.require_signature and rules.require_creator and not rules.allow_unsigned_elements
    assert rules.min_mac == "SHA256" and cfg.audit.fsync == "always" and not rules.resize


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"images": {"trust": "it", "require_signatures": False}}, "unknown key"),
        ({"images": {"trust": "it", "min_mac": "SHA3"}}, "min_mac"),
        ({"audit": {"path": "a", "fsync": "sometimes"}}, "fsync"),
        ({"clients": []}, "at least one"),
        ({"clients": [{"name": "a", "token_sha256": "xyz"}]}, "64 hex"),
        ({"server": {"port": "80"}}, r"\[server\] port: Input should be a valid integer"),
        ({"rate_limit": {"burst": 0}}, "burst: Input should be greater than 0"),
        ({"extra": {}}, "unknown section"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, override: dict, message: str):
    with pytest.raises(MedsecError, match=message):
        parse_config(_minimal(**override), tmp_path)


def test_audit_appends_from_many_threads_form_one_chain(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.jsonl", fsync="never")
    threads = [
        threading.Thread(target=lambda i=i: [log.append({"n": i, "k": k}) for k in range(50)])
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    check = verify_log(tmp_path / "audit.jsonl")
    assert check.ok and check.lines == 400
    reopened = AuditLog(tmp_path / "audit.jsonl")  # continues the chain where it stopped
    reopened.append({"n": "after"})
    reopened.close()
    assert verify_log(tmp_path / "audit.jsonl").lines == 401


def test_one_writer_per_audit_log(tmp_path: Path):
    first = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(MedsecError, match="in use"):
        AuditLog(tmp_path / "audit.jsonl")
    first.close()


def test_audit_verify_flags_an_incomplete_last_line(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"n": 1})
    log.close()
    with open(tmp_path / "audit.jsonl", "ab") as fh:
        fh.write(b'{"seq": 2')
    check = verify_log(tmp_path / "audit.jsonl")
    assert check.bad_line == 2 and "incomplete" in check.reason


def test_head_may_lag_the_log_but_must_match_it(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(3):
        log.append({"n": i})
    log.close()
    head = tmp_path / "audit.jsonl.head"
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    second = json.loads(lines[1])["hash"]
    head.write_text(json.dumps({"lines": 2, "hash": second}))  # as if the crash hit before
    assert verify_log(tmp_path / "audit.jsonl").ok
    head.write_text(json.dumps({"lines": 2, "hash": "f" * 64}))
    check = verify_log(tmp_path / "audit.jsonl")
    assert check.bad_line == 2 and "head file" in check.reason


def _deflated_upload(signer: tuple[Path, Path, TrustStore]) -> bytes:
    ds = image_to_dicom(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), seed=3)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return dataset_bytes(sign_dataset(ds, signer[0], signer[1]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from(["plain", "deflated", "noise"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3),
    cut=st.integers(0, 64),
    noise=st.binary(max_size=600),
)
def test_gate_never_crashes_and_never_accepts_a_changed_dataset(
    signer, uploads, source: str, flips: list[tuple[float, int]], cut: int, noise: bytes
):
    """Random bytes and mutated signed files (flipped bytes, cut tails): the gate answers with
    a Refusal or accepts, and accepts only when the dataset is still the signed one (the
    preamble and file meta are not signed, so changes there may pass)."""
    original = uploads[source] if source != "noise" else b"\0" * 128 + b"DICM" + noise
    body = bytearray(original)
    for where, xor in flips:
        body[int(where * len(body))] ^= xor
    del body[len(body) - cut :]  # a cut tail (0: none)
    try:
        checked = check_upload(bytes(body), ImagePolicy(signer[2], 1, 64))
    except Refusal as refusal:
        assert 400 <= refusal.http_status < 500 and "\n" not in refusal.reason
        return
    assert source != "noise" and checked.verification is not None and checked.verification.ok
    assert dcmread(io.BytesIO(bytes(body))) == dcmread(io.BytesIO(original))


@pytest.fixture(scope="module")
def uploads(signer) -> dict[str, bytes]:
    return {"plain": _upload(signer), "deflated": _deflated_upload(signer)}
