"""The one result cache of a study: JSON cells and trained artefacts, below both the defences
(which cache what they train) and the evaluation (which caches every unit of work).

A cell is stored atomically with its full key and a SHA-256 digest of its result. A cell
whose file is damaged (not JSON, not UTF-8, wrong shape), whose key differs, or whose result
no longer matches its digest (edited by hand) is recomputed, never trusted. A trained
artefact is stored with its record; a damaged one is retrained.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medsec.utils import atomic_write_bytes, atomic_write_json

# what loading a damaged torch file or record raises (weights_only=True refuses pickles)
LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)


def jsonable(obj: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars by Python ones so JSON stays standard."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (at most 80 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (what a cell's result is checked against)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_cell(path: Path, key: dict[str, Any]) -> tuple[Any, str | None]:
    """(result, None) for a sound cell stored under ``key``; (None, why) otherwise."""
    if not path.exists():
        return None, "absent"
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "damaged (not readable JSON)"
    if not isinstance(stored, dict) or not {"key", "result", "sha256"} <= stored.keys():
        return None, "damaged (not a medsec cell)"
    if stored["key"] != key:
        return None, "stored under another key"
    if digest(stored["result"]) != stored["sha256"]:
        return None, "its result does not match its digest (edited or corrupted)"
    return stored["result"], None


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for making ``path``: workers of a distributed run that need the
    same cell or artefact wait for the first one instead of computing it twice (callers read
    the cache again once they hold the lock). The lock file is removed afterwards; one
    opened before the removal still serialises, and its holder then finds the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_cell(
    path: Path,
    key: dict[str, Any],
    compute: Callable[[], Any],
    warn: Callable[[str], None] | None = None,
) -> tuple[Any, bool]:
    """(result, computed): the sound cached result for ``key`` or a fresh one, stored
    atomically with its key and digest. ``warn`` hears why a present cell was not used."""
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    result, why = read_cell(path, key)
    if why is None:
        return result, False
    with exclusive(path):
        result, why = read_cell(path, key)  # another worker may have made it meanwhile
        if why is None:
            return result, False
        if why != "absent" and warn is not None:
            warn(f"cell {path.name} {why}: recomputing")
        result = jsonable(compute())
        atomic_write_json(path, {"key": key, "result": result, "sha256": digest(result)})
    return result, True


class ArtifactStore:
    """Trained artefacts of one (data, victim) pair under ``root``; ``tag`` names the pair."""

    def __init__(self, root: Path, tag: str) -> None:
        self.root = root
        self.tag = tag

    def path(self, name: str) -> Path:
        """Where artefact ``name`` lives (its folder created)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def trained(
        self, name: str, model: nn.Module, train: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Load ``model``'s weights from artefact ``name`` (+ its .json record) or train and
        store both; the record gains ``artifact`` (cells key on it) and ``cached``.

        ``name`` must hold every setting that changes the weights (the tag is prepended).
        """
        path = self.path(f"{name}-{self.tag}.pt")
        meta = _load_trained(model, path)
        if meta is None:
            with exclusive(path):
                meta = _load_trained(model, path)  # another worker may have trained it
                if meta is None:
                    meta = train()
                    buf = io.BytesIO()
                    torch.save(model.state_dict(), buf)
                    atomic_write_bytes(path, buf.getvalue())
                    atomic_write_json(path.with_suffix(".json"), meta)
                    return meta | {"cached": False, "artifact": path.name}
        return meta | {"cached": True, "artifact": path.name}

    def tensors(self, name: str, make: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Tensors cached as artefact ``name`` (e.g. adversarial fit sets); damaged -> remade."""
        path = self.path(f"{self.tag}/{name}.pt")
        blob = _load_tensors(path)
        if blob is None:
            with exclusive(path):
                blob = _load_tensors(path)  # another worker may have made it
                if blob is None:
                    blob = make()
                    buf = io.BytesIO()
                    torch.save(blob, buf)
                    atomic_write_bytes(path, buf.getvalue())
        return blob


def _load_trained(model: nn.Module, path: Path) -> dict[str, Any] | None:
    """The record of a sound trained artefact, its weights loaded into ``model``; None if
    absent or damaged (then it is retrained)."""
    meta_path = path.with_suffix(".json")
    if not (path.exists() and meta_path.exists()):
        return None
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        meta = json.loads(meta_path.read_text())
    except LOAD_ERRORS:  # (JSON and Unicode errors are ValueErrors)
        return None
    model.eval()
    return meta


def _load_tensors(path: Path) -> dict[str, Tensor] | None:
    """Cached tensors, or None if absent or damaged (then they are remade)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except LOAD_ERRORS:
        return None
