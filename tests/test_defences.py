"""The defence contract: the registry, a user's plug-in through the CLI (probed, adapted,
beaten), bad plug-ins, the probe, and every built-in robustification defence end to end
through the generic evaluator (the detectors run in test_study.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from medsec.cli import main
from medsec.defences import Deployed, get_defence, list_defences
from medsec.evaluation.probe import adapt, probe
from test_study import run_tiny_study, write_blob_folder

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "jpeg_defence.py"
BUILTINS = {
    "none",
    "ssat",
    "kmm",
    "dae",
    "medrdf",
    "pgd-at",
    "randomized-smoothing",
    "ma-kd-bu",
    "ma-lid",
    "ma-deepfeat",
    "li-zhu-mgm",
    "signature-gate",
}


def reproduce(out: Path, data: Path, defences: str) -> int:
    argv = ["reproduce", "--profile", "tiny", "--dataset", f"folder:{data}"]
    return main([*argv, "--defences", defences, "--out", str(out), "--no-progress"])


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    data = write_blob_folder(tmp_path_factory.mktemp("blobs"))
    out = tmp_path_factory.mktemp("plugin")
    assert reproduce(out, data, f"{PLUGIN}:JPEGDefence") == 0  # (none: the study's grid)
    return out, data


def _reuse_victim(src: Path, dst: Path) -> Path:
    """A new study directory that reuses ``src``'s trained victim (not its cells)."""
    shutil.copytree(src / "artifacts", dst / "artifacts")
    shutil.copy(src / ".medsec-run", dst / ".medsec-run")  # a medsec run, to be resumed
    return dst


def test_registry_holds_every_builtin_in_family_order():
    entries = list_defences()
    assert {d.name for d in entries} == BUILTINS
    families = [d.family for d in entries]
    assert families == sorted(
        families, key=["none", "robustification", "detection", "integrity"].index
    )
    assert all(d.paper for d in entries if d.family in ("robustification", "detection"))


def test_plugin_is_probed_adapted_and_beaten(plugin_run):
    """JPEG has no gradient: plain PGD stalls on it, the probe finds the zero gradients and
    the evaluator attacks through BPDA, which takes it back to the victim's level."""
    out, _ = plugin_run
    m = json.loads((out / "metrics.json").read_text())
    rows = [r for r in m["rows"] if r["defence"] == "jpeg-75"]
    plain = {r["eps_255"]: r for r in rows if not r["adaptive"]}
    adaptive = {r["eps_255"]: r for r in rows if r["adaptive"]}
    assert set(plain) == set(adaptive) == {2.0, 8.0}
    assert plain[8.0]["zero_grad_fraction"] == 1.0  # masked: plain PGD sees nothing
    assert plain[8.0]["attack_success_rate"] <= 0.2
    assert adaptive[8.0]["zero_grad_fraction"] == 0.0
    assert adaptive[8.0]["probe"]["preprocess_zero_grad_fraction"] == 1.0
    assert "BPDA" in adaptive[8.0]["adaptations"][0] and "preprocess" in adaptive[8.0]["bpda"]
    assert adaptive[8.0]["attack_success_rate"] >= 0.9
    md = (out / "report.md").read_text()
    section = md.split("### jpeg-75")[1].split("\n## ")[0]
    assert "jpeg-75: probe on" in section and "BPDA (identity backward)" in section
    assert "Das et al." in section and "JPEG quality 75" in section


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("missing.py:X", "no such file"),
        (f"{PLUGIN}:Nope", "has no attribute 'Nope'"),
        (f"{PLUGIN}:JPEG", "is not a medsec.defences.Defence"),
        ("no_such_package.mod:X", "cannot import no_such_package.mod"),
    ],
)
def test_bad_plugin_is_one_line_exit_2(spec, needle, tmp_path, capsys):
    assert reproduce(tmp_path / "o", tmp_path, f"none,{spec}") == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_plugin_whose_build_raises_is_named(plugin_run, tmp_path, capsys):
    out, data = plugin_run
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from medsec.defences import Defence\n"
        "class Broken(Defence):\n"
        "    name = 'broken'\n"
        "    def build(self, victim, data, env):\n"
        "        raise ValueError('no weights here')\n"
    )
    study = _reuse_victim(out, tmp_path / "study")
    assert reproduce(study, data, f"{bad}:Broken") == 2
    err = capsys.readouterr().err.strip()
    assert "plug-in 'broken' failed: ValueError('no weights here')" in err
    assert len(err.splitlines()) == 1


class Noisy(nn.Module):
    """A randomised 'defence': Gaussian noise on the input at every call."""

    def __init__(self, victim: nn.Module) -> None:
        super().__init__()
        self.victim = victim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


