"""The same-eps comparison at each defence's working budget: the study's headline record.

A defence's claim is judged where the defence claims to work, not at one budget for all:
its paper's budget (``Defence.working_eps``) where it states one, else the grid eps where its
non-adaptive gain over the undefended victim is largest. There, five attack success rates
side by side, each with its 95% interval, all judged by the one Criterion on the deployed
pipeline: the undefended victim (the informed attack on the victim alone), the paper's own
attack, plain white-box PGD through the deployed pipeline (what a defence-unaware evaluator
would run), the informed (adaptive) attacker and the gradient-free Square Attack. The
verdict is added when the report is written (it needs every validity check).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from medsec.attacks import AttackSpec
from medsec.evaluation.context import rate_ci
from medsec.evaluation.verdict import verdict

RATES = ("undefended", "paper_attack", "whitebox", "adaptive", "square")
WHITEBOX_STEPS = 50  # plain PGD (CE, one random start, no EOT/BPDA) through the pipeline


def budgets(grid: tuple[float, ...], working: float | None) -> list[float]:
    """The defence's eps values: the profile's grid plus its declared working budget."""
    return sorted({*grid, *([working] if working else [])})


def at_budget(paper: list[AttackSpec], eps: float) -> list[AttackSpec]:
    """``paper`` plus, where it has none at ``eps``, a copy of each of its attacks there."""
    if any(abs(s.eps - eps) < 1e-9 for s in paper):
        return paper
    first = {s.name: s for s in reversed(paper)}
    return paper + [replace(s, eps=eps) for s in first.values()]


def working_budget(
    declared: float | None, gains: dict[float, float], fallback: float
) -> tuple[float, str]:
    """(eps, why): the declared budget, else the eps of the largest non-adaptive gain (the
    undefended victim's ASR minus the defended ASR under the paper's attack; the smaller eps
    on ties), else ``fallback``."""
    if declared:
        return declared, "the paper's working budget"
    if not gains:
        return fallback, "no non-adaptive gain measured: the study's headline eps"
    eps = max(gains, key=lambda e: (gains[e], -e))
    return eps, f"largest non-adaptive gain ({gains[eps]:+.3f})"


def parts(found: dict[str, Any]) -> dict[str, dict[str, float]]:
    """What each part of the informed attacker adds: per part (name -> per-image success),
    its own success rate and the share of images only it fools."""
    hits = {k: np.asarray(v, dtype=bool) for k, v in found.items()}
    out = {}
    for k, mine in hits.items():
        rest = [v for j, v in hits.items() if j != k]
        alone = mine & ~np.any(rest, axis=0) if rest else mine
        out[k] = {"asr": float(mine.mean()), "only": float(alone.mean())}
    return out


def parts_text(p: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} ({v['asr']:.3f}; {v['only']:.3f} only by it)" for k, v in p.items())


def whitebox_spec(eps: float) -> AttackSpec:
    return AttackSpec("whitebox-pgd", eps, steps=WHITEBOX_STEPS)


def record(
    defence: str,
    family: str,
    eps: float,
    why: str,
    rates: dict[str, tuple[float | None, int]],
    paper_attack: str,
    notes: list[str],
) -> dict[str, Any]:
    """One headline record; ``rates`` maps undefended / paper_attack / whitebox / adaptive /
    square to (ASR, images it is measured on)."""
    out: dict[str, Any] = {
        "defence": defence,
        "family": family,
        "eps": eps,
        "eps_255": round(eps * 255, 4),
        "budget": why,
        "paper_attack": paper_attack,
    }
    for key, (asr, n) in rates.items():
        ci = list(rate_ci(asr, n)) if asr is not None else [None, None]
        out[f"{key}_asr"], out[f"{key}_ci"], out[f"{key}_n"] = asr, ci, n
    und, ada = out.get("undefended_asr"), out.get("adaptive_asr")
    out["gain_kept"] = None if und is None or ada is None else und - ada
    out["removed_by"] = removed_by(out)
    out["notes"] = notes
    return out


def removed_by(rec: dict[str, Any]) -> str:
    """Which attack first takes the defence back to the victim's level (lower CI bound of the
    victim's rate reached): the paper's, plain white-box, only the informed one, or none."""
    floor = rec.get("undefended_ci", [None])[0]
    if floor is None:
        return "not measured"
    for key, label in (
        ("paper_attack", "the paper's attack"),
        ("whitebox", "plain white-box PGD"),
        ("adaptive", "only the informed attacker"),
    ):
        high = rec.get(f"{key}_ci", [None, None])[1]
        if high is not None and high >= floor:
            return label
    return "none (a gain remains)"


def with_verdicts(
    records: list[dict[str, Any]], rows: list[dict[str, Any]], checks: list[Any]
) -> list[dict[str, Any]]:
    """The records with each defence's verdict (label and reason) at its working budget."""
    out = []
    for rec in records:
        v = verdict(rec["defence"], rows, checks)
        label, reason = (v.label, v.reason) if v is not None else ("not judged", "")
        out.append(rec | {"verdict": label, "verdict_reason": reason})
    return out


def _cell(rec: dict[str, Any], key: str) -> str:
    asr, (low, high) = rec.get(f"{key}_asr"), rec.get(f"{key}_ci", [None, None])
    if asr is None:
        return "-"
    return f"{asr:.3f} [{low:.2f}, {high:.2f}]" if low is not None else f"{asr:.3f}"


def blocks(records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The report's opening table: one row per defence at its working budget."""
    if not records:
        return []
    header = ["defence", "working budget", "undefended victim", "paper's attack", "plain white-box",
              "informed attacker", "Square", "gain removed by", "verdict"]  # fmt: skip
    body = [
        [
            r["defence"],
            f"{r['eps_255']:g}/255 ({r['budget']})",
            *(_cell(r, k) for k in RATES),
            r["removed_by"],
            r.get("verdict", "-"),
        ]
        for r in records
    ]
    intro = (
        "Each defence where it works: attack success rate (95% Clopper-Pearson interval) of "
        "five attacks at its working budget, all judged on the deployed pipeline. The verdict "
        "needs every validity check of the defence to pass (see its validity panel)."
    )
    return [("p", intro), ("table", {"header": header, "rows": body})]
