"""Real-data loaders (MedMNIST .npz, image folders, DICOM + CSV) on fixtures written here."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from skimage import io

from medsec.data import load_dataset
from medsec.data.dicom import load_dicom_csv
from medsec.data.folder import load_folder, stratified_split
from medsec.data.medmnist import load_medmnist
from medsec.errors import MedsecError

# ---------------------------------------------------------------- MedMNIST


def write_npz(
    path: Path,
    *,
    classes: int,
    px: int = 28,
    rgb: bool = False,
    n: tuple[int, int, int] = (24, 6, 8),
    label_cols: int = 1,
    seed: int = 0,
    **override: np.ndarray,
) -> Path:
    """A MedMNIST-layout file: uint8 images (N,H,W[,3]) and labels (N,1) (or (N,C))."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, px, px, 3) if rgb else (count, px, px)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (
            (np.arange(count * label_cols) % classes).reshape(count, label_cols).astype(np.uint8)
        )
    arrays.update(override)
    np.savez_compressed(path, **arrays)
    return path


def test_binary_flag_shapes_labels_provenance(tmp_path: Path) -> None:
    f = write_npz(tmp_path / "pneumoniamnist.npz", classes=2)
    ds = load_medmnist(str(f), size=28)
    assert ds.name == "pneumoniamnist"
    assert ds.class_names == ("normal", "pneumonia")
    assert ds.train.images.shape == (24, 1, 28, 28) and ds.train.images.dtype == np.float32
    assert (len(ds.val), len(ds.test)) == (6, 8)
    raw = np.load(f)
    np.testing.assert_array_equal(ds.train.labels, raw["train_labels"][:, 0])
    assert ds.train.labels.dtype == np.int64
    np.testing.assert_allclose(ds.test.images[:, 0], raw["test_images"] / 255.0, atol=1e-6)
    prov = ds.provenance
    assert prov["flag"] == "pneumoniamnist" and prov["licence"] == "CC BY 4.0"
    assert prov["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert prov["path"] == str(f.resolve())


def test_multiclass_flag_resized(tmp_path: Path) -> None:
    f = write_npz(tmp_path / "organamnist.npz", classes=11, n=(33, 11, 11))
    ds = load_medmnist(str(f), size=64)
    assert ds.num_classes == 11 and ds.class_names[0] == "bladder"
    assert ds.class_names[-1] == "spleen"
    assert ds.train.images.shape == (33, 1, 64, 64)
    assert ds.train.images.min() >= 0.0 and ds.train.images.max() <= 1.0
    assert set(ds.train.labels.tolist()) == set(range(11))


def test_rgb_flags_and_dermamnist_licence(tmp_path: Path) -> None:
    ds = load_medmnist(str(write_npz(tmp_path / "pathmnist.npz", classes=9, rgb=True)), size=28)
    assert ds.channels == 3 and ds.train.images.shape == (24, 3, 28, 28)
    assert ds.class_names[-1] == "colorectal adenocarcinoma epithelium"
    derma = load_medmnist(str(write_npz(tmp_path / "dermamnist.npz", classes=7, rgb=True)), size=28)
    assert derma.provenance["licence"] == "CC BY-NC 4.0"
    assert derma.class_names[4] == "melanoma"


def test_sized_file_kept_exact(tmp_path: Path) -> None:
    f = write_npz(tmp_path / "breastmnist_64.npz", classes=2, px=64)
    ds = load_medmnist(str(f), size=64)
    assert ds.class_names == ("malignant", "normal, benign")
    assert ds.provenance["native_size"] == 64
    np.testing.assert_allclose(ds.val.images[:, 0], np.load(f)["val_images"] / 255.0, atol=1e-6)


def test_directory_picks_size_then_nearest(tmp_path: Path) -> None:
    write_npz(tmp_path / "pneumoniamnist.npz", classes=2)
    write_npz(tmp_path / "pneumoniamnist_64.npz", classes=2, px=64)
    write_npz(tmp_path / "bloodmnist.npz", classes=8, rgb=True)
    for size, native in ((28, 28), (64, 64), (128, 64)):
        ds = load_medmnist(str(tmp_path), size=size, flag="pneumoniamnist")
        assert ds.provenance["native_size"] == native and ds.size == size
    with pytest.raises(MedsecError, match="pass flag"):
        load_medmnist(str(tmp_path), size=28)
    with pytest.raises(MedsecError, match="no octmnist"):
        load_medmnist(str(tmp_path), size=28, flag="octmnist")


def test_deterministic(tmp_path: Path) -> None:
    f = str(write_npz(tmp_path / "retinamnist.npz", classes=5, rgb=True))
    assert load_medmnist(f, size=64).content_hash == load_medmnist(f, size=64).content_hash


def test_multilabel_refused(tmp_path: Path) -> None:
    f = write_npz(tmp_path / "chestmnist.npz", classes=2, label_cols=14)
    with pytest.raises(MedsecError, match=r"chestmnist\.npz.*multi-label"):
        load_medmnist(str(f), size=28)
    g = write_npz(tmp_path / "octmnist.npz", classes=2, label_cols=4)
    with pytest.raises(MedsecError, match=r"octmnist\.npz.*multi-label"):
        load_medmnist(str(g), size=28)


def _bad_npz(tmp_path: Path, name: str, **override: np.ndarray) -> Path:
    return write_npz(tmp_path / name, classes=2, **override)


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("pneumoniamnist.npz", {"val_labels": np.zeros((5, 1), np.uint8)}, "6 images but 5"),
        ("pneumoniamnist.npz", {"test_labels": np.full((8, 1), 2, np.uint8)}, "outside 0..1"),
        ("breastmnist.npz", {"train_images": np.zeros((24, 28, 28), np.float32)}, "uint8"),
        ("breastmnist.npz", {"train_images": np.zeros((24, 28, 28, 3), np.uint8)}, "channel"),
    ],
)
def test_inconsistent_npz(
    tmp_path: Path, name: str, override: dict[str, np.ndarray], message: str
) -> None:
    f = _bad_npz(tmp_path, name, **override)
    with pytest.raises(MedsecError, match=message) as err:
        load_medmnist(str(f), size=28)
    assert name in str(err.value)


