"""The one data record every source yields: float32 images in [0,1], NCHW, integer labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsec.errors import MedsecError
from medsec.imaging.pixels import resize_batch  # the one resize, shared with the service
from medsec.utils import hash_arrays

__all__ = ["SIZES", "SPLITS", "Dataset", "Split", "resize_batch", "to_float_nchw"]

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class Split:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise MedsecError(f"images must be NCHW, got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise MedsecError(
                f"{len(self.images)} images but {len(self.labels)} labels in one split"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A classification data set with train/val/test splits and where it came from."""

    name: str
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise MedsecError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def content_hash(self) -> str:
        """SHA-256 over every split's images and labels: what a checkpoint was trained on."""
        arrays = [a for s in SPLITS for a in (self.split(s).images, self.split(s).labels)]
        return hash_arrays(*arrays, extra=self.name + "|" + ",".join(self.class_names))

    def summary(self) -> dict[str, Any]:
        """Small JSON-able description for reports."""
        return {
            "name": self.name,
            "channels": self.channels,
            "size": self.size,
            "classes": list(self.class_names),
            "n": {s: len(self.split(s)) for s in SPLITS},
            "class_counts": {
                s: np.bincount(self.split(s).labels, minlength=self.num_classes).tolist()
                for s in SPLITS
            },
            "content_hash": self.content_hash,
            "provenance": self.provenance,
        }


def to_float_nchw(images: np.ndarray, source: str) -> np.ndarray:
    """Convert uint8/uint16/float arrays (N,H,W), (N,H,W,C) or (N,C,H,W) to float32 NCHW [0,1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim != 4:
        raise MedsecError(f"{source}: expected images (N,H,W) or (N,H,W,C), got {a.shape}")
    if a.dtype == np.uint8:
        out = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        out = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        out = a.astype(np.float32)
        if out.size and (np.nanmin(out) < 0 or np.nanmax(out) > 1 or np.isnan(out).any()):
            raise MedsecError(f"{source}: float images must lie in [0, 1] without NaN")
    else:
        raise MedsecError(f"{source}: unsupported image dtype {a.dtype}")
    return np.ascontiguousarray(out)
