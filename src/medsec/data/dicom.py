"""DICOM files listed in a CSV (``path,label[,split]``), turned into a :class:`Dataset`.

Pixels go through :mod:`medsec.imaging.pixels`, the path the service uses too: by default the
modality LUT (rescale to e.g. Hounsfield units), the VOI LUT or window the file asks for, and a
per-image min-max to [0, 1] (what a radiologist's viewer shows), or one fixed ``window``.
MONOCHROME1 is inverted. The resulting input contract is kept in the provenance (``input``) so
a checkpoint trained on it records it and the service applies exactly the same steps.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsec.data.base import SPLITS, Dataset, Split
from medsec.data.folder import check_channels, check_fractions, majority_channels, stratified_split
from medsec.errors import MedsecError
from medsec.imaging.pixels import InputContract, dicom_image, fit_image


@dataclass(frozen=True)
class _Row:
    """One CSV row: where it is in the file, the DICOM path, raw label and split."""

    line: int
    path: Path
    label: str
    split: str | None


def load_dicom_csv(
    csv_path: str,
    *,
    size: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    channels: int | None = None,
    window: tuple[float, float] | None = None,
) -> Dataset:
    """Load the DICOM images a ``path,label[,split]`` CSV lists, at ``size`` x ``size``.

    Paths are relative to the CSV's folder. Labels are all integers (class indices) or all
    names (classes sorted). Without a ``split`` column (or without val rows) the split is
    stratified and seeded; ``channels`` (1 or 3) fixes grayscale/RGB, else the majority decides.
    ``window`` (center, width in modality units) replaces each file's own VOI and the min-max.
    """
    table = Path(csv_path)
    check_channels(channels)
    check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
    rows = _read_csv(table)
    has_split = rows[0].split is not None
    labels, class_names = _labels(table, rows)
    intensity = "window" if window is not None else "voi-minmax"
    images = [_read_dicom(table, r, intensity, window) for r in rows]
    contract = InputContract(channels or majority_channels(images), size, intensity, window)
    stacked = np.stack([fit_image(x, contract) for x in images])
    index = _split_rows(table, rows, labels, seed, val_fraction, test_fraction)
    splits = {s: Split(stacked[i], labels[i]) for s, i in index.items()}
    return Dataset(
        name=table.stem,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=class_names,
        provenance={
            "source": "dicom",
            "path": str(table.resolve()),
            "sha256": hashlib.sha256(table.read_bytes()).hexdigest(),
            "files": len(rows),
            "split": "csv column" if has_split else f"stratified (seed {seed})",
            "input": contract.to_dict(),
        },
    )


def _read_csv(table: Path) -> list[_Row]:
    """The CSV's rows, with the header and each row's fields checked."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            if "path" not in header or "label" not in header:
                raise MedsecError(f"{table}: header must be path,label[,split]; got {header}")
            reader.fieldnames = header
            has_split = "split" in header
            rows = []
            for rec in reader:
                line = reader.line_num
                path, label = (rec.get("path") or "").strip(), (rec.get("label") or "").strip()
                split = (rec.get("split") or "").strip().lower() if has_split else None
                if not path and not label and not split:
                    continue  # blank line
                if not path or not label:
                    raise MedsecError(f"{table}, line {line}: empty path or label")
                if split is not None and split not in SPLITS:
                    raise MedsecError(
                        f"{table}, line {line}: split {split!r} is not one of {', '.join(SPLITS)}"
                    )
                rows.append(_Row(line, table.parent / path, label, split))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MedsecError(f"{table}: cannot read the CSV ({e})") from e
    if not rows:
        raise MedsecError(f"{table}: no rows")
    return rows


def _labels(table: Path, rows: list[_Row]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices and names: integer labels are indices, otherwise sorted label names."""
    raw = [r.label for r in rows]
    if all(_is_int(x) for x in raw):
        labels = np.array([int(x) for x in raw], dtype=np.int64)
        bad = int(np.argmin(labels))
        if labels[bad] < 0:
            raise MedsecError(f"{table}, line {rows[bad].line}: negative label {labels[bad]}")
        return labels, tuple(str(i) for i in range(int(labels.max()) + 1))
    names = tuple(sorted(set(raw)))
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[x] for x in raw], dtype=np.int64), names


def _is_int(text: str) -> bool:
    """True for an integer literal such as ``3`` or ``-1``."""
    try:
        int(text)
    except ValueError:
        return False
    return True


def _read_dicom(
    table: Path, row: _Row, intensity: str, window: tuple[float, float] | None
) -> np.ndarray:
    """One DICOM image as CHW float32 in [0, 1] at its own size (see medsec.imaging.pixels)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    where = f"{table}, line {row.line} ({row.path})"
    try:
        ds = pydicom.dcmread(row.path)
    except FileNotFoundError as e:
        raise MedsecError(f"{where}: no such file") from e
    except (OSError, EOFError, ValueError, InvalidDicomError) as e:
        raise MedsecError(f"{where}: not a readable DICOM file ({e})") from e
    if "PixelData" not in ds:
        raise MedsecError(f"{where}: no pixel data")
    try:
        return dicom_image(ds, intensity, window)
    except MedsecError as e:
        raise MedsecError(f"{where}: {e}") from e


def _split_rows(
    table: Path,
    rows: list[_Row],
    labels: np.ndarray,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, np.ndarray]:
    """Row indices per split: from the CSV's split column, else stratified and seeded."""
    if rows[0].split is None:
        index = stratified_split(labels, {"val": val_fraction, "test": test_fraction}, seed)
    else:
        column = np.array([r.split for r in rows])
        index = {s: np.flatnonzero(column == s) for s in SPLITS}
        if len(index["val"]) == 0:
            part = stratified_split(labels[index["train"]], {"val": val_fraction}, seed)
            index["val"] = index["train"][part["val"]]
            index["train"] = index["train"][part["train"]]
    for s, frac in (("train", 1.0), ("val", val_fraction), ("test", 1.0)):
        if frac > 0 and len(index[s]) == 0:
            raise MedsecError(
                f"{table}: the {s} split is empty ({len(rows)} rows); add rows or a split column"
            )
    return index
