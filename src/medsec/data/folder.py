"""Image folders laid out as ``PATH/<split>/<class>/<image>``, turned into a :class:`Dataset`.

This is the common way users keep their own images. Also home of the helpers the DICOM loader
shares: a seeded stratified split and one channel convention for a whole data set.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from medsec.data.base import SPLITS, Dataset, Split, resize_batch
from medsec.errors import MedsecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_PREFIX = re.compile(r"^(\d+)[_\-. ]*(.*)$")
_LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # skimage's rgb2gray weights


def load_folder(
    path: str,
    *,
    size: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    channels: int | None = None,
) -> Dataset:
    """Load ``PATH/{train,val,test}/<class>/<image>`` at ``size`` x ``size``.

    ``val`` may be absent: it is then split off ``train`` (stratified, seeded). Class folders
    ``0_control``, ``1_case`` are ordered by their number and named without it; otherwise
    classes are alphabetical. Images are stretched to a square; ``channels`` (1 or 3) fixes
    grayscale/RGB, else the majority of files decides.
    """
    root = Path(path)
    if not root.is_dir():
        raise MedsecError(f"{root}: no such image folder")
    check_fractions(val_fraction=val_fraction)
    check_channels(channels)
    present = [s for s in SPLITS if (root / s).is_dir()]
    for required in ("train", "test"):
        if required not in present:
            raise MedsecError(f"{root}: missing the {required}/ folder (need train/ and test/)")
    folders, class_names = _class_folders(root, present)
    images: dict[str, list[np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    for split in present:
        images[split], labels[split] = _read_split(root / split, folders, size)
    n_files = sum(len(v) for v in images.values())
    channels = channels or majority_channels(x for v in images.values() for x in v)
    stacked = {s: stack_images(images[s], channels, size) for s in present}
    if "val" not in present:
        parts = stratified_split(labels["train"], {"val": val_fraction}, seed)
        if val_fraction > 0 and len(parts["val"]) == 0:
            raise MedsecError(
                f"{root / 'train'}: only {len(labels['train'])} image(s), too few to split off "
                "a validation set; add a val/ folder"
            )
        for s in ("val", "train"):
            stacked[s], labels[s] = stacked["train"][parts[s]], labels["train"][parts[s]]
    return Dataset(
        name=root.resolve().name,
        train=Split(stacked["train"], labels["train"]),
        val=Split(stacked["val"], labels["val"]),
        test=Split(stacked["test"], labels["test"]),
        class_names=class_names,
        provenance={
            "source": "folder",
            "path": str(root.resolve()),
            "class_folders": list(folders),
            "files": n_files,
            "val": "folder" if "val" in present else f"split off train (seed {seed})",
        },
    )


def _class_folders(root: Path, splits: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Class folder names in class order, and the class names, identical in every split."""
    per_split = {
        s: sorted(d.name for d in (root / s).iterdir() if d.is_dir() and not d.name.startswith("."))
        for s in splits
    }
    reference = per_split["train"]
    if not reference:
        raise MedsecError(f"{root / 'train'}: no class folders")
    for s, names in per_split.items():
        if names != reference:
            extra = sorted(set(names) - set(reference))
            lacking = sorted(set(reference) - set(names))
            raise MedsecError(
                f"{root / s}: class folders differ from train/ "
                f"(extra: {extra or 'none'}, missing: {lacking or 'none'})"
            )
    matches = [_PREFIX.match(n) for n in reference]
    if all(matches):
        order = sorted(range(len(reference)), key=lambda i: (int(matches[i][1]), reference[i]))
        folders = tuple(reference[i] for i in order)
        names = tuple(matches[i][2] or reference[i] for i in order)
    else:
        folders = names = tuple(reference)
    if len(set(names)) != len(names):
        raise MedsecError(f"{root / 'train'}: class folders {folders} give duplicate class names")
    return folders, names


