"""MedMNIST ``.npz`` files (2D flags), validated and turned into a :class:`Dataset`.

The files are what MedMNIST distributes: ``<flag>.npz`` (28 px) or ``<flag>_<size>.npz``, each
with six arrays ``{train,val,test}_{images,labels}``. Nothing is downloaded here: the user
points at files they already have, and every defect is reported naming the file.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsec.data.base import SPLITS, Dataset, Split, resize_batch, to_float_nchw
from medsec.errors import MedsecError


@dataclass(frozen=True)
class FlagInfo:
    """What MedMNIST documents for one 2D flag: channels, label names, licence."""

    channels: int
    class_names: tuple[str, ...]
    multi_label: bool = False
    licence: str = "CC BY 4.0"


_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

# Label names as in MedMNIST's own ``medmnist/info.py`` (v2/v3).
FLAGS: dict[str, FlagInfo] = {
    "pathmnist": FlagInfo(
        3,
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
    ),
    "chestmnist": FlagInfo(
        1,
        (
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
        multi_label=True,
    ),
    "dermamnist": FlagInfo(
        3,
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        licence="CC BY-NC 4.0",
    ),
    "octmnist": FlagInfo(
        1,
        (
            "choroidal neovascularization",
            "diabetic macular edema",
            "drusen",
            "normal",
        ),
    ),
    "pneumoniamnist": FlagInfo(1, ("normal", "pneumonia")),
    "retinamnist": FlagInfo(3, ("0", "1", "2", "3", "4")),
    "breastmnist": FlagInfo(1, ("malignant", "normal, benign")),
    "bloodmnist": FlagInfo(
        3,
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
    ),
    "tissuemnist": FlagInfo(
        1,
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
    ),
    "organamnist": FlagInfo(1, _ORGANS),
    "organcmnist": FlagInfo(1, _ORGANS),
    "organsmnist": FlagInfo(1, _ORGANS),
}

_FILE_NAME = re.compile(r"^(?P<flag>[a-z]+?)(?:_(?P<size>\d+))?\.npz$")


def load_medmnist(path: str, *, size: int, flag: str | None = None, seed: int = 0) -> Dataset:
    """Load a MedMNIST ``.npz`` file (or pick one from a directory) at ``size`` x ``size``.

    ``flag`` names the data set when ``path`` is a directory or a renamed file. ``seed`` is
    accepted so every source takes the same arguments; MedMNIST's splits are fixed, so it
    changes nothing and is only recorded in the provenance.
    """
    p = Path(path)
    if flag is not None and flag not in FLAGS:
        raise MedsecError(f"unknown MedMNIST flag {flag!r}; 2D flags: {', '.join(FLAGS)}")
    if p.is_dir():
        file, flag = _pick_file(p, flag, size)
    elif p.is_file():
        file, flag = p, _flag_of_file(p, flag)
    else:
        raise MedsecError(f"{p}: no such MedMNIST file or directory")
    info = FLAGS[flag]
    if info.multi_label:
        raise MedsecError(
            f"{file}: {flag} is multi-label ({len(info.class_names)} findings per image); "
            "medsec handles single-label classification only"
        )
    arrays = _read_npz(file)
    splits = {s: _make_split(file, s, arrays, info, size) for s in SPLITS}
    return Dataset(
        name=flag,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=info.class_names,
        provenance={
            "source": "medmnist",
            "path": str(file.resolve()),
            "flag": flag,
            "sha256": _sha256(file),
            "licence": info.licence,
            "native_size": int(arrays["train_images"].shape[1]),
            "seed": seed,
        },
    )


def _flag_of_file(file: Path, flag: str | None) -> str:
    """The flag from the file name, checked against an explicit ``flag`` if one was given."""
    m = _FILE_NAME.match(file.name)
    named = m.group("flag") if m and m.group("flag") in FLAGS else None
    if flag is None:
        if named is None:
            raise MedsecError(
                f"{file}: cannot tell the MedMNIST flag from the file name; pass flag "
                f"(one of {', '.join(FLAGS)})"
            )
        return named
    if named is not None and named != flag:
        raise MedsecError(f"{file}: file name says {named!r} but flag {flag!r} was requested")
    return flag


def _pick_file(directory: Path, flag: str | None, size: int) -> tuple[Path, str]:
    """Choose ``<flag>[_<size>].npz`` in ``directory``: the requested size, else the nearest."""
    found: dict[str, dict[int, Path]] = {}
    for f in sorted(directory.iterdir()):
        m = _FILE_NAME.match(f.name)
        if m and m.group("flag") in FLAGS and f.is_file():
            found.setdefault(m.group("flag"), {})[int(m.group("size") or 28)] = f
    if flag is None:
        if len(found) != 1:
            names = ", ".join(sorted(found)) or "none"
            raise MedsecError(
                f"{directory}: pass flag to choose a MedMNIST file (flags found: {names})"
            )
        flag = next(iter(found))
    if flag not in found:
        raise MedsecError(f"{directory}: no {flag}.npz or {flag}_<size>.npz file")
    sizes = found[flag]
    # Nearest size; on a tie prefer the larger file (shrinking loses less than enlarging).
    best = min(sizes, key=lambda s: (abs(s - size), -s))
    return sizes[best], flag


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Read the six arrays, turning every way a file can be broken into a MedsecError."""
    keys = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    with file.open("rb") as f:
        head = f.read(6)
    if head[:4] != b"PK\x03\x04" and head != b"\x93NUMPY":
        # Checked first: numpy would answer a text file with a message about pickles.
        raise MedsecError(f"{file}: not a readable .npz archive (no zip signature)")
    try:
        npz = np.load(file, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise MedsecError(f"{file}: a single .npy array, not a MedMNIST .npz archive")
        with npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise MedsecError(f"{file}: missing array(s) {', '.join(missing)}")
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise MedsecError(f"{file}: not a readable .npz archive ({e})") from e


def _make_split(
    file: Path, split: str, arrays: dict[str, np.ndarray], info: FlagInfo, size: int
) -> Split:
    """Validate one split's images and labels and convert them to the Dataset form."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    where = f"{file}: {split}"
    if images.dtype != np.uint8:
        raise MedsecError(f"{where}_images has dtype {images.dtype}; MedMNIST images are uint8")
    channels = 3 if images.ndim == 4 and images.shape[-1] == 3 else 1
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise MedsecError(f"{where}_images has shape {images.shape}; expected (N,H,W[,C])")
    if channels != info.channels:
        raise MedsecError(
            f"{where}_images have {channels} channel(s) but this flag has {info.channels}"
        )
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise MedsecError(
            f"{where}_labels has shape {labels.shape}: multi-label data is not supported"
        )
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise MedsecError(
            f"{where}_labels has shape {labels.shape} and dtype {labels.dtype}; "
            "expected integer (N,) or (N,1)"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if len(images) != len(labels):
        raise MedsecError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise MedsecError(f"{where} split is empty")
    n_classes = len(info.class_names)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise MedsecError(
            f"{where}_labels range {labels.min()}..{labels.max()} is outside 0..{n_classes - 1}"
        )
    return Split(resize_batch(to_float_nchw(images, str(file)), size), labels)


def _sha256(file: Path) -> str:
    """SHA-256 of a file, read in chunks so large MedMNIST files need no extra memory."""
    h = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
