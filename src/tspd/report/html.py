"""A single static HTML page (figures embedded as data URIs), readable offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from tspd.decomposition import atomic_write_bytes

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.ok{color:#187a18;font-weight:600}
.fail{color:#b00020;font-weight:600}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}p.note{color:#555;font-size:.9em}
"""


def esc(x) -> str:
    return html.escape(str(x))


def fmt(x, digits: int = 4) -> str:
    if isinstance(x, bool):
        return '<span class="ok">pass</span>' if x else '<span class="fail">FAIL</span>'
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}g}"
    if x is None:
        return "–"
    return esc(x)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(path: str | Path, alt: str = "") -> str:
    path = Path(path)
    if not path.exists():
        return f'<p class="note">(figure {esc(path.name)} missing)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{esc(alt or path.stem)}" src="data:image/png;base64,{data}">'


def write_page(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """sections: (heading, inner HTML). Written atomically."""
    body = "".join(f"<h2>{esc(h)}</h2>{inner}" for h, inner in sections)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>"
    )
    path = Path(path)
    atomic_write_bytes(path, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return path