def test_missing_array_and_broken_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    partial = tmp_path / "bloodmnist.npz"
    np.savez(partial, train_images=rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8))
    with pytest.raises(MedsecError, match=r"bloodmnist\.npz: missing array.*train_labels"):
        load_medmnist(str(partial), size=28)
    corrupt = tmp_path / "octmnist.npz"
    corrupt.write_text("not a zip at all")
    with pytest.raises(MedsecError, match=r"octmnist\.npz: not a readable"):
        load_medmnist(str(corrupt), size=28)
    good = write_npz(tmp_path / "tissuemnist.npz", classes=8)
    truncated = tmp_path / "organcmnist.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MedsecError, match=r"organcmnist\.npz"):
        load_medmnist(str(truncated), size=28)
    with pytest.raises(MedsecError, match=r"nothere\.npz"):
        load_medmnist(str(tmp_path / "nothere.npz"), size=28)


def test_flag_checks(tmp_path: Path) -> None:
    renamed = write_npz(tmp_path / "mydata.npz", classes=2)
    with pytest.raises(MedsecError, match=r"mydata\.npz: cannot tell"):
        load_medmnist(str(renamed), size=28)
    assert load_medmnist(str(renamed), size=28, flag="breastmnist").name == "breastmnist"
    with pytest.raises(MedsecError, match="unknown MedMNIST flag"):
        load_medmnist(str(renamed), size=28, flag="nosuchmnist")
    named = write_npz(tmp_path / "breastmnist.npz", classes=2)
    with pytest.raises(MedsecError, match="file name says"):
        load_medmnist(str(named), size=28, flag="pneumoniamnist")


# ---------------------------------------------------------------- image folders


