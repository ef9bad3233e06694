"""Embedded data: deterministic, cached by content, real anatomy with injected findings."""

from __future__ import annotations

import numpy as np
import pytest

from medsec.data import load_dataset
from medsec.data.synthetic import generate_split, make_embedded
from medsec.errors import MedsecError


@pytest.mark.parametrize("name,channels", [("cxr-nodule", 1), ("fundus-lesion", 3)])
@pytest.mark.parametrize("size", [28, 64])
def test_shapes_range_balance(name, channels, size):
    s = generate_split(name, "train", 20, size, seed=0, progress=False)
    assert s.images.shape == (20, channels, size, size)
    assert s.images.dtype == np.float32
    assert s.images.min() >= 0 and s.images.max() <= 1
    assert np.bincount(s.labels).tolist() == [10, 10]


def test_deterministic_and_seed_dependent():
    a = generate_split("cxr-nodule", "val", 8, 28, seed=3, progress=False)
    b = generate_split("cxr-nodule", "val", 8, 28, seed=3, progress=False)
    c = generate_split("cxr-nodule", "val", 8, 28, seed=4, progress=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_splits_differ():
    tr = generate_split("fundus-lesion", "train", 6, 28, seed=0, progress=False)
    te = generate_split("fundus-lesion", "test", 6, 28, seed=0, progress=False)
    assert not np.array_equal(tr.images, te.images)


def test_finding_changes_the_image_locally(monkeypatch):
    """Same random stream with and without the lesion: they differ only in a small area."""
    import medsec.data.synthetic as syn

    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    with_lesion = syn._cxr_image(64, 1, rng_a)
    monkeypatch.setattr(syn, "CXR_NODULE_AMP", (0.0, 0.0))
    without = syn._cxr_image(64, 1, rng_b)
    diff = np.abs(with_lesion - without)[0]
    assert diff.max() > 0.1
    assert (diff > 0.02).mean() < 0.1  # a local finding, not a global change


def test_cache_roundtrip_and_damaged_cache(tmp_path):
    kw = dict(size=28, n_train=10, n_val=4, n_test=4, seed=1, cache_dir=tmp_path, progress=False)
    d1 = make_embedded("cxr-nodule", **kw)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    d2 = load_dataset("cxr-nodule", **kw)
    assert d1.content_hash == d2.content_hash
    files[0].write_bytes(b"not an npz")
    d3 = make_embedded("cxr-nodule", **kw)
    assert d3.content_hash == d1.content_hash
    assert d1.summary()["n"] == {"train": 10, "val": 4, "test": 4}


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(MedsecError, match="size"):
        load_dataset("cxr-nodule", size=50)
    with pytest.raises(MedsecError, match="n_train"):
        make_embedded("cxr-nodule", size=28, n_train=1, cache_dir=tmp_path)
    with pytest.raises(MedsecError, match="unknown data set"):
        load_dataset("no-such-data")
