"""Verify speed on the 1955x1841 chest radiograph (RG1_UNCI.dcm): medsec vs floor vs dcmsign.

One run: sign the file once (SHA-256, Creator RSA profile), then time, as medians,
- floor: hashlib SHA-256 of the pixel bytes + one RSA signature verification (the least any
  verifier must do),
- medsec: ``verify_dataset(path, trust)`` end to end (open, parse, hash, RSA, X.509 path),
- dcmsign: ``dcmsign --verify +cf CERT`` as a whole process (how it is used).
The first three run in turn, 100 rounds (see ``interleaved_ms``).
Last line: ``medsec_vs_floor=<r> medsec_vs_dcmsign=<r>`` (targets: <= 1.3 and < 1).
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from pydicom.data import get_testdata_file

from medsec.integrity import TrustStore, generate_signer, sign_file, verify_dataset
from medsec.integrity.keys import load_private_key


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches (page cache, imports)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_ms(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """Median ms of each function, run in turn in every round (ABAB...), so drift on a shared
    machine hits all alike: the ratio of two medians is then steadier than from two blocks."""
    for fn in fns:
        fn()  # warm caches (page cache, imports)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> int:
    dcmsign = shutil.which("dcmsign")
    if dcmsign is None:
        print("dcmsign (DCMTK) not found: run `make sysdeps`", file=sys.stderr)
        return 2
    src = Path(get_testdata_file("RG1_UNCI.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = generate_signer(Path(tmp) / "pki")
        trust = TrustStore.from_dir(Path(tmp) / "pki")
        signed = sign_file(src, Path(tmp) / "signed.dcm", key, cert)
        pixels = pydicom.dcmread(signed).PixelData
        rsa_key = load_private_key(key)
        sig = rsa_key.sign(b"x", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg]
        public = rsa_key.public_key()

        def floor() -> None:
            hashlib.sha256(pixels).digest()
            public.verify(sig, b"x", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg]

        def medsec() -> None:
            result = verify_dataset(signed, trust)
            if not result.ok:
                raise RuntimeError(result.reason)

        def reference() -> None:
            r = subprocess.run([dcmsign, "--verify", "+cf", str(cert), str(signed)],
                               capture_output=True)  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(r.stderr.decode())

        print(f"file: {src.name}, {len(pixels):,} pixel bytes, 1 signature (SHA-256, RSA-3072)")
        sha_ms, floor_ms, medsec_ms = interleaved_ms(
            [lambda: hashlib.sha256(pixels).digest(), floor, medsec], 100
        )
        dcmsign_ms = median_ms(reference, 15)
    print(f"sha256 of pixel bytes:        {sha_ms:8.2f} ms")
    print(f"floor (sha256 + RSA verify):  {floor_ms:8.2f} ms")
    print(f"medsec verify (in process):   {medsec_ms:8.2f} ms")
    print(f"dcmsign --verify (process):   {dcmsign_ms:8.2f} ms")
    print(
        f"medsec_vs_floor={medsec_ms / floor_ms:.2f} medsec_vs_dcmsign={medsec_ms / dcmsign_ms:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