def write_png(path: Path, value: int, shape: tuple[int, ...] = (20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, np.full(shape, value, np.uint8), check_contrast=False)


def make_tree(
    root: Path,
    classes: tuple[str, ...] = ("2_control", "10_case"),
    counts: dict[str, int] | None = None,
) -> Path:
    """Gray PNGs of value 40 + 100 * class + index, and one RGB file in train."""
    counts = counts or {"train": 10, "test": 3}
    for split, k in counts.items():
        for c, cls in enumerate(classes):
            for i in range(k):
                write_png(root / split / cls / f"img{i:02d}.png", 40 + 100 * c + i)
    write_png(root / "train" / classes[0] / "rgb.png", 40, (16, 16, 3))
    return root


def test_folder_classes_by_prefix_and_val_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    ds = load_folder(str(root), size=28)
    assert ds.class_names == ("control", "case")  # 2 before 10, names without the prefix
    assert ds.name == "tree" and ds.channels == 1
    assert (len(ds.train), len(ds.val), len(ds.test)) == (19, 2, 6)
    assert ds.train.images.shape[1:] == (1, 28, 28) and ds.train.images.dtype == np.float32
    for split in (ds.train, ds.val, ds.test):
        low = (40 + 100 * split.labels) / 255.0
        excess = split.images.mean(axis=(1, 2, 3)) - low  # 0..9 grey levels above the class
        assert excess.min() > -1e-6 and excess.max() < 9 / 255 + 1e-6
    assert ds.provenance["files"] == 27
    again = load_folder(str(root), size=28)
    assert again.content_hash == ds.content_hash
    other = load_folder(str(root), size=28, seed=1)
    assert not np.array_equal(other.val.images, ds.val.images)


def test_folder_val_folder_alphabetical_and_rgb(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for split in ("train", "val", "test"):
        for c, cls in enumerate(("dog", "cat")):
            for i in range(2):
                write_png(root / split / cls / f"{i}.png", 50 * c, (12, 12, 3))
    ds = load_folder(str(root), size=64)
    assert ds.class_names == ("cat", "dog") and ds.channels == 3
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 4, 4)
    assert ds.provenance["val"] == "folder"
    gray = load_folder(str(root), size=28, channels=1)
    assert gray.channels == 1


def test_folder_formats_and_16_bit(tmp_path: Path) -> None:
    root = tmp_path / "formats"
    for split in ("train", "test"):
        for ext in (".jpg", ".tif", ".bmp", ".png"):
            write_png(root / split / "0_a" / f"x{ext}", 128)
        io.imsave(
            root / split / "0_a" / "deep.png",
            np.full((8, 8), 65535, np.uint16),
            check_contrast=False,
        )
        write_png(root / split / "1_b" / "y.png", 0)
        (root / split / "1_b" / "notes.txt").write_text("ignored")
    ds = load_folder(str(root), size=28, val_fraction=0.0)
    assert len(ds.val) == 0 and len(ds.test) == 6
    means = ds.test.images.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(
        means[:5], [1.0, 128 / 255, 128 / 255, 128 / 255, 128 / 255], atol=2e-2
    )  # JPEG is lossy
    assert means[5] == 0.0


def test_folder_errors(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    (root / "test" / "2_control" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(MedsecError, match=r"broken\.png: unreadable image"):
        load_folder(str(root), size=28)

    root = make_tree(tmp_path / "u")
    (root / "test" / "3_other").mkdir()
    with pytest.raises(MedsecError, match=r"u/test: class folders differ.*3_other"):
        load_folder(str(root), size=28)

    root = make_tree(tmp_path / "v", counts={"train": 3})
    for cls in ("2_control", "10_case"):
        (root / "test" / cls).mkdir(parents=True)
    with pytest.raises(MedsecError, match=r"v/test: no images"):
        load_folder(str(root), size=28)

    root = make_tree(tmp_path / "w", counts={"train": 3})
    with pytest.raises(MedsecError, match=r"w: missing the test/ folder"):
        load_folder(str(root), size=28)
    with pytest.raises(MedsecError, match="no such image folder"):
        load_folder(str(tmp_path / "absent"), size=28)
    with pytest.raises(MedsecError, match="channels"):
        load_folder(str(root), size=28, channels=2)


def test_stratified_split_properties() -> None:
    labels = np.array([0] * 10 + [1] * 20 + [2])
    parts = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=3)
    allidx = np.concatenate([parts["train"], parts["val"], parts["test"]])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))
    assert np.bincount(labels[parts["test"]], minlength=3).tolist() == [2, 4, 0]
    assert 2 in labels[parts["train"]]  # a singleton class stays in training
    again = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    tiny = stratified_split(np.array([0, 0, 1]), {"val": 0.1}, seed=0)
    assert len(tiny["val"]) == 1 and len(tiny["train"]) == 2


