"""The report's obfuscation map: a phase diagram of outcome labels over training pressure, and its table.

Why a picture: a reader choosing a penalty wants to see where the labels change, not read a list;
the table beside it carries the numbers (the decisive coordinates with their intervals, the TPR
changes, the early warning's first step) a colour cannot."""

from __future__ import annotations

import math
from typing import Any, Mapping

from probe_dpo.report import Report, fmt

COLOURS = {"removed": "#2a9d8f", "blatant": "#adb5bd", "obfuscated activations": "#e76f51",
           "obfuscated policy": "#9d0208", "undetermined": "#e9c46a"}


def map_section(rep: Report, phase: Mapping[str, Any]) -> None:
    """Add the map's heading, phase diagram, boundaries and table to ``rep``."""
    cells, axes = phase["cells"], phase["axes"]
    rep.heading(f"Obfuscation map: {phase['family']} over {' x '.join(axes)}")
    if not cells:
        rep.text("No cell of the map is complete yet.", note=True)
        return
    rep.figure("obfuscation_map", _phase_plot(cells, axes, phase["boundaries"]),
               "Each cell's outcome label by the declared rule (its seeds pooled); squares: the coarse grid, "
               "diamonds: cells added by refinement where neighbours' labels differ; a dashed segment joins "
               "neighbours with different labels: a boundary lies somewhere on it.")
    bounds = phase["boundaries"]
    rep.text("Boundaries (neighbours with different labels; the boundary lies between them): "
             + ("; ".join(f"{b['between'][0].split('@')[1]} ({b['labels'][0]}) | {b['between'][1].split('@')[1]} "
                          f"({b['labels'][1]})" for b in bounds) if bounds else "none: every cell has one label")
             + ".")
    judges = sorted({c for cell in cells for c in cell["coordinates"] if c.startswith("toxicity:")})
    rows = []
    for cell in cells:
        co = cell["coordinates"]
        shown = [_coordinate(co.get(name), name) for name in ["text", "activations", *judges]]
        warn = [s for s in cell["early_warning_step"] if s not in (None, "off")]
        rows.append([", ".join(f"{k}={_shown(v)}" for k, v in cell["point"].items()), cell["stage"], cell["seeds"],
                     f"**{cell['label']}**", *shown,
                     *(fmt(cell["tpr_change"].get(r), 2) for r in ("train", "held_out", "retrained")),
                     ", ".join(map(str, warn)) or "-"])
    ew = phase.get("early_warning") or {}
    if ew.get("seeds_on"):
        rate = "-" if ew["false_alarm_rate"] is None else f"{ew['false_alarm_rate']:.2f}"
        rep.text(f"Early warning against the labels ({ew['seeds_on']} seeds with it on): fired before an obfuscated "
                 f"label {ew['hits']} times, silent in an obfuscated cell {ew['misses']} times, fired in a removed or "
                 f"blatant cell {ew['false_alarms']} times (false-alarm rate {rate}).")
    rep.table(["cell", "stage", "seeds", "label", "text", "activations", *(j.replace("toxicity:", "rate, ")
                                                                             for j in judges),
               "TPR change, train", "held-out", "retrained", "early warning (step)"], rows,
              caption="Coordinates: estimate [95% CI over seeds and prompts] (rates relative to the base). TPR "
                      "changes at the base threshold on fixed texts. Early warning: the step it first fired in each "
                      "seed where it was on and fired.")


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _coordinate(row: Mapping[str, Any] | None, name: str) -> str:
    if not row or any(row.get(k) is None or math.isnan(row[k]) for k in ("estimate", "ci_low", "ci_high")):
        return "-"
    scale, unit = (100, "%") if name.startswith("toxicity:") else (1, "")
    digits = 0 if unit else 3
    return (f"{scale * row['estimate']:+.{digits}f}{unit} [{scale * row['ci_low']:+.{digits}f}, "
            f"{scale * row['ci_high']:+.{digits}f}]")


def _phase_plot(cells, axes, boundaries):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    y_axis = axes[1] if len(axes) > 1 else None
    # a category (names) is drawn at positions 0, 1, ... in the order its cells come (the declared order)
    names = {a: list(dict.fromkeys(c["point"][a] for c in cells)) for a in filter(None, (axes[0], y_axis))
             if not isinstance(cells[0]["point"][a], float)}

    def position(cell, axis):
        return 0 if axis is None else names[axis].index(cell["point"][axis]) if axis in names else cell["point"][axis]

    at = {c["arm"]: (position(c, axes[0]), position(c, y_axis)) for c in cells}
    for b in boundaries:
        (x0, y0), (x1, y1) = at[b["between"][0]], at[b["between"][1]]
        ax.plot([x0, x1], [y0, y1], ls="--", color="black", lw=1, zorder=0)
    for label in dict.fromkeys(c["label"] for c in cells):
        for stage, marker in (("coarse", "s"), ("refined", "D")):
            chosen = [c for c in cells if c["label"] == label and c["stage"] == stage]
            if chosen:
                ax.scatter([at[c["arm"]][0] for c in chosen], [at[c["arm"]][1] for c in chosen], s=260, marker=marker,
                           color=COLOURS.get(label, "#6c757d"), edgecolor="black",
                           label=label if stage == "coarse" or not any(
                               c["label"] == label and c["stage"] == "coarse" for c in cells) else None)
    for axis, name, set_scale, set_ticks in ((ax.xaxis, axes[0], ax.set_xscale, ax.set_xticks),
                                             (ax.yaxis, y_axis, ax.set_yscale, ax.set_yticks)):
        if name is None:
            set_ticks([])
            continue
        if name in names:
            set_ticks(range(len(names[name])), [str(v) for v in names[name]])
            axis.set_label_text(name)
            continue
        values = sorted({c["point"][name] for c in cells})  # the axes are usually log scales, 0 included
        if values[0] > 0:
            set_scale("log")
        else:
            set_scale("symlog", linthresh=min([v for v in values if v > 0] or [1.0]))
        set_ticks(values, [f"{v:g}" for v in values], minor=False)
        set_ticks([], minor=True)
        axis.set_label_text(name)
    ax.legend(fontsize=8, loc="best")
    ax.margins(0.15)
    return fig
