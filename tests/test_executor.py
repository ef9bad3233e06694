"""The Ray executor on a local Ray instance: the tiny study gives the serial run's rows even
when a worker is killed mid-cell, and a grid of two data sets gets its combined report (and
resumes locally with the same results)."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from medsec.cli import main
from medsec.evaluation import executor as ex
from medsec.evaluation.grid import load_config, run_grid
from test_study import TINY, write_blob_folder

PROVABLE = Path(__file__).with_name("provable_defence.py")

# A robustification plug-in (4 grey levels) whose Ray worker kills itself once, on the 30th
# forward pass, i.e. in the middle of a cell; a mark file says it happened (and where).
DYING = textwrap.dedent(
    """
    import os
    import signal
    from pathlib import Path

    import torch
    from torch import nn

    from medsec.defences import Defence, Deployed

    MARK = Path(__file__).with_suffix(".died")


    class QuantiseDyingOnce(nn.Module):
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            in_worker = "RAY_RAYLET_PID" in os.environ  # never kill the test process
            if in_worker and type(self).calls == 30 and not MARK.exists():
                MARK.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.round(x * 3) / 3


    class DiesOnce(Defence):
        name = "dies-once-fixture"
        family = "robustification"
        paper = "test fixture: 4 grey levels; its worker is killed once, mid-cell"
        assumptions = ("4 grey levels",)
        working_eps = 2 / 255

        def build(self, victim, data, env):
            return Deployed(victim, preprocess=QuantiseDyingOnce())
    """
)

TIMING = ("seconds", "time", "wall")


def _results(out: Path) -> dict:
    """metrics.json without what differs between any two runs (wall times, hardware)."""
    m = json.loads((out / "metrics.json").read_text())

    def plain(r: dict) -> dict:
        return {k: v for k, v in r.items() if not any(t in k for t in TIMING)}

    return {
        "rows": [plain(r) for r in m["rows"]],
        "headline": m["headline"],
        "checks": [(c["name"], c["passed"], c["measured"]) for c in m["checks"]],
    }


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return write_blob_folder(tmp_path_factory.mktemp("blobs"))


def test_ray_gives_the_serial_rows_though_a_worker_dies_mid_cell(local_ray, blobs, tmp_path):
    plugin = tmp_path / "dying.py"
    plugin.write_text(DYING)
    defences = f"none,{plugin}:DiesOnce,signature-gate"
    on_ray = ex.Study(tmp_path / "ray", f"folder:{blobs}", defences, profile=TINY)
    (report,), tasks = ex.run_ray([on_ray], progress=False)
    assert report.is_file()
    died = plugin.with_suffix(".died")
    assert died.is_file(), "the fixture never killed its worker: nothing was retried"
    (redone,) = [t for t in tasks if t.task.startswith(f"{plugin}:DiesOnce")]
    assert not redone.worker.endswith(f":{died.read_text()}")  # retried in another worker
    assert {t.task.split()[0] for t in tasks} >= {"victim", "none", "report"}
    cells = on_ray.out / "cells"
    assert not [p.name for p in cells.iterdir() if not p.name.endswith(".json")]  # no debris

    serial = ex.Study(tmp_path / "serial", f"folder:{blobs}", defences, profile=TINY)
    ex.run_serial([serial], torch.device("cpu"), progress=False)
    assert _results(on_ray.out) == _results(serial.out)
    assert sorted(p.name for p in cells.iterdir()) == sorted(
        p.name for p in (serial.out / "cells").iterdir()
    )


def _second_blob_folder(root: Path, first: Path) -> Path:
    """Another data set: the first one's images mirrored left-right (same task)."""
    from skimage.io import imread, imsave

    for png in first.rglob("*.png"):
        dest = root / png.relative_to(first)
        dest.parent.mkdir(parents=True, exist_ok=True)
        imsave(dest, np.ascontiguousarray(imread(png)[:, ::-1]), check_contrast=False)
    return root


def test_a_grid_of_two_data_sets_on_ray_resumes_locally(local_ray, blobs, tmp_path):
    mirrored = _second_blob_folder(tmp_path / "mirrored", blobs)
    config = tmp_path / "grid.toml"
    config.write_text(
        f'profile = "tiny"\ndatasets = ["folder:{blobs}", "folder:mirrored"]\n'
        f'archs = ["small-cnn"]\ndefences = ["none", "{PROVABLE}:MasksGradients"]\n'
    )
    cfg = load_config(config)
    assert cfg.datasets[1] == f"folder:{mirrored.resolve()}"  # relative to the config file
    out = tmp_path / "grid"
    report = run_grid(cfg, out, executor="ray", progress=False)
    first = json.loads((out / "grid.json").read_text())
    assert [s["dataset"] for s in first["studies"]] == list(cfg.datasets)
    assert all(s["headline"][0]["defence"] == "masking-fixture" for s in first["studies"])
    table = report.read_text()
    assert "masking-fixture" in table and "/ small-cnn / s0" in table
    assert "(grid.png)" in table and (out / "grid.png").stat().st_size > 0
    assert first["workers"] and sum(w["tasks"] for w in first["workers"]) == 2 + 2 * 2 + 2

    stored = {p: p.read_bytes() for p in out.rglob("cells/*.json")}
    run_grid(cfg, out, executor="serial", progress=False)  # resumed here: nothing recomputed
    assert {p: p.read_bytes() for p in out.rglob("cells/*.json")} == stored
    again = json.loads((out / "grid.json").read_text())
    assert [s["headline"] for s in again["studies"]] == [s["headline"] for s in first["studies"]]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('datasets = ["fundus-lesion"]\ncolour = 1\n', "unknown key(s) ['colour']"),
        ('datasets = ["fundus-lesion"]\narchs = ["vgg"]\n', "unknown arch 'vgg'"),
        ('profile = "huge"\ndatasets = ["fundus-lesion"]\n', "unknown profile 'huge'"),
        ("archs = []\n", "archs must be a non-empty list"),
        ('datasets = ["fundus-lesion"]\nseeds = [-1]\n', "seeds must be a non-empty list"),
        ('datasets = ["fundus-lesion"]\ndefences = "ssat,nope"\n', "unknown defence 'nope'"),
        ("datasets = [\n", "is not valid TOML"),
        ("profile = 'tiny'\n", "datasets must be a non-empty list"),
    ],
)
def test_a_bad_grid_config_is_one_line_and_nothing_is_claimed(tmp_path, capsys, text, says):
    config = tmp_path / "grid.toml"
    config.write_text(text)
    out = tmp_path / "out"
    code = main(["grid", "--config", str(config), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--cpus-per-task", "2"], "--cpus-per-task: only with --executor ray"),
        (["--ray-address", "auto", "--gpus-per-task", "1"], "--ray-address, --gpus-per-task"),
        (["--executor", "ray", "--device", "cpu"], "--device does not apply"),
    ],
)
def test_options_of_the_other_executor_are_refused(tmp_path, capsys, argv, says):
    out = tmp_path / "out"
    code = main(["reproduce", "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code != 0 and says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_gpu_count_that_is_no_number_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "reproduce",
                "--out",
                str(tmp_path / "o"),
                "--executor",
                "ray",
                "--gpus-per-task",
                "nan",
            ]
        )
    assert stop.value.code == 2 and "must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
