"""Checkpoints that say what they are: architecture, data hash, metrics, and a SHA-256 of the
weights checked on every load. The hash catches corruption, not a deliberate swap (whoever
swaps the weights can recompute it); the service verifies a signature over the file for that.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from medsec.errors import MedsecError
from medsec.imaging.pixels import InputContract
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
    input_contract: dict[str, Any] | None = None,
) -> str:
    """Write atomically; return the SHA-256 of the serialised weights.

    ``input_contract`` (an :class:`InputContract` dict, e.g. a DICOM data set's provenance
    ``input``) says how pixels become model input; the default is the stored-range contract.
    """
    if input_contract is None:
        contract = InputContract(model.in_channels, image_size)
    else:
        contract = InputContract.from_dict(input_contract)
    if (contract.channels, contract.size) != (model.in_channels, image_size):
        raise MedsecError(
            f"input contract {contract.channels}x{contract.size} px does not fit the model "
            f"({model.in_channels}x{image_size} px)"
        )
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    state = buf.getvalue()
    digest = sha256_bytes(state)
    meta = {
        "arch": arch,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "image_size": image_size,
        "input": contract.to_dict(),
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
    """Load and verify a checkpoint; returns (model in eval mode, meta incl. ``sha256``).

    Every defect (not a checkpoint, a field missing or of the wrong type, weights that do not
    match the SHA-256, do not fit the architecture or are not finite) is one MedsecError.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsecError(f"checkpoint {path} does not exist or is not a file")
    blob = _torch_load(path.read_bytes(), f"checkpoint {path} is not a readable medsec checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise MedsecError(f"checkpoint {path} is not in format {FORMAT}")
    state, digest, meta = blob.get("state"), blob.get("sha256"), blob.get("meta")
    if not isinstance(state, bytes) or not isinstance(digest, str) or not isinstance(meta, dict):
        raise MedsecError(f"checkpoint {path} lacks its weights, SHA-256 or metadata")
    if sha256_bytes(state) != digest:
        raise MedsecError(f"checkpoint {path}: SHA-256 of the weights does not match; refusing it")
    bad = [k for k, kind in _META_FIELDS.items() if not isinstance(meta.get(k), kind)]
    bad += [k for k in _SIZES if k not in bad and meta[k] < 1]
    if bad:
        raise MedsecError(f"checkpoint {path}: metadata missing or invalid: {', '.join(bad)}")
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
    weights = _torch_load(state, f"checkpoint {path}: the weights are not readable")
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise MedsecError(f"checkpoint {path}: the weights are not a table of tensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # missing / unexpected keys, shapes that do not fit
        first = str(exc).strip().splitlines()[-1].strip()
        raise MedsecError(
            f"checkpoint {path}: weights do not fit a {meta['arch']} model ({first})"
        ) from exc
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise MedsecError(f"checkpoint {path}: weights contain NaN or infinity")
    meta = {**meta, "sha256": digest}
    return model.to(device).eval(), meta


_SIZES = ("in_channels", "num_classes", "image_size")
_META_FIELDS: dict[str, type] = {"arch": str, "data_hash": str} | dict.fromkeys(_SIZES, int)


def _torch_load(data: bytes, refusal: str) -> Any:
    """``torch.load`` of untrusted bytes (weights only); any failure is the one ``refusal``."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign bytes; all mean "not ours"
        raise MedsecError(f"{refusal} ({exc.__class__.__name__})") from exc
