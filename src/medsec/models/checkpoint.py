"""Checkpoints that say what they are: architecture, data hash, metrics, and a SHA-256 of the
weights that is checked on every load (a corrupted model is refused; a swapped one is refused
only by a signature over the file, as the service checks, since a swapper recomputes this)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from medsec.errors import MedsecError
from medsec.models.architectures import Victim, create_model
from medsec.utils import atomic_write_bytes, sha256_bytes

FORMAT = "medsec-checkpoint/1"


def save_checkpoint(
    path: str | Path,
    model: Victim,
    *,
    arch: str,
    data_hash: str,
    image_size: int,
    metrics: dict[str, Any],
    settings: dict[str, Any],
) -> str:
    """Write atomically; return the SHA-256 of the serialised weights."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    state = buf.getvalue()
    digest = sha256_bytes(state)
    meta = {
        "arch": arch,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "image_size": image_size,
        "data_hash": data_hash,
        "metrics": metrics,
        "settings": settings,
    }
    out = io.BytesIO()
    torch.save({"format": FORMAT, "meta": meta, "state": state, "sha256": digest}, out)
    atomic_write_bytes(path, out.getvalue())
    return digest


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu", expect_data_hash: str | None = None
) -> tuple[Victim, dict[str, Any]]:
    """Load and verify a checkpoint; returns (model in eval mode, meta incl. ``sha256``)."""
    path = Path(path)
    if not path.is_file():
        raise MedsecError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedsecError(
            f"checkpoint {path} is not a readable medsec checkpoint ({exc.__class__.__name__})"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise MedsecError(f"checkpoint {path} is not in format {FORMAT}")
    if sha256_bytes(blob["state"]) != blob["sha256"]:
        raise MedsecError(f"checkpoint {path}: SHA-256 of the weights does not match; refusing it")
    meta = blob["meta"]
    if expect_data_hash is not None and meta["data_hash"] != expect_data_hash:
        raise MedsecError(
            f"checkpoint {path} was trained on other data (hash {meta['data_hash'][:12]})"
        )
    model = create_model(
        meta["arch"],
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        image_size=meta["image_size"],
    )
    model.load_state_dict(
        torch.load(io.BytesIO(blob["state"]), map_location="cpu", weights_only=True)
    )
    meta = {**meta, "sha256": blob["sha256"]}
    return model.to(device).eval(), meta
