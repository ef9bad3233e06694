"""The verdict rule, the Square cross-check and the convergence check are able to fail: each
outcome from a hand-made set of rows and checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsec.attacks import AttackSpec
from medsec.defences import get_defence
from medsec.defences.base import Deployed
from medsec.evaluation.blackbox import square_check
from medsec.evaluation.context import Check, make_row
from medsec.evaluation.robust_checks import Found, diagnostics
from medsec.evaluation.verdict import verdict


def _row(asr: float, victim: float, n: int = 200, working: float | None = None) -> dict:
    return make_row(
        defence="d",
        family="robustification",
        attack="adaptive",
        adaptive=True,
        eps=4 / 255,
        n=n,
        clean_accuracy=0.9,
        attack_success_rate=asr,
        worst_case_asr=asr,
        undefended_asr=victim,
        working_eps=working,
    )


def test_broken_partly_robust_and_inconclusive():
    assert verdict("d", [_row(0.97, 1.0)], []).label == "broken"  # interval reaches 1.0
    assert verdict("d", [_row(0.50, 1.0)], []).label == "partly robust"
    # within the victim's interval but below 0.95 of its rate: neither broken nor a gain
    between = verdict("d", [_row(0.90, 0.97, n=50)], [])
    assert between.label == "inconclusive" and "not significantly" in between.reason
    assert verdict("d", [_row(0.93, 0.97, n=50)], []).label == "broken"
    failed = [Check("d: indicator: silent success", False, "", "d", "validity")]
    found = verdict("d", [_row(0.97, 1.0)], failed)
    assert found.label == "inconclusive" and "silent success" in found.reason
    outcome_only = [Check("d: target", False, "", "d", "outcome")]
    assert verdict("d", [_row(0.97, 1.0)], outcome_only).label == "broken"
    assert verdict("other", [_row(0.97, 1.0)], []) is None  # not judged: no rows


def test_a_check_that_could_not_be_run_is_missing_evidence_not_a_failure():
    """An infeasible binarization test (passed None) leaves "broken" standing (the attack's
    successes are the evidence) but cannot support "partly robust"."""
    not_run = [Check("d: binarization test", None, "nothing feasible", "d", "validity")]
    broken = verdict("d", [_row(0.97, 1.0)], not_run)
    assert broken.label == "broken" and "could not be run: d: binarization test" in broken.reason
    kept = verdict("d", [_row(0.50, 1.0)], not_run)
    assert kept.label == "inconclusive" and "missing" in kept.reason
    failed = [*not_run, Check("d: indicator: silent success", False, "", "d", "validity")]
    assert "validity checks failed" in verdict("d", [_row(0.97, 1.0)], failed).reason


class _Ctx:
    def __init__(self) -> None:
        self.checks: list[tuple[str, bool]] = []

    def add_check(self, name: str, passed: bool, detail: str, **kw: object) -> None:
        self.checks.append((name, passed))


def test_square_check_fails_when_the_white_box_attack_is_clearly_weaker():
    ctx = _Ctx()
    square = {"asr": 0.9, "success": [True] * 45 + [False] * 5, "queries": 100}
    square_check(ctx, "d", [True] * 10 + [False] * 40, square, 4 / 255)  # 0.2 vs 0.9
    square_check(ctx, "d", [True] * 44 + [False] * 6, square, 4 / 255)  # 0.88 vs 0.9
    # paired: the white-box interval [0.10, 0.35] reaches Square's 0.33, but Square fooled the
    # same 10 images and 6 more (p = 0.016); equal rates on different images pass
    wb = [True] * 10 + [False] * 38
    square_check(ctx, "d", wb, {"asr": 16 / 48, "success": [True] * 16 + [False] * 32,
                                "queries": 100}, 4 / 255)  # fmt: skip
    other = {"asr": 10 / 48, "success": [False] * 10 + [True] * 10 + [False] * 28, "queries": 1}
    square_check(ctx, "d", wb, other, 4 / 255)
    assert [p for _, p in ctx.checks] == [False, True, False, True]


class _FigCtx(_Ctx):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def figure_path(self, name: str) -> Path:
        return self.folder / name

    def add_figure(self, *args: object, **kw: object) -> None:
        pass


def _diagnosed(
    tmp_path: Path, eot: int, stronger: str | None, informed: int = 10, shifted: bool = False
) -> dict[str, bool]:
    """The robust diagnostics at a working budget of 1/255 with a fake attack whose every
    run fools the first 10 of 20 images, except ``stronger`` (a variant), which fools 15
    (or, ``shifted``, the last 10); the informed attacker fools the first ``informed``."""
    w = 1 / 255
    found = Found(get_defence("none"), Deployed(nn.Linear(1, 2), eot=eot), 0.9, {},
                  {w: {"success": [True] * 10 + [False] * 10}}, {}, [], {})  # fmt: skip
    seen: list[tuple[str, float, int | None]] = []

    def run(spec: AttackSpec, x, y, idx, what: str, dep: Deployed | None = None) -> dict:
        seen.append((what, spec.eps, None if dep is None else dep.eot))
        hits = 15 if what == stronger and not shifted else 10
        success = [True] * hits + [False] * (20 - hits)
        return {"asr": hits / 20, "success": success[::-1] if what == stronger and shifted
                else success, "loss_curve": [0.0, 1.0]}  # fmt: skip

    ctx = _FigCtx(tmp_path)
    xs = torch.zeros(20, 1)
    hit = np.arange(20) < informed
    diagnostics(ctx, found, (xs, xs, xs), run, lambda d, e, **o: AttackSpec("a", e, **o), w, hit)
    assert {e for what, e, _ in seen if what != "diag-unbounded"} == {w}  # at the budget
    assert ("diag-eot2x", w, 2 * eot) in seen if eot > 1 else "diag-eot2x" not in str(seen)
    return {name.split(": ")[1].split(" (")[0]: ok for name, ok in ctx.checks}


def test_convergence_fails_when_a_stronger_variant_adds(tmp_path: Path) -> None:
    assert _diagnosed(tmp_path, 1, None)["convergence"]
    assert not _diagnosed(tmp_path, 1, "diag-long")["convergence"]
    # judged per image against the informed attacker (APGD and the paper's attacks included)
    assert _diagnosed(tmp_path, 1, "diag-long", informed=15)["convergence"]
    assert not _diagnosed(tmp_path, 1, "diag-long", shifted=True)["convergence"]  # same rate
    assert not _diagnosed(tmp_path, 5, "diag-eot2x")["convergence"]
    assert not _diagnosed(tmp_path, 1, "diag-sweep-50")["step-size sweep"]
