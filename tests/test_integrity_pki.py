"""Trust paths: CA and signer certificates made by the common openssl commands, judged by
medsec (default RFC 5280 profile and --strict-pki) and by DCMTK's dcmsign.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from medsec.integrity import Status, TrustStore, generate_ca, image_to_dicom, sign_file
from medsec.integrity.dicom_verify import verify_dataset
from medsec.integrity.keys import load_certificates


def tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: run `make sysdeps`")
    return exe


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run([tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def new_key_csr(cwd: Path, name: str, cn: str) -> None:
    openssl(cwd, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={cn}")  # fmt: skip


def issue(cwd: Path, csr: str, ca: str, out: str, ext: str | None = None) -> None:
    """``openssl x509 -req``: a v1 certificate, or v3 with an extension file."""
    extra = ["-extfile", ext] if ext else []
    openssl(cwd, "x509", "-req", "-in", f"{csr}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "30", "-out", f"{out}.pem", *extra)  # fmt: skip


CA_SHAPES = {
    "req-x509": [],  # basicConstraints CA:TRUE, no keyUsage
    "ku-no-certsign": ["-addext", "keyUsage=critical,digitalSignature"],
    "not-a-ca": ["-addext", "basicConstraints=critical,CA:FALSE"],
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("openssl")
    (d / "v3.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n"
    )
    (d / "enc.ext").write_text("keyUsage=critical,keyEncipherment\n")
    for name, ext in CA_SHAPES.items():
        openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.pem", "-days", "365", "-subj", f"/CN=CA {name}", *ext)  # fmt: skip
    new_key_csr(d, "v1-root", "CA v1 root")
    openssl(d, "x509", "-req", "-in", "v1-root.csr", "-signkey", "v1-root.key", "-days", "365",
            "-out", "v1-root.pem")  # fmt: skip
    key, cert = generate_ca(d / "medsec")
    shutil.copy(key, d / "medsec.key")
    shutil.copy(cert, d / "medsec.pem")
    new_key_csr(d, "leaf", "modality")
    for ca in [*CA_SHAPES, "v1-root", "medsec"]:
        issue(d, "leaf", ca, f"v1_{ca}")
        issue(d, "leaf", ca, f"v3_{ca}", "v3.ext")
    issue(d, "leaf", "req-x509", "enc_req-x509", "enc.ext")
    new_key_csr(d, "int", "v1 intermediate")
    issue(d, "int", "req-x509", "intv1")
    shutil.copy(d / "int.key", d / "intv1.key")
    issue(d, "leaf", "intv1", "v3_intv1", "v3.ext")
    # openssl stamps notBefore with the current second; dcmsign judged a signature made within
    # that same second "not yet valid" (seen once in the fresh-clone run): sign a second later
    time.sleep(1.5)
    (d / "trust_intv1.pem").write_bytes(
        (d / "req-x509.pem").read_bytes() + (d / "intv1.pem").read_bytes()
    )
    image_to_dicom(np.full((8, 8), 0.5, np.float32), seed=0).save_as(
        d / "img.dcm", enforce_file_format=True
    )
    return d


# (signer certificate, trust file) -> (dcmsign accepts, medsec default accepts, strict accepts)
MATRIX = {
    ("v1_req-x509", "req-x509"): (True, True, False),
    ("v3_req-x509", "req-x509"): (True, True, False),
    ("v1_v1-root", "v1-root"): (True, True, False),
    ("v3_v1-root", "v1-root"): (True, True, False),
    ("v1_medsec", "medsec"): (True, True, False),
    ("v3_medsec", "medsec"): (True, True, True),
    ("v1_ku-no-certsign", "ku-no-certsign"): (False, False, False),
    ("v3_ku-no-certsign", "ku-no-certsign"): (False, False, False),
    ("v1_not-a-ca", "not-a-ca"): (False, False, False),
    ("v3_not-a-ca", "not-a-ca"): (False, False, False),
    ("v3_intv1", "trust_intv1"): (False, False, False),  # v1 intermediate
    # A signer whose keyUsage forbids signing: OpenSSL (no purpose set) does not look at it,
    # medsec does (keyUsage is checked when present).
    ("enc_req-x509", "req-x509"): (True, False, False),
}


@pytest.mark.parametrize(("leaf", "trust"), list(MATRIX), ids=[f"{a}@{b}" for a, b in MATRIX])
def test_trust_path_matrix_against_dcmsign(shapes: Path, tmp_path: Path, leaf, trust) -> None:
    dcmsign_ok, medsec_ok, strict_ok = MATRIX[(leaf, trust)]
    signed = sign_file(shapes / "img.dcm", tmp_path / "s.dcm", shapes / "leaf.key",
                       shapes / f"{leaf}.pem")  # fmt: skip
    anchors = shapes / f"{trust}.pem"
    r = subprocess.run([tool("dcmsign"), "--verify", "+cf", str(anchors), str(signed)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (r.returncode == 0) is dcmsign_ok, r.stdout + r.stderr
    certs = tuple(load_certificates(anchors))
    default = verify_dataset(signed, TrustStore(certs))
    assert default.ok is medsec_ok, default.reason
    if not medsec_ok:
        assert default.status is Status.UNTRUSTED and "signature #1" in default.reason
    v1_reported = any("X.509 v1" in w for w in default.warnings)
    assert v1_reported is (medsec_ok and leaf.startswith("v1_"))
    strict = verify_dataset(signed, TrustStore(certs, profile="strict"))
    assert strict.ok is strict_ok, strict.reason
    if not strict_ok:
        assert strict.status is Status.UNTRUSTED and "strict profile" in strict.reason


def test_reasons_name_the_failed_rule(shapes: Path, tmp_path: Path) -> None:
    def reason(leaf: str, trust: str) -> str:
        out = tmp_path / f"{leaf}.dcm"
        sign_file(shapes / "img.dcm", out, shapes / "leaf.key", shapes / f"{leaf}.pem")
        return verify_dataset(
            out, TrustStore(tuple(load_certificates(shapes / f"{trust}.pem")))
        ).reason

    assert "keyCertSign" in reason("v1_ku-no-certsign", "ku-no-certsign")
    assert "keyCertSign" in reason("v3_ku-no-certsign", "ku-no-certsign")
    assert "basicConstraints" in reason("v1_not-a-ca", "not-a-ca")
    assert "not a self-signed root" in reason("v3_intv1", "trust_intv1")
    assert "digitalSignature" in reason("enc_req-x509", "req-x509")