def _read_split(
    split_dir: Path, folders: tuple[str, ...], size: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image of one split, each CHW float32 at ``size``, with its class index."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        for f in sorted((split_dir / folder).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                images.append(read_image(f, size))
                labels.append(label)
    if not images:
        raise MedsecError(f"{split_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this split")
    return images, np.asarray(labels, dtype=np.int64)


def read_image(file: Path, size: int) -> np.ndarray:
    """One PNG/JPEG/TIFF/BMP as CHW float32 in [0, 1], 1 or 3 channels, resized to ``size``."""
    from skimage import io

    try:
        a = np.asarray(io.imread(file))
    except Exception as e:  # the imaging plugins raise many unrelated types
        raise MedsecError(f"{file}: unreadable image ({e})") from e
    if a.ndim == 3 and a.shape[-1] in (2, 4):  # drop an alpha channel
        a = a[..., :-1]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or min(a.shape[:2]) == 0:
        raise MedsecError(f"{file}: image of shape {a.shape}; expected one grayscale/RGB frame")
    if a.dtype == bool:
        x = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        x = np.clip(a, 0, None).astype(np.float32) / float(np.iinfo(a.dtype).max)
    else:
        x = a.astype(np.float32)
        if np.isnan(x).any() or x.min() < 0 or x.max() > 1:
            raise MedsecError(f"{file}: floating-point image must lie in [0, 1]")
    chw = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return resize_batch(np.ascontiguousarray(chw)[None], size)[0]


def majority_channels(images: Iterable[np.ndarray]) -> int:
    """1 or 3: the channel count most of ``images`` (CHW arrays) have; ties go to RGB."""
    counts = Counter(int(x.shape[0]) for x in images)
    return 3 if counts[3] >= counts[1] else 1


def stack_images(images: list[np.ndarray], channels: int, size: int) -> np.ndarray:
    """Stack CHW images into NCHW with ``channels`` channels (gray repeated, RGB to luma)."""
    out = np.empty((len(images), channels, size, size), dtype=np.float32)
    for i, x in enumerate(images):
        if x.shape[0] == channels:
            out[i] = x
        elif channels == 3:
            out[i] = np.repeat(x, 3, axis=0)
        else:
            out[i, 0] = np.tensordot(_LUMA, x, axes=1)
    return out


def stratified_split(
    labels: np.ndarray, fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Seeded per-class split of indices into ``fractions`` plus the remainder as ``train``.

    Each class keeps at least one training example; a split with a positive fraction that
    rounding leaves empty borrows one example from the class with most training examples.
    Indices inside each split are sorted so the result does not depend on dict order.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    train: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, frac in fractions.items():
            k = max(0, min(int(np.floor(frac * len(idx) + 0.5)), len(idx) - start - 1))
            parts[name].append(idx[start : start + k])
            start += k
        train.append(idx[start:])
    for name, frac in fractions.items():
        if frac > 0 and sum(len(p) for p in parts[name]) == 0:
            biggest = max(range(len(train)), key=lambda i: len(train[i]), default=None)
            if biggest is not None and len(train[biggest]) > 1:
                parts[name].append(train[biggest][-1:])
                train[biggest] = train[biggest][:-1]
    out = {name: np.sort(np.concatenate(p or [np.empty(0, np.int64)])) for name, p in parts.items()}
    out["train"] = np.sort(np.concatenate(train or [np.empty(0, np.int64)]))
    return {k: v.astype(np.int64) for k, v in out.items()}


def check_fractions(**fractions: float) -> None:
    """Each split fraction in [0, 1) and together below 1, so training keeps examples."""
    for name, f in fractions.items():
        if not 0 <= f < 1:
            raise MedsecError(f"{name} must be in [0, 1), got {f}")
    if sum(fractions.values()) >= 1:
        raise MedsecError(f"split fractions {fractions} leave nothing to train on")


def check_channels(channels: int | None) -> None:
    """``channels`` must be None (decide from the files), 1 (grayscale) or 3 (RGB)."""
    if channels not in (None, 1, 3):
        raise MedsecError(f"channels must be 1 or 3, got {channels}")
