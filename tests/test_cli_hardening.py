"""Issue 16, the general CLI: nothing overwritten (item 4), one-line errors instead of
tracebacks, checked before the work (item 5), no silent acceptance of bad values (item 8)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import medsec.data
import medsec.data.synthetic
import medsec.models
from medsec import cli
from medsec.cli import main
from medsec.evaluation import cli as eval_cli
from medsec.evaluation import executor as ex
from medsec.evaluation import study
from medsec.models import create_model, save_checkpoint
from medsec.utils import sha256_bytes
from test_data_loaders import write_npz


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of one CLI call (argparse usage errors included)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err


def boom(*_a: object, **_k: object) -> None:
    raise AssertionError("the work started although the output was refused")


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any data loading, training or study work fails the test: refusals come first."""
    monkeypatch.setattr(medsec.data, "load_dataset", boom)
    monkeypatch.setattr(medsec.models, "train_victim", boom)
    monkeypatch.setattr(medsec.models, "load_checkpoint", boom)
    monkeypatch.setattr(study, "reproduce", boom)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("mine\n")
    return f


def tiny_checkpoint(path: Path, **edit: object) -> Path:
    """An untrained 28-px grey small-cnn for pneumoniamnist; ``edit`` replaces fields of the
    stored blob (the weights' hash is recomputed, as an attacker or a bad tool would)."""
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=28)
    save_checkpoint(
        path, model, arch="small-cnn", data_hash="x", image_size=28, metrics={}, settings={}
    )
    if edit:
        blob = torch.load(path, weights_only=True)
        blob.update(edit)
        blob["sha256"] = sha256_bytes(blob["state"])
        torch.save(blob, path)
    return path


# ---------------------------------------------------------------- item 4: overwrites


def test_attack_out_checks_the_real_npz_before_attacking(tmp_path, capsys, monkeypatch):
    data = write_npz(tmp_path / "pneumoniamnist.npz", classes=2, n=(8, 4, 6))
    ckpt = tiny_checkpoint(tmp_path / "v.pt")
    argv = ["attack", "--checkpoint", ckpt, "--data", data, "--n", 3, "--steps", 1]
    code, err = run([*argv, "--out", tmp_path / "adv", "--no-progress"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "adv.npz") as z:  # only the images the model gets right
        k = len(z["indices"])
        assert 1 <= k <= 3 and z["x_adv"].shape == (k, 1, 28, 28) and z["success"].shape == (k,)
    before = (tmp_path / "adv.npz").read_bytes()
    monkeypatch.setattr(medsec.models, "load_checkpoint", boom)
    for name in ("adv", "adv.npz"):
        code, err = run([*argv, "--out", tmp_path / name], capsys)
        assert_one_line(code, err, "adv.npz exists; refusing to overwrite it")
    assert (tmp_path / "adv.npz").read_bytes() == before


def test_reproduce_refuses_a_users_directory_and_resumes_its_own(tmp_path, capsys, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    (user / "report.md").write_text("my notes\n")
    (user / "metrics.csv").write_text("a,b\n1,2\n")
    calls: list[Path] = []
    monkeypatch.setattr(study, "reproduce", lambda out, **_k: calls.append(out) or out / "r.md")
    code, err = run(["reproduce", "--out", user], capsys)
    assert_one_line(code, err, "is not empty (metrics.csv, report.md) and is not a medsec run")
    assert sorted(p.name for p in user.iterdir()) == ["metrics.csv", "report.md"]
    assert (user / "report.md").read_text() == "my notes\n" and not calls

    new = tmp_path / "new" / "run"  # a new directory is claimed: the marker is written first
    assert run(["reproduce", "--out", new], capsys)[0] == 0
    assert (new / ex.RUN_MARKER).is_file() and calls == [new]
    (new / "cells").mkdir()
    (new / "report.md").write_text("from the first run\n")
    assert run(["reproduce", "--out", new], capsys)[0] == 0  # resumed
    assert calls == [new, new]

    older = tmp_path / "older"  # a run from before the marker: cells/ and run files only
    (older / "cells").mkdir(parents=True)
    (older / "metrics.json").write_text("{}")
    assert run(["reproduce", "--out", older], capsys)[0] == 0
    assert (older / ex.RUN_MARKER).is_file()


# ---------------------------------------------------------------- item 5: tracebacks


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--out", "{file}/v.pt"], "cannot write checkpoint {file}/v.pt: {file} is not"),
        (["data", "fundus-lesion", "--preview", "{file}/g.png"], "cannot write preview"),
        (["reproduce", "--out", "{file}/run"], "cannot write output directory {file}/run"),
        (["reproduce", "--out", "{file}"], "output directory {file} exists and is not a dir"),
        # keys init is the integrity verbs' (wording theirs): one line naming the path
        (["keys", "init", "--out", "{file}"], "{file}"),
        (["keys", "init", "--out", "{file}/pki"], "{file}"),
        (["train", "--out", "{dir}", "--force"], "checkpoint {dir} exists and is not a regular"),
    ],
)
def test_unwritable_outputs_are_one_line_before_the_work(
    argv, needle, a_file, tmp_path, capsys, no_work
):
    def fill(s: str) -> str:
        return s.replace("{file}", str(a_file)).replace("{dir}", str(tmp_path))

    code, err = run([fill(a) for a in argv], capsys)
    assert_one_line(code, err, fill(needle))
    assert a_file.read_text() == "mine\n"


