"""The verdict rule and the Square cross-check are able to fail: each outcome from a
hand-made set of rows and checks."""

from __future__ import annotations

from medsec.evaluation.blackbox import square_check
from medsec.evaluation.context import Check, make_row
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