# ---------------------------------------------------------------- DICOM


def write_dicom(
    path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object
) -> Path:
    """A minimal valid DICOM file (Secondary Capture) holding ``arr``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(arr, photometric, 8 * arr.dtype.itemsize)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


GRADIENT = np.tile(np.arange(28, dtype=np.uint16) * 30, (28, 1))  # 0..810 left to right


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "path,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_dicom_real_files_string_labels_stratified(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    rows = []
    for name, label in (("CT_small.dcm", "ct"), ("MR_small.dcm", "mr"), ("RG1_UNCI.dcm", "xr")):
        src = get_testdata_file(name)
        assert src is not None, name
        shutil.copy(src, tmp_path / name)
        rows.append((name, label))
    for i in range(9):
        write_dicom(tmp_path / "gen" / f"g{i}.dcm", GRADIENT + i)
        rows.append((f"gen/g{i}.dcm", "ct" if i % 2 else "mr"))
    table = write_csv(tmp_path / "study.csv", rows)
    ds = load_dicom_csv(str(table), size=28, seed=0)
    assert ds.name == "study" and ds.class_names == ("ct", "mr", "xr")
    assert ds.train.images.shape[1:] == (1, 28, 28)
    assert sum(len(ds.split(s)) for s in ("train", "val", "test")) == 12
    assert min(len(ds.val), len(ds.test)) >= 1
    for s in ("train", "val", "test"):
        x = ds.split(s).images
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert ds.provenance["sha256"] == hashlib.sha256(table.read_bytes()).hexdigest()
    assert load_dicom_csv(str(table), size=28, seed=0).content_hash == ds.content_hash


def test_dicom_monochrome1_rescale_window(tmp_path: Path) -> None:
    write_dicom(tmp_path / "m2.dcm", GRADIENT)
    write_dicom(tmp_path / "m1.dcm", GRADIENT, "MONOCHROME1")
    write_dicom(tmp_path / "ct.dcm", GRADIENT, RescaleSlope=2, RescaleIntercept=-1024)
    write_dicom(tmp_path / "win.dcm", GRADIENT, WindowCenter=300, WindowWidth=200)
    rows = [
        ("m2.dcm", "0", "train"),
        ("m1.dcm", "0", "val"),
        ("ct.dcm", "1", "test"),
        ("win.dcm", "1", "train"),
    ]
    ds = load_dicom_csv(str(write_csv(tmp_path / "l.csv", rows, "path,label,split")), size=28)
    m2, win = ds.train.images[0, 0], ds.train.images[1, 0]
    m1, ct = ds.val.images[0, 0], ds.test.images[0, 0]
    assert ds.class_names == ("0", "1") and ds.provenance["split"] == "csv column"
    np.testing.assert_allclose(m2[0], np.arange(28) / 27, atol=1e-6)
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)
    np.testing.assert_allclose(ct, m2, atol=1e-6)  # a linear rescale survives min-max
    # Window 200..400 (centre 300, width 200): columns at or below 180 are black, >= 420 white.
    assert (win[:, :7] == 0).all() and (win[:, 14:] == 1).all()


def test_dicom_split_column_without_val_and_channels(tmp_path: Path) -> None:
    rows = []
    for i in range(12):
        write_dicom(tmp_path / f"{i}.dcm", GRADIENT + i)
        rows.append((f"{i}.dcm", str(i % 2), "test" if i < 4 else "train"))
    table = write_csv(tmp_path / "s.csv", rows, "path,label,split")
    ds = load_dicom_csv(str(table), size=28, channels=3, val_fraction=0.25)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert ds.channels == 3
    np.testing.assert_array_equal(ds.train.images[:, 0], ds.train.images[:, 2])


def test_dicom_rgb_file(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    rows = []
    for i, split in enumerate(("train", "val", "test")):
        write_dicom(tmp_path / f"{i}.dcm", rgb + i, "RGB", PlanarConfiguration=0)
        rows.append((f"{i}.dcm", "lesion", split))
    ds = load_dicom_csv(str(write_csv(tmp_path / "c.csv", rows, "path,label,split")), size=28)
    assert ds.channels == 3 and ds.class_names == ("lesion",)
    np.testing.assert_allclose(ds.test.images[0, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(ds.test.images[0, 1:], 0.0, atol=1e-6)


def test_dicom_errors(tmp_path: Path) -> None:
    write_dicom(tmp_path / "ok.dcm", GRADIENT)
    write_dicom(tmp_path / "multi.dcm", np.stack([GRADIENT] * 3))
    (tmp_path / "fake.dcm").write_bytes(b"not dicom" * 50)
    cases = [
        ([("ok.dcm", "0"), ("gone.dcm", "1")], "path,label", r"line 3 \(.*gone\.dcm\): no such"),
        ([("fake.dcm", "0")], "path,label", r"line 2 \(.*fake\.dcm\): not a readable DICOM"),
        ([("multi.dcm", "0")], "path,label", r"multi\.dcm\): multi-frame"),
        ([("ok.dcm", "-1")], "path,label", "line 2: negative label"),
        ([("ok.dcm", "0", "holdout")], "path,label,split", "line 2: split 'holdout'"),
        ([("ok.dcm", "")], "path,label", "line 2: empty path or label"),
        ([("ok.dcm", "0")], "file,class", "header must be"),
        ([], "path,label", "no rows"),
        ([("ok.dcm", "0", "train"), ("ok.dcm", "0", "val")], "path,label,split", "test split"),
    ]
    for i, (rows, header, message) in enumerate(cases):
        table = write_csv(tmp_path / f"case{i}.csv", rows, header)
        with pytest.raises(MedsecError, match=message) as err:
            load_dicom_csv(str(table), size=28)
        assert f"case{i}.csv" in str(err.value)
    with pytest.raises(MedsecError, match=r"absent\.csv"):
        load_dicom_csv(str(tmp_path / "absent.csv"), size=28)
    with pytest.raises(MedsecError, match="test_fraction"):
        load_dicom_csv(str(tmp_path / "case0.csv"), size=28, test_fraction=1.5)


# ---------------------------------------------------------------- dispatch


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    (tmp_path / "mm").mkdir()
    npz = write_npz(tmp_path / "mm" / "pneumoniamnist.npz", classes=2)
    assert load_dataset(f"medmnist:{npz}", size=28).name == "pneumoniamnist"
    by_dir = load_dataset(f"medmnist:{npz.parent}", size=64, flag="pneumoniamnist", n_train=5)
    assert by_dir.size == 64 and len(by_dir.train) == 24
    assert load_dataset(str(npz), size=28).provenance["source"] == "medmnist"

    tree = make_tree(tmp_path / "tree", counts={"train": 4, "test": 2})
    assert load_dataset(f"folder:{tree}", size=28, seed=2).provenance["source"] == "folder"
    assert load_dataset(str(tree), size=28).class_names == ("control", "case")

    for i in range(6):
        write_dicom(tmp_path / "dcm" / f"{i}.dcm", GRADIENT + i)
    table = write_csv(
        tmp_path / "dcm" / "labels.csv", [(f"{i}.dcm", "ab"[i % 2]) for i in range(6)]
    )
    via_prefix = load_dataset(f"dicom:{table}", size=28, test_fraction=0.34, flag="ignored")
    assert via_prefix.provenance["source"] == "dicom" and len(via_prefix.test) == 2
    assert load_dataset(str(table), size=28).class_names == ("a", "b")
    with pytest.raises(MedsecError, match="no such file"):
        load_dataset(str(tmp_path / "nothing.npz"), size=28)
