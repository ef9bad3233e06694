"""Embedded default data: REAL anatomy from well-kept packages, SYNTHETIC findings injected.

- ``cxr-nodule``: views of the real chest radiograph RG1_UNCI.dcm (pydicom-data), strongly
  augmented (affine, elastic, gamma/contrast, blur, noise); class 1 has a nodule-like opacity
  injected in a lung field.
- ``fundus-lesion``: views of scikit-image's retina photograph (RGB); class 1 has
  microaneurysm / haemorrhage-like dark-red spots inside the field of view.

Every image is generated from its own seeded random stream, so a data set is a pure function
of (name, size, split sizes, seed, generator version). Not clinical data: one source image,
many views; the findings are drawn by this module.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medsec.data.base import SPLITS, Dataset, Split
from medsec.errors import MedsecError
from medsec.paths import check_writable_dir
from medsec.utils import atomic_write_bytes, hash_arrays

GENERATOR_VERSION = 1
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Difficulty knobs (fractions of the image side; intensity in [0,1] units), tuned so a small
# CNN lands in the 85-97% test-accuracy band: a realistic task, not a trivial one.
CXR_NODULE_SIGMA = (0.03, 0.055)
CXR_NODULE_AMP = (0.3, 0.5)
FUNDUS_LESION_AMP = (0.3, 0.6)


@dataclass(frozen=True)
class Source:
    """A real image resampled once: (C, H, W) float32 in [0,1] plus masks in its pixel grid."""

    image: np.ndarray
    finding_mask: np.ndarray  # where findings may be injected (lung fields / field of view)
    centre: tuple[float, float]
    half_extent: float  # half side of the default view, in source pixels
    pad_mode: str  # how views that leave the image are filled (scipy.ndimage mode)


def default_cache_dir() -> Path:
    """``$MEDSEC_CACHE`` or ``~/.cache/medsec``."""
    env = os.environ.get("MEDSEC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medsec"


@functools.lru_cache(maxsize=4)
def _cxr_source(res: int) -> Source:
    import pydicom
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        raise MedsecError("pydicom-data's RG1_UNCI.dcm not found; reinstall `pydicom-data`")
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = a.max() - a  # display convention: air dark, bone bright
    lo, hi = np.percentile(a, [1, 99])
    a = np.clip((a - lo) / (hi - lo), 0, 1)
    h = res
    w = round(res * a.shape[1] / a.shape[0])
    img = resize(a, (h, w), anti_aliasing=True).astype(np.float32)
    # Lung fields: dark regions inside two boxes drawn on this radiograph (fractions of H, W).
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w], dtype=np.float32)[:, None, None]
    boxes = ((yy > 0.12) & (yy < 0.75)) & (
        ((xx > 0.14) & (xx < 0.41)) | ((xx > 0.58) & (xx < 0.86))
    )
    smooth = ndimage.gaussian_filter(img, res / 64)
    thr = np.percentile(smooth[boxes], 60)
    mask = ndimage.binary_erosion(boxes & (smooth < thr), iterations=max(1, res // 128))
    return Source(
        img[None], mask, centre=(0.45 * h, 0.5 * w), half_extent=0.40 * h, pad_mode="reflect"
    )


@functools.lru_cache(maxsize=4)
def _fundus_source(res: int) -> Source:
    from skimage import data
    from skimage.transform import resize

    rgb = data.retina().astype(np.float32) / 255.0
    img = resize(rgb, (res, res), anti_aliasing=True).astype(np.float32).transpose(2, 0, 1)
    fov = ndimage.gaussian_filter(img.mean(0), res / 128) > 0.08
    fov = ndimage.binary_fill_holes(ndimage.binary_opening(fov, iterations=2))
    ys, xs = np.nonzero(fov)
    cy, cx = ys.mean(), xs.mean()
    radius = np.sqrt(fov.sum() / np.pi)
    yy, xx = np.mgrid[0:res, 0:res]
    inner = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.8 * radius) ** 2
    return Source(img, inner, centre=(cy, cx), half_extent=1.02 * radius, pad_mode="constant")


def _view_coords(
    src: Source,
    size: int,
    rng: np.random.Generator,
    *,
    max_rot: float,
    scale: tuple[float, float],
    shift: float,
    elastic: float,
    flip: bool,
) -> np.ndarray:
    """Source-pixel coordinates (2, size, size) of a random affine + elastic view."""
    u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    gy, gx = np.meshgrid(u, u, indexing="ij")
    if flip and rng.random() < 0.5:
        gx = -gx
    theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
    s = src.half_extent * rng.uniform(*scale)
    cy = src.centre[0] + rng.uniform(-shift, shift) * src.half_extent
    cx = src.centre[1] + rng.uniform(-shift, shift) * src.half_extent
    c, sn = np.cos(theta), np.sin(theta)
    ys = cy + s * (c * gy - sn * gx)
    xs = cx + s * (sn * gy + c * gx)
    if elastic > 0:  # smooth random displacement field, amplitude in units of the view
        coarse = rng.normal(0, elastic * s, size=(2, 5, 5)).astype(np.float32)
        field = np.stack([ndimage.zoom(f, size / 5, order=3) for f in coarse])
        ys = ys + field[0, :size, :size]
        xs = xs + field[1, :size, :size]
    return np.stack([ys, xs])


def _sample(src: Source, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = np.stack(
        [ndimage.map_coordinates(ch, coords, order=1, mode=src.pad_mode) for ch in src.image]
    )
    mask = (
        ndimage.map_coordinates(
            src.finding_mask.astype(np.float32), coords, order=0, mode="constant"
        )
        > 0.5
    )
    return img, mask


def _blob(size: int, cy: float, cx: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A slightly elliptical, soft-edged Gaussian blob (peak 1)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ratio = rng.uniform(0.7, 1.3)
    ang = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    a = (np.cos(ang) * dy + np.sin(ang) * dx) / (sigma * ratio)
    b = (-np.sin(ang) * dy + np.cos(ang) * dx) / sigma
    return np.exp(-0.5 * (a * a + b * b))


def _pick(mask: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[float, float]:
    inner = mask.copy()
    inner[:margin] = inner[-margin:] = False
    inner[:, :margin] = inner[:, -margin:] = False
    ys, xs = np.nonzero(inner if inner.any() else mask)
    if len(ys) == 0:  # view missed the finding region entirely: use the centre
        n = mask.shape[0]
        return n / 2, n / 2
    i = rng.integers(len(ys))
    return float(ys[i] + rng.uniform(-0.5, 0.5)), float(xs[i] + rng.uniform(-0.5, 0.5))


def _photometric(
    img: np.ndarray, rng: np.random.Generator, size: int, *, per_channel: bool
) -> np.ndarray:
    """Gamma, contrast, brightness, blur and sensor noise."""
    c = img.shape[0]
    gamma = rng.uniform(0.7, 1.4, size=(c, 1, 1) if per_channel else 1)
    img = np.clip(img, 0, 1) ** gamma
    contrast = rng.uniform(0.75, 1.25)
    bright = rng.uniform(-0.08, 0.08)
    img = (img - 0.5) * contrast + 0.5 + bright
    if per_channel:
        img = img * rng.uniform(0.9, 1.1, size=(c, 1, 1))
    sigma = rng.uniform(0, 0.6) * size / 64
    if sigma > 0.05:
        img = np.stack([ndimage.gaussian_filter(ch, sigma) for ch in img])
    img = img + rng.normal(0, rng.uniform(0.01, 0.035), size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _cxr_image(size: int, label: int, rng: np.random.Generator) -> np.ndarray:
    src = _cxr_source(256 if size <= 128 else 512)
    coords = _view_coords(
        src, size, rng, max_rot=10, scale=(0.85, 1.15), shift=0.12, elastic=0.035, flip=True
    )
    img, mask = _sample(src, coords)
    if label == 1:  # a nodule: a faint, round opacity in a lung field
        cy, cx = _pick(mask, rng, margin=max(2, size // 16))
        sigma = rng.uniform(*CXR_NODULE_SIGMA) * size
        amp = rng.uniform(*CXR_NODULE_AMP)
        img = img + amp * _blob(size, cy, cx, sigma, rng)[None]
    return _photometric(img, rng, size, per_channel=False)


def _fundus_image(size: int, label: int, rng: np.random.Generator) -> np.ndarray:
    src = _fundus_source(256 if size <= 128 else 512)
    coords = _view_coords(
        src, size, rng, max_rot=180, scale=(0.9, 1.1), shift=0.05, elastic=0.02, flip=True
    )
    img, mask = _sample(src, coords)
    if label == 1:  # microaneurysms (tiny) and haemorrhages (blots): dark red
        darken = np.zeros((size, size), dtype=np.float32)
        for _ in range(rng.integers(1, 4)):
            cy, cx = _pick(mask, rng, margin=max(2, size // 16))
            big = rng.random() < 0.35
            sigma = rng.uniform(0.025, 0.045) * size if big else rng.uniform(0.012, 0.022) * size
            darken = np.maximum(
                darken, rng.uniform(*FUNDUS_LESION_AMP) * _blob(size, cy, cx, sigma, rng)
            )
        tint = np.array([0.55, 1.0, 0.9], dtype=np.float32)[:, None, None]
        img = img * (1 - darken[None] * tint)
    return _photometric(img, rng, size, per_channel=True)


_GENERATORS = {
    "cxr-nodule": (_cxr_image, ("no finding", "nodule"), "pydicom-data RG1_UNCI.dcm (CR chest)"),
    "fundus-lesion": (_fundus_image, ("no lesion", "red lesion"), "scikit-image data.retina()"),
}


def generate_split(
    name: str, split: str, n: int, size: int, seed: int, progress: bool = True
) -> Split:
    """Generate one split: balanced labels, one seeded random stream per image."""
    make, _, _ = _GENERATORS[name]
    label_rng = np.random.default_rng([seed, _SPLIT_IDS[split], 0xC1A55])
    labels = label_rng.permutation(np.arange(n) % 2).astype(np.int64)
    first = (
        make(size, int(labels[0]), np.random.default_rng([seed, _SPLIT_IDS[split], 0]))
        if n
        else np.zeros((3 if name == "fundus-lesion" else 1, size, size), np.float32)
    )
    images = np.empty((n, *first.shape), dtype=np.float32)
    for i in tqdm(range(n), desc=f"{name} {split}", disable=not progress or n == 0, leave=False):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        images[i] = first if i == 0 else make(size, int(labels[i]), rng)
    return Split(images, labels)


def make_embedded(
    name: str,
    *,
    size: int = 64,
    n_train: int = 4000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Dataset:
    """Build (or load from the .npz cache) an embedded data set."""
    if name not in _GENERATORS:
        raise MedsecError(f"unknown embedded data set {name!r}; choose {', '.join(_GENERATORS)}")
    for label, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 2:
            raise MedsecError(f"{label} must be >= 2, got {n}")
    _, classes, source = _GENERATORS[name]
    counts = {"train": n_train, "val": n_val, "test": n_test}
    knobs = (CXR_NODULE_SIGMA, CXR_NODULE_AMP, FUNDUS_LESION_AMP)
    key = hash_arrays(extra=f"v{GENERATOR_VERSION}|{name}|{size}|{counts}|{seed}|{knobs}")[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{name}-{size}px-{key}.npz"
    provenance = {
        "source": source,
        "kind": "embedded: real anatomy, synthetic findings (not clinical data)",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "cache_file": str(path),
    }
    splits: dict[str, Split] = {}
    if path.exists():
        try:
            with np.load(path) as z:
                splits = {s: Split(z[f"{s}_images"], z[f"{s}_labels"]) for s in SPLITS}
        except Exception:  # a damaged cache entry is regenerated, never trusted
            splits = {}
    if not splits:
        check_writable_dir(cache, what="data cache (MEDSEC_CACHE)")  # before minutes of work
        splits = {s: generate_split(name, s, counts[s], size, seed, progress) for s in SPLITS}
        import io

        buf = io.BytesIO()
        np.savez(
            buf, **{f"{s}_{k}": getattr(splits[s], k) for s in SPLITS for k in ("images", "labels")}
        )
        atomic_write_bytes(path, buf.getvalue())
    return Dataset(name, splits["train"], splits["val"], splits["test"], classes, provenance)
