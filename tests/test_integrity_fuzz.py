"""Property test: random bytes and mutated signed DICOM files against sign, verify and the
service's upload check. Never a traceback, never a 5xx, never "OK" for a changed signed file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement

from medsec.errors import MedsecError
from medsec.integrity import (
    Status,
    TrustStore,
    generate_signer,
    image_to_dicom,
    sign_dataset,
    sign_file,
    verify_dataset,
)
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.integrity.keys import load_certificate
from medsec.integrity.mac_stream import DIGITAL_SIGNATURES_SEQUENCE, is_signable
from medsec.integrity.signed_bytes import scan
from medsec.service.gate import ImagePolicy, Refusal, check_upload

SIZE = 16
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
FUZZ = settings(
    max_examples=40,
    derandomize=True,  # the same examples on every run: reproducible in CI
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Signed:
    """A signed image the service accepts, and the byte ranges its signature protects."""

    def __init__(self, root: Path) -> None:
        self.key, self.cert = generate_signer(root / "signer")
        self.trust = TrustStore.from_dir(root / "signer")
        image = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
        ds = sign_dataset(image_to_dicom(image, seed=0), self.key, self.cert)
        self.body = dataset_bytes(ds)
        self.policy = ImagePolicy(trust=self.trust, channels=1, image_size=SIZE)
        check_upload(self.body, self.policy)  # the clean file passes the gate
        self.protected = self._protected_ranges()

    def _protected_ranges(self) -> list[tuple[int, int]]:
        """Header and value bytes of every signed element and of the signature item.

        Left out, by design of PS3.15: preamble and file meta, the MAC Parameters Sequence
        (checked for structure, not hashed) and the pad byte of an odd-length certificate.
        """
        ds = pydicom.dcmread(io.BytesIO(self.body))
        starts = []  # (header offset, tag): each element runs to the next one's header
        for tag in sorted(ds.keys()):
            elem = ds.get_item(tag)
            tell = elem.value_tell if isinstance(elem, RawDataElement) else elem.file_tell
            starts.append((tell - (12 if elem.VR in LONG_VRS else 8), tag))
        ends = [s for s, _ in starts[1:]] + [len(self.body)]
        ranges = [
            (start, end)
            for (start, tag), end in zip(starts, ends, strict=True)
            if is_signable(tag) or tag == DIGITAL_SIGNATURES_SEQUENCE
        ]
        cert = load_certificate(self.cert).public_bytes(Encoding.DER)
        at = self.body.index(cert)
        if len(cert) % 2:  # split the signature item around the pad byte
            start, end = ranges.pop()
            ranges += [(start, at + len(cert)), (at + len(cert) + 1, end)]
        return ranges


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    return Signed(tmp_path_factory.mktemp("fuzz"))


def check_all(signed: Signed, body: bytes, tmp_path: Path) -> tuple[bool, bool]:
    """Feed ``body`` to verify, sign and the gate; returns (verify ok, gate accepted).

    Only the documented outcomes are allowed: a result, a MedsecError, a Refusal below 500.
    """
    path = tmp_path / "in.dcm"
    path.write_bytes(body)
    result = verify_dataset(path, signed.trust)  # never raises
    assert result.ok is (result.status is Status.VERIFIED)
    assert "\n" not in result.reason
    if scan(memoryview(body)) is not None:  # read from its bytes: pydicom's way decides alike
        slow = verify_dataset(pydicom.dcmread(io.BytesIO(body)), signed.trust)
        assert (slow.status, slow.reason, slow.signatures) == (
            result.status,
            result.reason,
            result.signatures,
        )
    out = tmp_path / "out.dcm"
    try:
        sign_file(path, out, signed.key, signed.cert, overwrite=True)
    except MedsecError as exc:
        assert "\n" not in str(exc)
    else:  # a signer never seals what a verifier cannot read
        assert result.status is not Status.UNREADABLE, result.reason
    try:
        check_upload(body, signed.policy)
    except Refusal as refusal:
        assert 400 <= refusal.http_status < 500 and "\n" not in refusal.reason
        accepted = False
    else:
        accepted = True
    return result.ok, accepted


@FUZZ
@given(data=st.binary(max_size=600), dicm=st.booleans())
@example(data=b"\xfe\xff\x00\xe0\x00\x00\x00\x00", dicm=True)  # an empty item at top level
def test_random_bytes(signed: Signed, tmp_path: Path, data: bytes, dicm: bool) -> None:
    body = (bytes(128) + b"DICM" + data) if dicm else data
    assert check_all(signed, body, tmp_path) == (False, False)


@st.composite
def mutations(draw: st.DrawFn, signed: Signed) -> bytes:
    """1-3 byte flips, an insertion or a cut, inside what the signature protects."""
    body = bytearray(signed.body)
    start, end = draw(st.sampled_from(signed.protected))
    kind = draw(st.sampled_from(["flip", "insert", "cut"]))
    pos = draw(st.integers(start, end - 1))
    if kind == "cut":
        return bytes(body[:pos])
    if kind == "insert":
        return bytes(body[:pos] + draw(st.binary(min_size=1, max_size=16)) + body[pos:])
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(start, end - 1))
        body[i] ^= draw(st.integers(1, 255))
    return bytes(body)


@FUZZ
@given(data=st.data())
def test_mutated_signed_file_never_passes(signed: Signed, tmp_path: Path, data) -> None:
    body = data.draw(mutations(signed))
    assume(body != signed.body)  # two flips of one byte may cancel
    assert check_all(signed, body, tmp_path) == (False, False)


def test_gate_refuses_a_signed_upload_with_a_corrupt_vr(signed: Signed) -> None:
    at = signed.body.index(b"\x08\x00\x18\x00UI")  # SOP Instance UID, explicit VR
    body = signed.body[: at + 4] + b"TI" + signed.body[at + 6 :]
    with pytest.raises(Refusal) as refusal:
        check_upload(body, signed.policy)
    assert refusal.value.http_status < 500
