"""Write the study's outputs: metrics.json (the contract), metrics.csv, report.md and a
self-contained report.html (figures embedded). Both reports render one list of blocks."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medsec.defences.base import FAMILIES
from medsec.evaluation import headline
from medsec.evaluation.context import EPS_UNIT, StudyContext
from medsec.evaluation.render import Block, render_html, render_markdown
from medsec.evaluation.tables import family_tables, fmt
from medsec.evaluation.verdict import verdict, verdicts
from medsec.utils import atomic_write_json, atomic_write_text

THREAT_MODEL = (
    "White-box, informed attacker: knows the architecture, the weights, every defence, the "
    "detectors and their thresholds, and the distribution of any randomness (not its draws). "
    "The attacker edits the pixels of the stored image (float values in [0,1]; the signature "
    f"gate sees them as stored 8-bit values). Norm L-inf; eps in {EPS_UNIT} (x/255). "
    "Success = the deployed pipeline's re-prediction is wrong AND (for detectors) the detector, "
    "at its threshold fixed beforehand at 5% false positives on clean validation images, "
    "does not flag the image. Attack success rates are measured on test images the deployed "
    "pipeline classifies correctly when clean."
)


def _stages(record: dict[str, Any]) -> str:
    """'data 3 s, victim 40 s, none 12 s, ...': where the wall time went."""
    parts = record.get("wall_time_per_stage_s", {}) | record.get("wall_time_per_entry_s", {})
    return ", ".join(f"{k} {v:.0f} s" for k, v in parts.items() if k != "defences")


def result(c: Any) -> str:
    """PASS, FAIL, or NOT RUN (a check that could not be run: missing evidence)."""
    return "NOT RUN" if c.passed is None else "PASS" if c.passed else "FAIL"


def _not_run(checks: list[Any]) -> str:
    n = sum(c.passed is None for c in checks)
    return f", {n} could not be run" if n else ""


def _check_table(checks: list[Any]) -> Block:
    return (
        "table",
        {
            "header": ["check", "result", "measured", "expected"],
            "rows": [[c.name, result(c), fmt(c.measured), c.expected or "-"] for c in checks],
        },
    )


def _validity_blocks(ctx: StudyContext, name: str, rows: list[dict[str, Any]]) -> list[Block]:
    """A defence's validity panel (can its evaluation be trusted?), its verdict, then its
    outcome checks."""
    own = [c for c in ctx.checks if c.defence == name]
    validity = [c for c in own if c.kind == "validity"]
    outcome = [c for c in own if c.kind == "outcome"]
    blocks: list[Block] = []
    if validity:
        passed = sum(c.passed is True for c in validity)
        blocks += [
            ("p", f"Validity panel: {passed}/{len(validity)} checks pass{_not_run(validity)}."),
            _check_table(validity),
        ]
    found = verdict(name, rows, ctx.checks)
    if found is not None:
        blocks.append(("p", f"Verdict: **{found.label}** - {found.reason}."))
    if outcome:
        blocks += [("p", "Outcome checks (what the study found):"), _check_table(outcome)]
    return blocks


def _family_blocks(family: str, rows: list[dict[str, Any]], ctx: StudyContext) -> list[Block]:
    """One family's section: family-wide notes, then per entry its tables, figures and notes
    (filed by the ``defence`` field of each note and figure), then family-wide figures."""
    blocks: list[Block] = [("h2", FAMILIES[family].title)]
    by_def: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_def[r["defence"]].append(r)
    notes = [n for n in ctx.notes if n.family == family]
    figures = [f for f in ctx.figures if f.family == family]
    blocks += [("p", n.text) for n in notes if n.defence is None]
    for name, drows in by_def.items():
        blocks.append(
            (
                "h3",
                f"{name}: clean accuracy {drows[0]['clean_accuracy']:.3f}, "
                f"n = {drows[0]['n']} attacked images",
            )
        )
        blocks += family_tables(family, drows)
        blocks += _validity_blocks(ctx, name, rows)
        blocks += [("figure", (f.path, f.caption)) for f in figures if f.defence == name]
        blocks += [("p", n.text) for n in notes if n.defence == name]
    blocks += [("figure", (f.path, f.caption)) for f in figures if f.defence is None]
    return blocks


def _summary(ctx: StudyContext, rows: list[dict[str, Any]]) -> list[str]:
    meta = ctx.victim_meta["metrics"]
    lines = [
        f"Victim `{ctx.victim_meta['arch']}` on `{ctx.data.name}`: clean accuracy "
        f"{meta['clean_accuracy']:.3f}, ROC-AUC {meta['clean_auc']:.3f}."
    ]
    for r in rows:
        if r["family"] == "none" and r["attack"] == "pgd-100" and abs(r["eps_255"] - 4) < 1e-6:
            lines.append(
                f"Undefended: PGD-100 at 4/255 fools it on "
                f"{r['attack_success_rate']:.1%} of {r['n']} images."
            )
    adaptive = [
        r
        for r in rows
        if r["adaptive"]
        and abs(r["eps_255"] - 4) < 1e-6
        and r["family"] in ("detection", "robustification")
    ]
    best: dict[str, float] = {}
    for r in adaptive:
        best[r["defence"]] = max(best.get(r["defence"], 0.0), r["attack_success_rate"])
    for name, asr in best.items():
        lines.append(f"`{name}` under the adaptive attack at 4/255: ASR {asr:.1%}.")
    lines += [f"`{v.defence}`: {v.label} ({v.reason})." for v in verdicts(rows, ctx.checks)]
    gate = [c for c in ctx.checks if c.defence == "signature-gate"]
    lines += [f"{c.name}: {result(c)} ({c.detail})." for c in gate]
    validity = [c for c in ctx.checks if c.kind == "validity"]
    passed = sum(c.passed is True for c in validity)
    lines.append(
        f"Validity checks: {passed}/{len(validity)} passed{_not_run(validity)} "
        f"(outcome checks are reported with each entry, not counted here)."
    )
    return lines


HEADLINE_EPS_255 = (1.0, 4.0)  # where the papers' claims live, and the issues' target


def _glance(rows: list[dict[str, Any]], target: float) -> tuple[float, dict[str, list[Any]]]:
    """(eps nearest ``target`` /255, per entry name [family, clean accuracy, best
    non-adaptive ASR, best adaptive ASR]; None where absent); the gate's ASR is fooled AND
    accepted over every attack."""
    eps = {r["eps_255"] for r in rows if r["family"] != "integrity"}
    e = min(eps, key=lambda v: abs(v - target)) if eps else target
    out: dict[str, list[Any]] = {}
    for r in rows:
        gate = r["family"] == "integrity"
        if not gate and r["eps_255"] != e:
            continue
        name = "signature-gate" if gate else r["defence"]
        entry = out.setdefault(name, [r["family"], r["clean_accuracy"], None, None])
        slot = 3 if gate or r["adaptive"] else 2
        entry[slot] = max(entry[slot] or 0.0, r["attack_success_rate"])
    return e, out


def _bars(view: dict[str, list[Any]], names: list[str]) -> tuple[list[float], list[float]]:
    """(non-adaptive, adaptive) ASR per name for the figure; adaptive falls back to the
    non-adaptive value where an entry has none (the undefended victim), missing -> 0."""
    before = [(view[n][2] or 0.0) if n in view else 0.0 for n in names]
    after = [
        b if n not in view or view[n][3] is None else view[n][3]
        for n, b in zip(names, before, strict=True)
    ]
    return before, after


def _headline_blocks(ctx: StudyContext, rows: list[dict[str, Any]]) -> list[Block]:
    """The whole study at 1/255 and 4/255: one table and one bar figure."""
    views: dict[float, dict[str, list[Any]]] = {}
    for target in HEADLINE_EPS_255:
        e, entries = _glance(rows, target)
        views.setdefault(e, entries)
    first = next(iter(views.values()))
    if not first:
        return []
    names = list(first)
    header = ["entry", "family", "clean accuracy"]
    for e in views:
        header += [f"non-adaptive {e:g}/255", f"adaptive {e:g}/255"]
    none = [None] * 4
    body = [
        [name, first[name][0], fmt(first[name][1])]
        + [fmt(v.get(name, none)[k]) for v in views.values() for k in (2, 3)]
        for name in names
    ]
    from medsec.evaluation.figures import plot_headline

    path = ctx.figure_path("summary.png")
    plot_headline(
        path,
        names,
        [(e / 255, *_bars(v, names)) for e, v in views.items()],
    )
    caption = (
        "Attack success rate of each entry against the attack of its own paper (blue) and the "
        "informed attacker (red); detectors: misclassified AND not flagged; the signature "
        "gate: altered images that fool the victim AND are accepted, over every attack."
    )
    return [
        ("table", {"header": header, "rows": body}),
        ("figure", (str(path.relative_to(ctx.out)), caption)),
    ]


def build_blocks(
    ctx: StudyContext, rows: list[dict[str, Any]], record: dict[str, Any]
) -> list[Block]:
    data = ctx.data.summary()
    vm = ctx.victim_meta
    blocks: list[Block] = [
        ("h1", "medsec study report"),
        ("p", " ".join(_summary(ctx, rows))),
        *headline.blocks(headline.with_verdicts(ctx.headlines, rows, ctx.checks)),
        *_headline_blocks(ctx, rows),
        ("h2", "Setup"),
        (
            "p",
            f"Data: `{data['name']}` ({data['provenance'].get('kind', 'user data')}), "
            f"{data['size']}x{data['size']} px, {data['channels']} channel(s), "
            f"classes {data['classes']}, splits {data['n']}, "
            f"content hash {data['content_hash'][:16]}.",
        ),
        (
            "p",
            f"Victim: `{vm['arch']}`, trained with early stopping on "
            f"validation AUC (best epoch {vm['metrics']['best_epoch']}), "
            f"test accuracy {vm['metrics']['clean_accuracy']:.3f}, test AUC "
            f"{vm['metrics']['clean_auc']:.3f}; weights SHA-256 "
            f"{vm['sha256'][:16]}.",
        ),
        ("h3", "Threat model"),
        ("p", THREAT_MODEL),
    ]
    families = defaultdict(list)
    for r in rows:
        families[r["family"]].append(r)
    for fam in FAMILIES:
        if families.get(fam):
            blocks += _family_blocks(fam, families[fam], ctx)
    blocks.append(("h2", "Checks"))
    blocks.append(
        (
            "p",
            "Validity: can the evaluation of this entry be trusted (a failure makes its verdict "
            "inconclusive). Outcome: what the study found.",
        )
    )
    blocks.append(
        (
            "table",
            {
                "header": ["defence", "kind", "check", "result", "detail"],
                "rows": [[c.defence, c.kind, c.name, result(c), c.detail] for c in ctx.checks],
            },
        )
    )
    blocks.append(("h2", "Settings and environment"))
    env = record["environment"]
    blocks.append(
        (
            "p",
            f"Command: `{record['command']}`. Wall time of this invocation "
            f"{record['wall_time_s']:.1f} s (resumed cells are not recomputed; "
            f"{_stages(record)}). "
            f"Seed {record['seed']}. Profile: {json.dumps(record['profile'])}.",
        )
    )
    blocks.append(("p", "; ".join(f"{k} {v}" for k, v in env.items())))
    blocks.append(
        (
            "p",
            "Every row of metrics.json carries its attack settings (eps, steps, "
            "step size, restarts, loss, EOT samples).",
        )
    )
    return blocks


def write_report(ctx: StudyContext, rows: list[dict[str, Any]], record: dict[str, Any]) -> Path:
    """metrics.json, metrics.csv, report.md, report.html in ctx.out; returns report.md."""
    out = ctx.out
    vm = ctx.victim_meta
    metrics = {
        "dataset": ctx.data.summary(),
        "victim": {
            "arch": vm["arch"],
            "clean_accuracy": vm["metrics"]["clean_accuracy"],
            "clean_auc": vm["metrics"]["clean_auc"],
            "sha256": vm["sha256"],
            "training": {k: v for k, v in vm["metrics"].items() if k != "history"},
            "settings": vm.get("settings", {}),
        },
        "eps_unit": EPS_UNIT,
        "rows": rows,
        "checks": [asdict(c) for c in ctx.checks],
        "verdicts": [asdict(v) for v in verdicts(rows, ctx.checks)],
        "headline": headline.with_verdicts(ctx.headlines, rows, ctx.checks),
        "figures": [asdict(f) for f in ctx.figures],
        "notes": [asdict(n) for n in ctx.notes],
        **record,
    }
    atomic_write_json(out / "metrics.json", metrics)
    fields = [
        "defence",
        "family",
        "attack",
        "adaptive",
        "eps",
        "eps_255",
        "n",
        "clean_accuracy",
        "attack_success_rate",
        "ci_low",
        "ci_high",
        "detection_auc",
        "tpr_at_5fpr",
    ]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*fields, "settings"])
    for r in rows:
        writer.writerow([r.get(f) for f in fields] + [json.dumps(r.get("settings", {}))])
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    blocks = build_blocks(ctx, rows, record)
    atomic_write_text(out / "report.md", render_markdown(blocks))
    atomic_write_text(out / "report.html", render_html(blocks, out))
    return out / "report.md"