def test_read_only_directory_refused_before_training(tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip(
                "this user writes into 0555 directories (root); see the path-under-a-file cases"
            )
        code, err = run(["train", "--out", ro / "v.pt"], capsys)
    finally:
        ro.chmod(0o755)
    assert_one_line(code, err, f"cannot write checkpoint {ro / 'v.pt'}: {ro}: Permission denied")


def test_cache_that_is_a_file_is_refused_before_generating(a_file, capsys, monkeypatch):
    monkeypatch.setenv("MEDSEC_CACHE", str(a_file))
    monkeypatch.setattr(medsec.data.synthetic, "generate_split", boom)
    code, err = run(["data", "cxr-nodule", "--size", 28, "--no-progress"], capsys)
    assert_one_line(code, err, f"cannot write data cache (MEDSEC_CACHE) {a_file}")


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_train_epochs_must_be_positive(epochs, tmp_path, capsys, no_work):
    code, err = run(["train", "--epochs", epochs, "--out", tmp_path / "v.pt"], capsys)
    assert code == 2 and f"--epochs: must be a positive integer, got {epochs}" in err


def _weights(**change: torch.Tensor) -> bytes:
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=28)
    state = {
        k: v for k, v in model.state_dict().items() if k not in change or change[k] is not None
    }
    state.update({k: v for k, v in change.items() if v is not None})
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "edit,needle",
    [
        ({"state": _weights(**{"dense.0.weight": None})}, "Missing key(s)"),
        ({"state": os.urandom(4000)}, "the weights are not readable"),
        ({"state": _weights(**{"dense.0.weight": torch.zeros(3, 3)})}, "do not fit a small-cnn"),
        ({"state": _weights(**{"dense.0.bias": torch.full((128,), float("nan"))})}, "NaN"),
        ({"meta": {"arch": "small-cnn"}}, "metadata missing or invalid: data_hash, in_channels"),
    ],
)
def test_damaged_checkpoint_under_a_recomputed_hash_is_one_line(edit, needle, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "v.pt", **edit)
    code, err = run(["attack", "--checkpoint", ckpt, "--no-progress"], capsys)
    assert_one_line(code, err, needle)


@pytest.mark.parametrize(
    "exc,needle",
    [
        (PermissionError(13, "Permission denied", "/x/y"), "/x/y: Permission denied"),
        (IsADirectoryError(21, "Is a directory", "d"), "d: Is a directory"),
        (RecursionError("maximum recursion depth exceeded"), "input is nested too deeply"),
    ],
)
def test_error_boundary_turns_environment_errors_into_one_line(exc, needle, capsys, monkeypatch):
    def raises(_args: object) -> int:
        raise exc

    monkeypatch.setattr(eval_cli, "cmd_data", raises)
    code, err = run(["data", "x"], capsys)
    assert_one_line(code, err, f"medsec data: error: {needle}")


def test_error_boundary_catches_decompression_bombs_but_keeps_bugs(capsys, monkeypatch):
    from PIL import Image

    def bomb(_args: object) -> int:
        raise Image.DecompressionBombError("Image size (200000000 pixels) exceeds limit")

    monkeypatch.setattr(eval_cli, "cmd_data", bomb)
    assert_one_line(*run(["data", "x"], capsys), "exceeds limit")

    def bug(_args: object) -> int:
        raise ValueError("a real bug")

    monkeypatch.setattr(eval_cli, "cmd_data", bug)
    with pytest.raises(ValueError, match="a real bug"):  # bugs keep their traceback
        cli.main(["data", "x"])


# ---------------------------------------------------------------- item 8: silent acceptance


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["attack", "--checkpoint", "v.pt", "--n", "-1"], "--n: must be a positive integer"),
        (["attack", "--checkpoint", "v.pt", "--steps", "0"], "--steps: must be a positive"),
        (["attack", "--checkpoint", "v.pt", "--restarts", "0"], "--restarts: must be a pos"),
        (["attack", "--checkpoint", "v.pt", "--n", "ten"], "--n: not an integer: 'ten'"),
        (["data", "fundus-lesion", "--device", "bogus"], "--device: unknown device 'bogus'"),
        (["train", "--out", "v.pt", "--device", "cuda:x"], "--device: unknown device"),
        (["train", "--out", "v.pt", "--seed", "-5"], "--seed: seed must lie in 0 .. 2**32 - 1"),
        (["attack", "--checkpoint", "v.pt", "--seed", str(2**64)], "--seed: seed must lie"),
    ],
)
def test_bad_values_are_usage_errors(argv, needle, capsys, no_work):
    code, err = run(argv, capsys)
    assert code == 2 and needle in err, err


def test_preview_must_be_png(tmp_path, capsys, no_work):
    code, err = run(["data", "fundus-lesion", "--preview", tmp_path / "g.txt"], capsys)
    assert_one_line(code, err, "g.txt must end in .png")
    assert not (tmp_path / "g.txt").exists()


def test_text_file_as_medmnist_is_named_clearly(tmp_path, capsys):
    text = tmp_path / "pneumoniamnist.npz"
    text.write_text("label,path\n0,a.png\n")
    code, err = run(["data", text], capsys)
    assert_one_line(code, err, "pneumoniamnist.npz: not a readable .npz archive (no zip sig")
    assert "pickle" not in err
