"""A small HTML page builder: headings, escaped text, tables and plotly figures.

Every piece of user text goes through `html.escape`. plotly.js is embedded once by default
so the report opens offline; `plotlyjs="cdn"` makes a small file that needs a network.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mechlora.io import atomic_write_text

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:.9em}
"""


@dataclass
class Page:
    title: str
    parts: list[str] = field(default_factory=list)
    _n_figures: int = 0

    def heading(self, text: str) -> Page:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str, *, note: bool = False) -> Page:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def pre(self, text: str) -> Page:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Page:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row)
                       + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")
        return self

    def figure(self, fig) -> Page:
        self.parts.append(("FIGURE", fig))  # rendered in write(), where plotly.js is placed
        return self

    def write(self, path: str | Path, plotlyjs: str = "embed") -> Path:
        body, first = [], True
        for part in self.parts:
            if isinstance(part, tuple):
                include = ("cdn" if plotlyjs == "cdn" else True) if first else False
                body.append(part[1].to_html(full_html=False, include_plotlyjs=include))
                first = False
            else:
                body.append(part)
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
               f"</title><style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
               + "\n".join(body) + "</body></html>")
        atomic_write_text(path, doc)
        return Path(path)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "" if value is None else str(value)
