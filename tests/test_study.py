"""`medsec reproduce` end to end on a tiny profile: contract, report, resume, gate; CLI errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from medsec.cli import main
from medsec.evaluation import study
from medsec.evaluation.context import PROFILES
from medsec.evaluation.headline import RATES

TINY = PROFILES["tiny"]
ROW_KEYS = {
    "defence",
    "family",
    "attack",
    "adaptive",
    "eps",
    "n",
    "clean_accuracy",
    "attack_success_rate",
    "detection_auc",
    "tpr_at_5fpr",
}


def write_blob_folder(root):
    """The conftest blob task as an image folder (train/val/test/<class>/*.png)."""
    import numpy as np
    from skimage.io import imsave

    from conftest import blob_split

    for split, n, seed in (("train", 400, 0), ("val", 100, 1), ("test", 120, 2)):
        s = blob_split(n, 28, seed)
        for i, (img, label) in enumerate(zip(s.images, s.labels, strict=True)):
            d = root / split / ("0_absent", "1_present")[label]
            d.mkdir(parents=True, exist_ok=True)
            imsave(d / f"{i}.png", np.rint(img[0] * 255).astype(np.uint8), check_contrast=False)
    return root


def run_tiny_study(out, data, defences="none,signature-gate", progress=False):
    study.reproduce(
        out,
        dataset=f"folder:{data}",
        defences=defences,
        device=torch.device("cpu"),
        progress=progress,
        profile=TINY,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    data = write_blob_folder(tmp_path_factory.mktemp("blobs"))
    out = tmp_path_factory.mktemp("study")
    run_tiny_study(out, data)
    return out, data


def test_outputs_and_metrics_contract(finished):
    finished, _ = finished
    m = json.loads((finished / "metrics.json").read_text())
    assert m["dataset"]["classes"] == ["absent", "present"]
    assert {"clean_accuracy", "clean_auc"} <= set(m["victim"])
    assert m["rows"] and all(set(r) >= ROW_KEYS for r in m["rows"])
    families = {r["family"] for r in m["rows"]}
    assert families == {"none", "integrity"}
    attacks = {r["attack"] for r in m["rows"] if r["family"] == "none"}
    assert {"fgsm", "bim", "pgd-20", "pgd-100", "cw-linf", "worst-case"} <= attacks
    for r in m["rows"]:
        assert 0 <= r["attack_success_rate"] <= 1
        assert r["ci_low"] <= r["attack_success_rate"] <= r["ci_high"]
        assert r["ci_high"] - r["ci_low"] > 0  # n is finite: an interval, never a point
        if r["family"] == "none" and r["attack"] != "worst-case":
            assert r["settings"]["eps"] == r["eps"] and r["settings"]["steps"] >= 1
    assert {c["name"] for c in m["checks"]} >= {
        "ASR non-decreasing in eps",
        "unbounded attack reaches 100%",
        "iterative >= single-step",
        "more steps / restarts change little",
        "no zero or NaN gradients",
    }
    assert all(isinstance(c["passed"], bool) for c in m["checks"])
    assert m["wall_time_s"] > 0 and m["environment"]["torch"] == torch.__version__
    assert m["seed"] == 0 and m["profile"]["eps"] == list(TINY.eps)
    with open(finished / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(m["rows"])
    html = (finished / "report.html").read_text()
    assert "data:image/png;base64," in html and "src='figures/" not in html
    md = (finished / "report.md").read_text()
    assert "## Checks" in md and "Validity checks:" in md and "Signature gate" in md
    head = md.split("## Setup")[0]  # the study at a glance: table and bar figure
    assert "figures/summary.png" in head and (finished / "figures" / "summary.png").exists()
    assert "| signature-gate | integrity |" in head and "adaptive 2/255" in head  # nearest 1 and 4
    gate = md.split("## Signature gate")[1].split("\n## ")[0]
    assert "signed at acquisition" in gate  # the gate's own note, in its own section
    undefended = md.split("## Undefended victim")[1].split("\n## ")[0]
    assert "asr_vs_eps_none.png" in undefended and "examples_none.png" in undefended
    for fig in m["figures"]:
        assert (finished / fig["path"]).stat().st_size > 1000


def test_undefended_victim_learns_and_falls(finished):
    """The victim learns the task, falls to PGD-100 at 8/255 and to an unbounded attack."""
    finished, _ = finished
    m = json.loads((finished / "metrics.json").read_text())
    pgd = {
        r["eps_255"]: r["attack_success_rate"]
        for r in m["rows"]
        if r["attack"] == "pgd-100" and r["family"] == "none"
    }
    assert pgd[8.0] >= pgd[2.0] and pgd[8.0] >= 0.9
    checks = {c["name"]: c for c in m["checks"]}
    assert checks["unbounded attack reaches 100%"]["passed"]
    assert checks["no zero or NaN gradients"]["passed"]
    assert m["victim"]["clean_accuracy"] >= 0.9


def test_gate_rejects_all_altered_and_accepts_clean(finished):
    finished, _ = finished
    m = json.loads((finished / "metrics.json").read_text())
    gate = [r for r in m["rows"] if r["family"] == "integrity"]
    assert gate and all(r["attack_success_rate"] == 0 for r in gate)
    assert sum(r["changed"] for r in gate) > 0
    assert all(r["rejection_rate"] == 1.0 for r in gate if r["changed"])
    assert all(r["false_rejection_rate"] == 0.0 for r in gate)


def test_rerun_resumes_without_recomputing(finished, monkeypatch):
    import medsec.evaluation.baseline as baseline

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    out, data = finished
    cells = sorted(p.name for p in (out / "cells").iterdir())
    monkeypatch.setattr(baseline, "run_attack", boom)
    monkeypatch.setattr(baseline, "_examples_figure", lambda ctx, name: None)
    monkeypatch.setattr(study, "train_victim", boom)
    run_tiny_study(out, data)
    assert sorted(p.name for p in (out / "cells").iterdir()) == cells


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["reproduce", "--dataset", "nope", "--out", "{tmp}/o"], "unknown data set"),
        (["reproduce", "--defences", "none,foo", "--out", "{tmp}/o"], "unknown defence"),
        (["data", "{tmp}/missing.npz"], "no such file"),
        (["attack", "--checkpoint", "{tmp}/none.pt"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, tmp_path, capsys):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_bad_eps_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["attack", "--checkpoint", "x.pt", "--eps", "2"])
    assert exc.value.code == 2
    assert "eps must lie in [0, 1]" in capsys.readouterr().err


def test_budget_curve_check_flags_a_fall():
    from medsec.evaluation.baseline import _decreases

    assert _decreases([(1 / 255, 0.2), (2 / 255, 0.5), (4 / 255, 0.9)]) == []
    assert _decreases([(1 / 255, 0.2), (2 / 255, 0.6), (4 / 255, 0.5)]) == [
        "0.600 at 2 > 0.500 at 4"
    ]


def test_detection_entries_end_to_end(finished, tmp_path, capsys):
    """Two detectors through `reproduce`: rows, the paper-protocol AUC, the attacker's aim,
    the report's tables and one progress line per computed cell."""
    _, data = finished
    out = tmp_path / "det"
    names = ("ma-kd-bu", "li-zhu-mgm", "ma-lid", "ma-deepfeat")  # every built-in detector
    run_tiny_study(out, data, defences=",".join(names), progress=True)
    m = json.loads((out / "metrics.json").read_text())
    rows = [r for r in m["rows"] if r["family"] == "detection"]
    assert {(r["defence"], r["adaptive"]) for r in rows} == {
        (d, a) for d in names for a in (False, True)
    }
    # the profile's only eps in {1, 2, 4}/255 (the papers' 1/255 is below the tiny grid)
    assert {r["eps_255"] for r in rows} == {2.0}
    for r in rows:
        assert 0 <= r["attack_success_rate"] <= 1 and r["clean_fpr"] <= 0.2
        if r["adaptive"]:
            assert r["reached_aim"] <= r["n"] and r["attacker_aim"] <= r["threshold"]
        elif r["defence"] != "li-zhu-mgm":  # supervised: refitted per attack as in Ma et al.
            assert 0 <= r["detection_auc_per_attack_fit"] <= 1
            pairs = r["detector_fit"]["fit_pairs"]  # successful pairs only, per attack
            assert set(pairs) == {"fgsm", "bim", "pgd-20", "cw-linf"} and sum(pairs.values()) > 0
        else:  # unsupervised: nothing to refit
            assert r["detection_auc_per_attack_fit"] is None
    adaptive = {r["defence"]: r for r in rows if r["adaptive"]}
    best_plain = {
        d: max(r["attack_success_rate"] for r in rows if r["defence"] == d and not r["adaptive"])
        for d in adaptive
    }
    assert all(adaptive[d]["attack_success_rate"] >= best_plain[d] for d in adaptive)
    for d in names:  # every detector gets the indicators, the unconstrained attack included
        found = {c["name"]: c for c in m["checks"] if c["defence"] == d}
        for indicator in (
            "silent success",
            "unavailable gradients",
            "unconstrained attack failure",
        ):
            assert found[f"indicator: {indicator}"]["kind"] == "validity", (d, indicator)
        assert "indicator: transfer failure" not in found  # no view: not applicable, no check
        assert any(v["defence"] == d for v in m["verdicts"])
        h = next(h for h in m["headline"] if h["defence"] == d)  # the same-eps record
        assert h["eps_255"] == 2.0 and "below this profile's grid" in h["budget"]
        assert h["whitebox_asr"] == h["paper_attack_asr"]
        assert all(h[f"{k}_n"] > 0 and h[f"{k}_ci"][0] <= h[f"{k}_asr"] for k in RATES)
        verdict = next(v for v in m["verdicts"] if v["defence"] == d)
        assert verdict["eps_255"] == 2.0 and verdict["victim_asr"] == h["undefended_asr"]
    md = (out / "report.md").read_text()
    assert "Validity panel:" in md and "Verdict: **" in md
    assert "one detector refitted per attack" in md
    # each family's notes and figures appear in its own section of the report
    detection = md.split("## Detection defences")[1].split("\n## ")[0]
    assert detection.index("Detection study:") < detection.index("### ma-kd-bu")  # general
    kd_bu = detection.split("### ma-kd-bu")[1].split("### li-zhu-mgm")[0]  # its own notes
    assert "ma-kd-bu: smallest eps at which the adaptive joint ASR" in kd_bu
    assert "detection-ma-kd-bu-roc.png" in kd_bu and "li-zhu-mgm:" not in kd_bu
    err = capsys.readouterr().err
    assert "ma-kd-bu-fgsm-2-non-adaptive: ASR" in err and "li-zhu-mgm: done in" in err


def test_progress_headline_of_a_cell():
    from medsec.evaluation.context import _headline

    assert _headline({"row": {"attack_success_rate": 0.5, "detection_auc": None}}) == "ASR 0.500, "
    assert _headline({"asr": 0.25, "seconds": 1.0}) == "ASR 0.250, "
    assert _headline({"accuracy": 0.9}) == "accuracy 0.900, "
    assert _headline([1, 2]) == "" and _headline({"x": 1}) == ""


def test_supervised_detectors_fit_only_successful_pairs_of_correct_images():
    """Ma et al.'s fit set: a pair counts when the clean image is classified correctly and
    its adversarial version is misclassified (failed attacks and wrong images dropped)."""
    from types import SimpleNamespace

    from medsec.evaluation.detection import _pair_masks

    class Bright(torch.nn.Module):  # class 1 iff mean pixel > 0.5
        def forward(self, x):
            m = x.flatten(1).mean(1)
            return torch.stack([0.5 - m, m - 0.5], 1)

    ctx = SimpleNamespace(victim=Bright(), device=torch.device("cpu"), profile=TINY)
    y = torch.tensor([1, 1, 0, 0, 1])
    x = torch.tensor([0.9, 0.9, 0.1, 0.9, 0.2]).view(5, 1, 1, 1)  # rows 3, 4 already wrong
    adv = torch.tensor([0.1, 0.8, 0.9, 0.1, 0.9]).view(5, 1, 1, 1)  # row 1: attack failed
    right, fooled = _pair_masks(ctx, x, y, adv)
    assert (right & fooled).tolist() == [True, False, True, False, False]
