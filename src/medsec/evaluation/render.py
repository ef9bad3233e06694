"""Render the report's blocks as Markdown and as self-contained HTML (figures embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

Block = tuple[str, Any]  # ("h1"|"h2"|"h3"|"p"|"table"|"figure"|"pre", payload)


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
