"""Data sources, all yielding one :class:`Dataset` record.

A spec names a source:
- ``cxr-nodule`` / ``fundus-lesion``: embedded default data (real anatomy, synthetic findings);
- ``medmnist:PATH`` (a MedMNIST ``.npz`` file, or a directory plus ``--flag``);
- ``folder:PATH`` (``PATH/<split>/<class>/image``);
- ``dicom:CSV`` (a CSV of ``path,label[,split]`` rows pointing at DICOM files).
A bare path is recognised by its shape (``.npz`` file, ``.csv`` file, directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsec.data.base import SIZES, SPLITS, Dataset, Split
from medsec.errors import MedsecError

EMBEDDED = ("cxr-nodule", "fundus-lesion")


def load_dataset(spec: str, *, size: int = 64, **kwargs: Any) -> Dataset:
    """Load the data set named by ``spec`` at ``size`` x ``size`` pixels.

    Extra keyword arguments go to the source (e.g. ``n_train``/``seed``/``cache_dir`` for
    embedded data, ``flag`` for MedMNIST directories).
    """
    if size not in SIZES:
        raise MedsecError(f"image size must be one of {SIZES}, got {size}")
    kind, _, rest = spec.partition(":")
    if spec in EMBEDDED:
        from medsec.data.synthetic import make_embedded

        return make_embedded(spec, size=size, **kwargs)
    if not rest:  # a bare path: guess the source from its shape
        path = Path(spec)
        if not path.exists():
            raise MedsecError(
                f"unknown data set {spec!r}: not one of {', '.join(EMBEDDED)} and no such file"
            )
        kind = (
            "medmnist"
            if path.suffix == ".npz"
            else "dicom"
            if path.suffix == ".csv"
            else ("folder" if path.is_dir() else "")
        )
        rest = spec
    kwargs = {k: v for k, v in kwargs.items() if k in _SOURCE_KWARGS.get(kind, ())}
    if kind == "medmnist":
        from medsec.data.medmnist import load_medmnist

        return load_medmnist(rest, size=size, **kwargs)
    if kind == "folder":
        from medsec.data.folder import load_folder

        return load_folder(rest, size=size, **kwargs)
    if kind == "dicom":
        from medsec.data.dicom import load_dicom_csv

        return load_dicom_csv(rest, size=size, **kwargs)
    raise MedsecError(
        f"cannot tell what data set {spec!r} is; use one of {', '.join(EMBEDDED)}, "
        "medmnist:FILE.npz, folder:DIR or dicom:LABELS.csv"
    )


_SOURCE_KWARGS: dict[str, tuple[str, ...]] = {
    "medmnist": ("flag", "seed"),
    "folder": ("seed", "val_fraction", "channels"),
    "dicom": ("seed", "val_fraction", "test_fraction", "channels", "window"),
}

__all__ = ["EMBEDDED", "SIZES", "SPLITS", "Dataset", "Split", "load_dataset"]
