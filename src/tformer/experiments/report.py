"""One self-contained HTML page for `tformer experiment all`: every experiment's claim, notes, tables and
plots (embedded as base64 PNG, so the file can be mailed or opened offline)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from tformer.experiments.common import Result, Table, machine

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}section{margin-bottom:3em}
.claim{font-style:italic}li{margin:.2em 0}"""


def _cell(v: object) -> str:
    return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))


def section(result: Result, directory: Path) -> str:
    parts = [f'<section id="{html.escape(result.name)}"><h2>{html.escape(result.name)} ({result.size})</h2>']
    parts.append(f'<p class="claim">{html.escape(result.claim)}</p><ul>')
    parts += [f"<li>{html.escape(n)}</li>" for n in result.notes]
    parts.append(f"<li>{result.seconds:.0f} s</li></ul>")
    for table in result.tables:
        parts.append(f"<h3>{html.escape(table.title)}</h3><table><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in table.columns]
        parts.append("</tr>")
        for row in table.rows:
            parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    for name in result.plots:
        data = base64.b64encode((directory / name).read_bytes()).decode("ascii")
        parts.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>')
    parts.append("</section>")
    return "\n".join(parts)


def write_report(out: Path, results: list[Result]) -> Path:
    """out/report.html from the results, whose plots lie in out/NAME/."""
    toc = " | ".join(f'<a href="#{html.escape(r.name)}">{html.escape(r.name)}</a>' for r in results)
    body = "\n".join(section(r, out / r.name) for r in results)
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>tformer experiments</title>'
        f"<style>{STYLE}</style></head><body><h1>tformer: the literature's claims, measured</h1>"
        f"<p>Machine: {html.escape(machine())}.</p><p>{toc}</p>{body}</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def load_result(directory: Path) -> Result:
    """A Result back from the result.json an experiment wrote (to build a report from separate runs)."""
    data = json.loads((directory / "result.json").read_text())
    return Result(
        name=data["name"],
        claim=data["claim"],
        size=data["size"],
        numbers=data["numbers"],
        tables=[Table(t["title"], t["columns"], t["rows"]) for t in data["tables"]],
        plots=data["plots"],
        notes=data["notes"],
        seconds=data["seconds"],
    )
