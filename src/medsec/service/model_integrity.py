"""Signed model checkpoints: a detached manifest over the checkpoint file's bytes.

The manifest (:mod:`medsec.integrity.manifest`, Ed25519/ECDSA/RSA) binds the SHA-256 of the
exact file bytes plus the weights' own SHA-256. The signature is what refuses a swapped model:
the checkpoint's own SHA-256 field only catches corruption, since whoever swaps the file can
recompute it. At start-up the service reads the file once, verifies the manifest (and an
optional pinned hash) over those bytes, and loads the model from the very bytes it verified,
so a file swapped between check and load cannot slip in.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medsec.errors import MedsecError
from medsec.integrity.dicom_signature import write_new
from medsec.integrity.keys import TrustStore
from medsec.integrity.manifest import build_manifest, verify_manifest
from medsec.models import Victim, load_checkpoint
from medsec.utils import sha256_bytes

KIND = "medsec-checkpoint-file"
ARRAY = "checkpoint"


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    return {ARRAY: np.frombuffer(data, dtype=np.uint8)}


def sign_checkpoint(
    checkpoint: Path,
    manifest_path: Path,
    key: Path,
    cert: Path,
    overwrite: bool = False,
    label: Path | None = None,
) -> str:
    """Write a detached signed manifest for ``checkpoint``; returns the file's SHA-256.

    ``label`` names the file in errors when ``checkpoint`` is a copy of what the user gave.
    """
    try:
        data = Path(checkpoint).read_bytes()
    except OSError as exc:
        raise MedsecError(
            f"checkpoint {label or checkpoint}: cannot read ({exc.strerror})"
        ) from exc
    _, meta = _load_from_bytes(data, Path(label or checkpoint))  # only sign real checkpoints
    manifest = build_manifest(
        _arrays(data),
        Path(key),
        Path(cert),
        subject=Path(checkpoint).name,
        kind=KIND,
        metadata={"weights_sha256": meta["sha256"], "arch": meta["arch"]},
    )
    write_new(Path(manifest_path), (json.dumps(manifest, indent=2) + "\n").encode(), overwrite)
    return sha256_bytes(data)


def _load_from_bytes(data: bytes, label: Path) -> tuple[Victim, dict[str, Any]]:
    """Load a checkpoint from bytes in memory (via a private temporary file)."""
    fd, tmp = tempfile.mkstemp(prefix=".medsec-model-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return load_checkpoint(tmp)
    except MedsecError as exc:
        raise MedsecError(str(exc).replace(tmp, str(label))) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_verified_model(
    checkpoint: Path, manifest_path: Path, trust: TrustStore, pinned_sha256: str | None = None
) -> tuple[Victim, dict[str, Any]]:
    """Verify the checkpoint's signature (and pin) and load it; any failure is a MedsecError.

    Returns the model in eval mode and its meta, with ``file_sha256`` added.
    """
    try:
        data = Path(checkpoint).read_bytes()
    except OSError as exc:
        raise MedsecError(f"model checkpoint {checkpoint}: cannot read ({exc.strerror})") from exc
    file_sha = sha256_bytes(data)
    if pinned_sha256 is not None and file_sha != pinned_sha256:
        raise MedsecError(
            f"model checkpoint {checkpoint}: SHA-256 {file_sha[:16]}... differs from the pinned "
            f"{pinned_sha256[:16]}...; refusing to start"
        )
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, ValueError) as exc:
        raise MedsecError(f"model signature {manifest_path}: cannot read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("payload", {}).get("kind") != KIND:
        raise MedsecError(f"model signature {manifest_path}: not a checkpoint manifest")
    result = verify_manifest(manifest, _arrays(data), trust)
    if not result.ok:
        raise MedsecError(
            f"model checkpoint {checkpoint}: signature check failed ({result.reason}); "
            "refusing to start"
        )
    model, meta = _load_from_bytes(data, Path(checkpoint))
    return model, {**meta, "file_sha256": file_sha}
