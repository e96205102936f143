"""Reports a person would rather look at than read: markdown + one self-contained HTML page.

A ``Report`` collects blocks in order (headings, paragraphs, tables, matplotlib figures) and
renders them twice: ``report.md`` (figures as linked PNG files next to it) and
``report.html`` (the same content, figures inlined as base64, so the file can be mailed or
opened from object storage without its folder). ``publish(uri)`` writes the PNGs first and
the two documents last, each atomically through ``probe_dpo.storage``: a reader sees the
previous report or the new one, never a half-written page. Workflows rebuild and republish
their report as results come in.

The workflow-specific reports are built from these blocks by their own modules
(``probe_dpo.report.experiment``; the attribution study's in its workflow), from data the
workflow hands them: a report never reads a run folder's layout.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.45}
h1{border-bottom:2px solid #d0d7e2;padding-bottom:.2em}h2{margin-top:1.6em;color:#243b6b}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #d0d7e2;padding:.3em .6em;
text-align:right}th{background:#eef2f8}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#f8fafc}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%}code{background:#f1f3f6;padding:0 .25em;border-radius:3px}.note{color:#8a4b00}
"""


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: fixed digits, '-' for missing or NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(value: Any, lo: Any = None, hi: Any = None, digits: int = 3) -> str:
    """``0.153 [0.128, 0.180]`` (the interval only when both ends are known)."""
    if lo is None or hi is None or fmt(lo) == "-" or fmt(hi) == "-":
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells are formatted with ``fmt`` unless they are strings already."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """Ordered blocks rendered to markdown and to self-contained HTML."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> "Report":
        self.blocks.append(("heading", text))
        return self

    def text(self, markdown: str, note: bool = False) -> "Report":
        """A paragraph (light markdown: **bold**, `code`, [links](url), lists with '- ')."""
        self.blocks.append(("text", markdown.strip(), note))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> "Report":
        self.blocks.append(("table", list(headers), [list(r) for r in rows], caption))
        return self

    def figure(self, name: str, fig: Any, caption: str = "") -> "Report":
        """A matplotlib figure, stored as ``figures/<name>.png`` (the figure is closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-', '.'")
        self.blocks.append(("figure", name, buf.getvalue(), caption))
        return self

    # --- rendering ---------------------------------------------------------------------------

    def figures(self) -> dict[str, bytes]:
        return {f"figures/{b[1]}.png": b[2] for b in self.blocks if b[0] == "figure"}

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += [f"## {block[1]}", ""]
            elif kind == "text":
                out += [("> " + block[1].replace("\n", "\n> ")) if block[2] else block[1], ""]
            elif kind == "table":
                if block[3]:
                    out += [f"*{block[3]}*", ""]
                out += [md_table(block[1], block[2]), ""]
            else:
                out += [f"![{block[3] or block[1]}](figures/{block[1]}.png)", ""]
                if block[3]:
                    out += [f"*{block[3]}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        out = ["<!doctype html><html><head><meta charset='utf-8'>",
               f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out.append(f"<h2>{html.escape(block[1])}</h2>")
            elif kind == "text":
                body = _markdown(block[1])
                out.append(f"<div class='note'>{body}</div>" if block[2] else body)
            elif kind == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{_inline(v if isinstance(v, str) else fmt(v))}</td>"
                                                for v in row) + "</tr>" for row in block[2])
                cap = f"<caption>{_inline(block[3])}</caption>" if block[3] else ""
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode(block[2]).decode()
                out.append(f"<figure><img alt='{html.escape(block[3] or block[1])}' "
                           f"src='data:image/png;base64,{data}'><figcaption>{_inline(block[3])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def publish(self, uri: str, name: str = "report") -> dict[str, str]:
        """Write the figures, then ``<name>.md`` and ``<name>.html`` (each atomically) under ``uri``."""
        from probe_dpo import storage

        for rel, data in self.figures().items():
            storage.write_bytes(storage.join(uri, rel), data)
        md, page = storage.join(uri, f"{name}.md"), storage.join(uri, f"{name}.html")
        storage.write_text(md, self.markdown())
        storage.write_text(page, self.html())
        return {"markdown": md, "html": page}


def _markdown(text: str) -> str:
    """Markdown to HTML with the ``markdown`` package (a list may follow its lead-in line
    directly, as in the reports' text: Python-Markdown wants a blank line before it)."""
    import markdown

    return markdown.markdown(re.sub(r"(?m)^(?!- )(.+)\n(?=- )", r"\1\n\n", text), output_format="html")


def _inline(text: str) -> str:
    """A table cell's markdown, without the paragraph around it."""
    out = _markdown(str(text))
    return out[3:-4] if out.startswith("<p>") and out.endswith("</p>") else out
