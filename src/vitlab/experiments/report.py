"""`vitlab report`: one self-contained HTML page (no external files: images are embedded as base64 PNG)
with the collect table and every figure the runs give."""
from __future__ import annotations

import base64
import datetime
import html
import io

from matplotlib.figure import Figure

from .collect import is_number, table
from .runs import Run

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.num{text-align:right}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:13px;color:#555}"""


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if is_number(c) else ""}">{html.escape(c)}</td>' for c in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_report(runs: list[Run], figures: dict[str, Figure], title: str = "vitlab report") -> str:
    header, rows = table(runs)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} runs, {sum(r.finished for r in runs)} finished; generated "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by <code>vitlab report</code>.</p>",
             "<h2>Runs</h2>", html_table(header, rows), "<h2>Figures</h2>"]
    for stem, fig in figures.items():
        parts.append(f"<figure><img alt='{html.escape(stem)}' src='{png_data_uri(fig)}'>"
                     f"<figcaption>{html.escape(stem)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
