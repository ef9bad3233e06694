"""Shared fixtures: a small, easy two-class image task and a victim trained on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsec.data.base import Dataset, Split
from medsec.models import TrainConfig, train_victim

torch.set_num_threads(2)


def blob_split(n: int, size: int, seed: int, channels: int = 1) -> Split:
    """Class 1 has a bright Gaussian blob at a random place; both classes have noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.uniform(0.2, 0.5, size=(n, channels, size, size)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in np.nonzero(y)[0]:
        cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
        x[i] += 0.15 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2))
    return Split(np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64))


@pytest.fixture(scope="session")
def blob_data() -> Dataset:
    return Dataset(
        "blobs",
        blob_split(600, 28, 0),
        blob_split(100, 28, 1),
        blob_split(200, 28, 2),
        ("absent", "present"),
        {"kind": "test fixture"},
    )


@pytest.fixture(scope="session")
def trained(blob_data: Dataset) -> tuple[torch.nn.Module, dict]:
    """A small CNN trained in the test session (~5 s on 2 cores)."""
    model, metrics = train_victim(
        blob_data, TrainConfig(epochs=6, patience=6, seed=0), progress=False
    )
    return model, metrics
