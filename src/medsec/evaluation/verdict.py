"""One verdict per defence from its rows and checks: "broken", "partly robust" or
"inconclusive" (the report's and the README's vocabulary).

- inconclusive: a validity check of the defence failed, so a low attack success rate may
  be the attack's fault (the failed checks are named); or the ASR stays below the victim's
  but a validity check could not be run (e.g. no image where the binarization test is
  feasible), so the evidence that the attack was strong enough is missing;
- broken: at the budget where the defence works (its headline record's eps: the declared
  ``working_eps``, else where its non-adaptive gain is largest; else 4/255), the informed
  attacker's success rate is not significantly below the undefended victim's under the
  same budget (the two 95% intervals overlap, both measured on n images) and at least
  ``BROKEN_SHARE`` of it;
- partly robust: significantly below the victim's level there;
- inconclusive also where neither holds: below ``BROKEN_SHARE`` of the victim's rate but
  not significantly (more images would decide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medsec.evaluation.context import rate_ci

DEFAULT_EPS_255 = 4.0
# "back to the victim's level": the informed attacker's ASR is not significantly below the
# undefended victim's AND at least this share of it (the claims issue's bar for "broken")
BROKEN_SHARE = 0.95
JUDGED = ("robustification", "detection")


@dataclass(frozen=True)
class Verdict:
    defence: str
    label: str
    eps_255: float
    asr: float
    ci: tuple[float, float]
    victim_asr: float
    reason: str


def _victim_asr(rows: list[dict[str, Any]], row: dict[str, Any]) -> float | None:
    """The undefended victim's success rate at the row's eps: the same adaptive attack where
    the evaluator ran it (robustification), else the victim's worst case over the grid."""
    if row.get("undefended_asr") is not None:
        return float(row["undefended_asr"])
    for r in rows:
        if r["family"] == "none" and r["attack"] == "worst-case" and r["eps_255"] == row["eps_255"]:
            return float(r["attack_success_rate"])
    return row.get("victim_fooled_rate")


def verdict(name: str, rows: list[dict[str, Any]], checks: list[Any]) -> Verdict | None:
    """The verdict of defence ``name`` (None for entries that are not judged)."""
    own = [r for r in rows if r["defence"] == name and r["adaptive"] and r["family"] in JUDGED]
    if not own:
        return None
    working = own[0].get("headline_eps") or own[0].get("working_eps")
    target = working * 255 if working else DEFAULT_EPS_255
    eps = min({r["eps_255"] for r in own}, key=lambda e: abs(e - target))
    row = max((r for r in own if r["eps_255"] == eps), key=lambda r: r["attack_success_rate"])
    asr = float(row.get("worst_case_asr", row["attack_success_rate"]))
    low, high = rate_ci(asr, row["n"])
    victim = _victim_asr(rows, row)
    validity = [c for c in checks if c.defence == name and c.kind == "validity"]
    failed = [c.name for c in validity if c.passed is False]
    not_run = [c.name for c in validity if c.passed is None]
    where = f"at {eps:g}/255" + (
        " (its working budget)" if working else " (no working budget: the headline eps)"
    )
    # the victim's level reached: not significantly below it (the intervals overlap)
    reached = victim is None or (high is not None and high >= rate_ci(victim, row["n"])[0])
    if failed:
        label = "inconclusive"
        reason = f"validity checks failed: {'; '.join(failed)}"
    elif victim is None or (reached and asr >= BROKEN_SHARE * victim):
        label = "broken"  # the attack's successes are the evidence; a test of its strength
        reason = (  # that could not be run takes nothing from them
            f"{where} the informed attacker reaches ASR {asr:.3f} [{low:.3f}, {high:.3f}], "
            "not significantly below the undefended victim's "
            + ("(not measured)" if victim is None else f"{victim:.3f}")
            + f" and at least {BROKEN_SHARE:g} of it"
            + (f" (could not be run: {'; '.join(not_run)})" if not_run else "")
        )
    elif reached:
        label = "inconclusive"
        reason = (
            f"{where} ASR {asr:.3f} [{low:.3f}, {high:.3f}] is below {BROKEN_SHARE:g} of the "
            f"undefended victim's {victim:.3f} but not significantly: neither back to the "
            f"victim's level nor a significant gain on {row['n']} images"
        )
    elif not_run:
        label = "inconclusive"
        reason = (
            f"{where} ASR {asr:.3f} [{low:.3f}, {high:.3f}] stays below the undefended "
            f"victim's {victim:.3f}, but the evidence that the attack could have done better "
            f"is missing: could not be run: {'; '.join(not_run)}"
        )
    else:
        label = "partly robust"
        reason = (
            f"{where} ASR {asr:.3f} [{low:.3f}, {high:.3f}] stays below the undefended "
            f"victim's {victim:.3f}"
        )
    return Verdict(name, label, eps, asr, (low or 0.0, high or 1.0), victim or 0.0, reason)


def verdicts(rows: list[dict[str, Any]], checks: list[Any]) -> list[Verdict]:
    """The verdict of every judged entry, in row order."""
    found = (verdict(n, rows, checks) for n in dict.fromkeys(r["defence"] for r in rows))
    return [v for v in found if v is not None]