def test_probe_gives_a_randomised_plugin_eot_and_leaves_a_plain_one_alone(trained):
    victim, _ = trained
    x = torch.rand(8, 1, 28, 28)
    dep = Deployed(Noisy(victim))
    found = probe(dep, x)
    assert found.randomised and found.zero_grad_fraction == 0.0
    adapted, done = adapt(dep, found, eot=10, repeats=5)
    assert adapted.eot == 10 and adapted.repeats == 5 and "EOT" in done[0]
    plain, done = adapt(Deployed(victim), probe(Deployed(victim), x), eot=10, repeats=5)
    assert plain.eot == 1 and plain.attack_view is None and done == []
    declared = Deployed(Noisy(victim), eot=3)  # a defence that says how: left as declared
    assert adapt(declared, probe(declared, x), eot=10, repeats=5)[0].eot == 3


def test_every_robustification_defence_end_to_end(plugin_run, tmp_path):
    """The five built-in robustification defences through the one generic evaluator."""
    out, data = plugin_run
    study = _reuse_victim(out, tmp_path / "robust")
    names = ("ssat", "kmm", "dae", "medrdf", "pgd-at")
    run_tiny_study(study, data, defences=",".join(names))
    m = json.loads((study / "metrics.json").read_text())
    for name in names:
        rows = [r for r in m["rows"] if r["defence"] == name]
        grid = {2.0, 8.0, round(get_defence(name).working_eps * 255, 4)}
        assert {r["eps_255"] for r in rows if r["adaptive"]} == grid, name
        assert any(not r["adaptive"] for r in rows), name
        assert all(0 <= r["attack_success_rate"] <= 1 for r in rows)
        checks = {c["name"].removeprefix(f"{name}: "): c for c in m["checks"]}
        checks = {k: c for k, c in checks.items() if c["defence"] == name}
        assert all(c["kind"] in ("validity", "outcome") for c in checks.values())
        for indicator in (
            "silent success",
            "incomplete optimisation",
            "unavailable gradients",
            "unstable predictions",
            "unconstrained attack failure",
        ):
            c = checks[f"indicator: {indicator}"]
            assert c["kind"] == "validity" and c["measured"] is not None, (name, indicator)
        verdict = next(v for v in m["verdicts"] if v["defence"] == name)
        failed = [k for k, c in checks.items() if c["kind"] == "validity" and c["passed"] is False]
        if failed:
            assert verdict["label"] == "inconclusive", (name, failed)
        elif verdict["label"] == "inconclusive":  # evidence missing, or neither broken nor a gain
            assert any(w in verdict["reason"] for w in ("missing", "not significantly")), name
        notes = [n["text"] for n in m["notes"] if n["defence"] == name]
        assert any("probe on" in t for t in notes) and any("Assumed:" in t for t in notes)
    assert any("reject option refuses" in n["text"] for n in m["notes"] if n["defence"] == "medrdf")
    medrdf = [r for r in m["rows"] if r["defence"] == "medrdf" and r["adaptive"]]
    assert all(r["eot_samples"] == 10 and r["repeats"] == 5 for r in medrdf)
    heads = {h["defence"]: h for h in m["headline"]}
    for name in names:  # the same-eps record at the working budget, five ASRs with intervals
        h, d = heads[name], get_defence(name)
        assert h["eps"] == pytest.approx(d.working_eps) and "paper" in h["budget"], name
        for k in ("undefended", "paper_attack", "whitebox", "adaptive", "square"):
            lo, hi = h[f"{k}_ci"]
            assert 0 <= lo <= h[f"{k}_asr"] <= hi <= 1 and h[f"{k}_n"] > 0, (name, k)
        v = next(v for v in m["verdicts"] if v["defence"] == name)
        assert h["verdict"] == v["label"] and v["eps_255"] == h["eps_255"], name
        assert {r["eps_255"] for r in m["rows"] if r["defence"] == name and r["adaptive"]} >= {
            h["eps_255"]
        }
    for name in names:  # the robust-accuracy figure marks each working budget on its curve
        stored = json.loads((study / "artifacts/robust/curves" / f"{name}.json").read_text())
        assert stored["working"] == pytest.approx(heads[name]["eps_255"])
        assert any(p[0] == pytest.approx(stored["working"]) for p in stored["points"]), name
    for name in ("dae", "medrdf"):  # transfer attacks crafted to completion, as the papers did
        paper = [r for r in m["rows"] if r["defence"] == name and not r["adaptive"]]
        assert paper and all(r["settings"]["early_stop"] is False for r in paper), name
    transfer = {c["defence"] for c in m["checks"] if c["name"].endswith("transfer failure")}
    assert "medrdf" in transfer  # attacked through a view other than the pipeline
    assert any(c["name"].startswith("fixture:") for c in m["checks"])
