"""The report builder: markdown and self-contained HTML from the same blocks, published atomically."""

from __future__ import annotations

import base64
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from probe_dpo import storage  # noqa: E402
from probe_dpo.report import Report, fmt, fmt_ci, md_table  # noqa: E402


def test_formatting_helpers():
    assert fmt(0.12345) == "0.123" and fmt(None) == "-" and fmt(math.nan) == "-" and fmt(True) == "yes"
    assert fmt_ci(0.15, 0.12, 0.18) == "0.150 [0.120, 0.180]"
    assert fmt_ci(0.15, None, 0.18) == "0.150"
    assert md_table(["a", "b|c"], [[1, "x|y"]]).splitlines() == ["| a | b|c |", "|---|---|", "| 1 | x\\|y |"]


def test_report_renders_and_publishes(storage_root):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    rep = (Report("Demo <run>").heading("Arms").text("**Bold** and `code`\n- one\n- two")
           .table(["arm", "rate"], [["dpo", 0.1234]], caption="rates").figure("curve", fig, "a line")
           .text("differences below 0.025 are noise", note=True))
    md = rep.markdown()
    assert md.startswith("# Demo <run>\n") and "| dpo | 0.123 |" in md
    assert "![a line](figures/curve.png)" in md and "> differences below" in md
    page = rep.html()
    assert "<strong>Bold</strong>" in page and "<code>code</code>" in page and "<li>one</li>" in page
    assert "&lt;run&gt;" in page and "<td>0.123</td>" in page
    png = rep.figures()["figures/curve.png"]
    assert png.startswith(b"\x89PNG") and base64.b64encode(png).decode() in page  # self-contained
    paths = rep.publish(storage.join(storage_root, "run"))
    assert storage.read_text(paths["markdown"]) == md
    assert storage.read_text(paths["html"]) == page
    assert storage.read_bytes(storage.join(storage_root, "run", "figures", "curve.png")) == png


def test_bad_figure_name():
    fig, _ = plt.subplots()
    with pytest.raises(ValueError):
        Report("x").figure("../escape", fig)
