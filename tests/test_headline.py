"""The headline record: the working budget, the same-eps rates with intervals, which attack
removed the gain, and the table the report opens with."""

from __future__ import annotations

import pytest

from medsec.attacks import preset
from medsec.evaluation import headline


def test_working_budget_is_declared_else_largest_gain_else_fallback():
    assert headline.working_budget(1 / 255, {2 / 255: 0.4}, 4 / 255)[0] == 1 / 255
    eps, why = headline.working_budget(None, {1 / 255: 0.2, 2 / 255: 0.35, 4 / 255: 0.1}, 4)
    assert eps == 2 / 255 and "largest non-adaptive gain (+0.350)" in why
    assert headline.working_budget(None, {1 / 255: 0.3, 2 / 255: 0.3}, 4)[0] == 1 / 255  # tie
    assert headline.working_budget(None, {}, 4 / 255)[0] == 4 / 255


def test_budget_grid_and_paper_attacks_reach_the_working_budget():
    assert headline.budgets((2 / 255, 8 / 255), 0.003) == [0.003, 2 / 255, 8 / 255]
    assert headline.budgets((2 / 255, 8 / 255), 2 / 255) == [2 / 255, 8 / 255]
    paper = [preset(a, e) for a in ("fgsm", "pgd-20") for e in (2 / 255, 8 / 255)]
    moved = headline.at_budget(paper, 0.003)
    assert moved[:4] == paper and [(s.name, s.eps) for s in moved[4:]] == [
        ("pgd-20", 0.003),
        ("fgsm", 0.003),
    ]
    assert headline.at_budget(paper, 2 / 255) == paper


def _rec(**rates):
    return headline.record("d", "robustification", 1 / 255, "declared", rates, "pgd-20", [])


def test_record_intervals_and_which_attack_removed_the_gain():
    base = {"undefended": (0.9, 200), "square": (0.5, 48)}
    rec = _rec(**base, paper_attack=(0.3, 200), whitebox=(0.35, 200), adaptive=(0.88, 200))
    lo, hi = rec["adaptive_ci"]
    assert lo < 0.88 < hi and rec["square_n"] == 48 and rec["gain_kept"] == pytest.approx(0.02)
    assert rec["removed_by"] == "only the informed attacker"
    rec = _rec(**base, paper_attack=(0.3, 200), whitebox=(0.89, 200), adaptive=(0.9, 200))
    assert rec["removed_by"] == "plain white-box PGD"
    rec = _rec(**base, paper_attack=(0.3, 200), whitebox=(0.3, 200), adaptive=(0.5, 200))
    assert rec["removed_by"] == "none (a gain remains)"
    kind, table = headline.blocks([rec | {"verdict": "partly robust"}])[1]
    assert kind == "table" and table["rows"][0][-1] == "partly robust"
    assert table["rows"][0][5].startswith("0.500 [")


def test_parts_say_what_each_part_of_the_informed_attacker_adds():
    found = {"PGD": [1, 1, 0, 0, 0], "APGD": [1, 0, 1, 0, 0], "paper": [0, 0, 0, 0, 0]}
    got = headline.parts(found)
    assert got["PGD"] == {"asr": 0.4, "only": 0.2} and got["APGD"] == {"asr": 0.4, "only": 0.2}
    assert got["paper"] == {"asr": 0.0, "only": 0.0}
    assert "APGD (0.400; 0.200 only by it)" in headline.parts_text(got)
