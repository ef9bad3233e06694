"""The report's per-family result tables: one row per attack, one column per eps, each value
with its 95% interval where the row has one."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from medsec.evaluation.render import Block


def fmt(v: Any) -> str:
    """A table cell: 3 decimals for floats, "-" for missing."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _with_ci(r: dict[str, Any], value: str) -> str:
    """The value, followed by its 95% interval where the row has one."""
    v = r.get(value)
    ci = (r.get("ci_low"), r.get("ci_high")) if value == "attack_success_rate" else None
    if value == "tpr_at_5fpr" and r.get("tpr_ci"):
        ci = tuple(r["tpr_ci"])
    if v is None or ci is None or ci[0] is None:
        return fmt(v)
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _pivot(rows: list[dict[str, Any]], value: str) -> dict[str, Any]:
    """Rows (attack, adaptive) x columns eps/255 of one value (with its 95% interval)."""
    eps = sorted({r["eps_255"] for r in rows})
    table: dict[tuple[str, bool], dict[float, Any]] = defaultdict(dict)
    for r in rows:
        table[(r["attack"], r["adaptive"])][r["eps_255"]] = _with_ci(r, value)
    header = ["attack", "adaptive", *[f"{e:g}/255" for e in eps]]
    body = [
        [a, "yes" if ad else "no", *[cells.get(e, "-") for e in eps]]
        for (a, ad), cells in table.items()
    ]
    return {"header": header, "rows": body}


def family_tables(family: str, drows: list[dict[str, Any]]) -> list[Block]:
    """The tables of one entry: the gate's verdict table, or ASR (and detection) pivots."""
    if family == "integrity":
        header = [
            "adversarial images from",
            "n",
            "altered",
            "rejected (of altered)",
            "fooled AND accepted",
            "clean false rejections",
        ]
        body = [
            [
                r["attack"],
                r["n"],
                r.get("changed"),
                fmt(r.get("rejection_rate")),
                fmt(r["attack_success_rate"]),
                fmt(r.get("false_rejection_rate")),
            ]
            for r in drows
        ]
        return [("table", {"header": header, "rows": body})]
    joint = " under the joint criterion: misclassified AND not flagged."
    blocks: list[Block] = [
        ("p", "Attack success rate (ASR)" + (joint if family == "detection" else ".")),
        ("table", _pivot(drows, "attack_success_rate")),
    ]
    if family == "detection":
        blocks.append(("p", "Detection ROC-AUC (clean vs adversarial):"))
        blocks.append(("table", _pivot(drows, "detection_auc")))
        if any(r.get("detection_auc_per_attack_fit") is not None for r in drows):
            blocks.append(
                (
                    "p",
                    "Detection ROC-AUC with one detector refitted per attack (Ma et al.'s "
                    "protocol; the deployed detector above is fitted on all four attacks):",
                )
            )
            per_attack = [r for r in drows if not r["adaptive"]]
            blocks.append(("table", _pivot(per_attack, "detection_auc_per_attack_fit")))
        blocks.append(("p", "True-positive rate at 5% false positives:"))
        blocks.append(("table", _pivot(drows, "tpr_at_5fpr")))
        blocks.append(("p", TWO_SIDED))
        blocks.append(("table", _pivot(drows, "tpr_two_sided_at_5fpr")))
    return blocks


TWO_SIDED = (
    "The same, for the best two-sided rule (flag scores outside an interval holding 95% of the "
    "clean scores; chosen on these scores, an upper bound). Well above the one-sided rate, "
    "it shows the attacker overshooting into the far tail of the clean scores:"
)
