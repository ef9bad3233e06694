"""The verdict on two defences whose truth is known (``provable_defence.py``), through the
whole study: a provably robust matched filter is "partly robust", never "broken"; a defence
that only masks gradients is "broken" or "inconclusive", never "partly robust"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.io import imread

from medsec.cli import main
from provable_defence import midpoint, statistic
from test_study import write_blob_folder

FIXTURES = Path(__file__).with_name("provable_defence.py")
CLASSES = ("0_absent", "1_present")


def _statistics(folder: Path) -> np.ndarray:
    images = [imread(f).astype(np.float32) / 255 for f in sorted(folder.glob("*.png"))]
    return statistic(torch.from_numpy(np.stack(images))[:, None]).numpy()


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> tuple[dict, Path]:
    data = write_blob_folder(tmp_path_factory.mktemp("blobs"))
    out = tmp_path_factory.mktemp("judged")
    defences = f"none,{FIXTURES}:ProvablyRobust,{FIXTURES}:MasksGradients"
    argv = ["reproduce", "--profile", "tiny", "--dataset", f"folder:{data}", "--no-progress"]
    assert main([*argv, "--defences", defences, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    return {h["defence"]: h for h in m["headline"]} | {"_rows": m["rows"]}, data


def test_a_provably_robust_defence_is_partly_robust(judged) -> None:
    heads, data = judged
    h = heads["provably-robust-fixture"]
    assert h["verdict"] == "partly robust", h["verdict_reason"]
    assert h["adaptive_ci"][1] < h["undefended_ci"][0]  # a gain beyond both intervals
    # The certificate bounds what any attack may do: only an image whose statistic lies
    # within eps of the threshold can flip. The attack may not do better than that bound ...
    s_train = [_statistics(data / "train" / cls) for cls in CLASSES]
    labels = np.repeat([0, 1], [len(s) for s in s_train])
    t = midpoint(np.concatenate(s_train), labels)[0]  # the fixture's threshold
    s_test = np.concatenate([_statistics(data / "test" / cls) for cls in CLASSES])
    flippable = float(np.mean(np.abs(s_test - t) <= h["eps"]))
    assert h["adaptive_asr"] <= flippable + 0.1
    # ... and where the budget exceeds the margins, the same attack does flip images.
    rows = [r for r in heads["_rows"] if r["defence"] == "provably-robust-fixture"]
    assert max(r["attack_success_rate"] for r in rows if r["eps_255"] == 8.0) >= 0.5


def test_a_defence_that_only_masks_gradients_is_never_partly_robust(judged) -> None:
    heads, _ = judged
    h = heads["masking-fixture"]
    assert h["whitebox_asr"] < 0.2  # plain PGD is stopped by the masked gradient ...
    assert h["adaptive_asr"] >= h["undefended_ci"][0]  # ... BPDA is not
    assert h["verdict"] in ("broken", "inconclusive"), h["verdict_reason"]
