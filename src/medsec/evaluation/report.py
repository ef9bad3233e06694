"""Write the study's outputs: metrics.json (the contract), metrics.csv, report.md and a
self-contained report.html (figures embedded). Both reports render one list of blocks."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medsec.evaluation.context import EPS_UNIT, StudyContext
from medsec.utils import atomic_write_json, atomic_write_text

Block = tuple[str, Any]  # ("h1"|"h2"|"h3"|"p"|"table"|"figure"|"pre", payload)

FAMILY_TITLES = {
    "none": "Undefended victim",
    "detection": "Detection defences",
    "robustification": "Robustification defences",
    "integrity": "Signature gate (the remedy)",
}
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


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _pivot(rows: list[dict[str, Any]], value: str) -> dict[str, Any]:
    """Rows (attack, adaptive) x columns eps/255 of one value."""
    eps = sorted({r["eps_255"] for r in rows})
    table: dict[tuple[str, bool], dict[float, Any]] = defaultdict(dict)
    for r in rows:
        table[(r["attack"], r["adaptive"])][r["eps_255"]] = r.get(value)
    header = ["attack", "adaptive", *[f"{e:g}/255" for e in eps]]
    body = [
        [a, "yes" if ad else "no", *[_fmt(cells.get(e)) for e in eps]]
        for (a, ad), cells in table.items()
    ]
    return {"header": header, "rows": body}


def _family_blocks(family: str, rows: list[dict[str, Any]], ctx: StudyContext) -> list[Block]:
    blocks: list[Block] = [("h2", FAMILY_TITLES.get(family, family))]
    by_def: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_def[r["defence"]].append(r)
    notes = ctx.notes.get(family, [])
    figures = [f for f in ctx.figures if f.section == family]

    def owner(text: str) -> str | None:
        """The defence a note or caption is about ('name: ...' / 'name (...'), if any."""
        return next((n for n in by_def if text.startswith((f"{n}:", f"{n} ("))), None)

    blocks += [("p", t) for t in notes if owner(t) is None]
    for name, drows in by_def.items():
        blocks.append(
            (
                "h3",
                f"{name}: clean accuracy {drows[0]['clean_accuracy']:.3f}, "
                f"n = {drows[0]['n']} attacked images",
            )
        )
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
                    _fmt(r.get("rejection_rate")),
                    _fmt(r["attack_success_rate"]),
                    _fmt(r.get("false_rejection_rate")),
                ]
                for r in drows
            ]
            blocks.append(("table", {"header": header, "rows": body}))
            continue
        blocks.append(
            (
                "p",
                "Attack success rate (ASR)"
                + (
                    " under the joint criterion: misclassified AND not flagged."
                    if family == "detection"
                    else "."
                ),
            )
        )
        blocks.append(("table", _pivot(drows, "attack_success_rate")))
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
        blocks += [("figure", (f.path, f.caption)) for f in figures if owner(f.caption) == name]
        blocks += [("p", t) for t in notes if owner(t) == name]
    blocks += [("figure", (f.path, f.caption)) for f in figures if owner(f.caption) is None]
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
    gate = [c for c in ctx.checks if c.defence == "signature-gate"]
    lines += [f"{c.check}: {'PASS' if c.passed else 'FAIL'} ({c.detail})." for c in gate]
    passed = sum(c.passed for c in ctx.checks)
    lines.append(f"Sanity checks: {passed}/{len(ctx.checks)} passed.")
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
        [name, first[name][0], _fmt(first[name][1])]
        + [_fmt(v.get(name, none)[k]) for v in views.values() for k in (2, 3)]
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
    for fam in ("none", "detection", "robustification", "integrity"):
        if families.get(fam):
            blocks += _family_blocks(fam, families[fam], ctx)
    blocks.append(("h2", "Sanity checks"))
    blocks.append(
        (
            "table",
            {
                "header": ["defence", "check", "result", "detail"],
                "rows": [
                    [c.defence, c.check, "PASS" if c.passed else "FAIL", c.detail]
                    for c in ctx.checks
                ],
            },
        )
    )
    blocks.append(("h2", "Settings and environment"))
    env = record["environment"]
    blocks.append(
        (
            "p",
            f"Command: `{record['command']}`. Wall time of this invocation "
            f"{record['wall_time_s']:.1f} s (resumed cells are not recomputed). "
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


def _md_table(t: dict[str, Any]) -> str:
    head = "| " + " | ".join(t["header"]) + " |"
    sep = "|" + "|".join("---" for _ in t["header"]) + "|"
    body = ["| " + " | ".join(str(c) for c in r) + " |" for r in t["rows"]]
    return "\n".join([head, sep, *body])


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + payload)
        elif kind == "p":
            out.append(payload)
        elif kind == "table":
            out.append(_md_table(payload))
        elif kind == "figure":
            path, caption = payload
            out.append(f"![{caption}]({path})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block], out: Path) -> str:
    body = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline_code(payload)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_code(payload)}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in payload["header"])
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<td class='{'fail' if c == 'FAIL' else 'pass' if c == 'PASS' else ''}'>"
                    f"{html.escape(str(c))}</td>"
                    for c in r
                )
                + "</tr>"
                for r in payload["rows"]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "figure":
            path, caption = payload
            data = base64.b64encode((out / path).read_bytes()).decode()
            body.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='"
                f"{html.escape(caption)}'><figcaption>{html.escape(caption)}"
                "</figcaption></figure>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em;line-height:1.45}table{border-collapse:collapse;margin:.6em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}"
        "td.pass{color:#176f2c;font-weight:600}td.fail{color:#b00020;font-weight:600}"
        "img{max-width:100%}figcaption{font-size:13px;color:#444}"
        "code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>medsec study report"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


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
        "sanity": [asdict(c) for c in ctx.checks],
        "figures": [asdict(f) for f in ctx.figures],
        "notes": ctx.notes,
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
