"""The obfuscation map: where, as training pressure grows, training against a probe stops removing
the behaviour and starts hiding it.

Why a map and not a point: the Obfuscation Atlas (Taufeeque et al., 2026) finds honest, blatant and
obfuscated regions over KL strength x probe-penalty strength, and an arm's verdict at one setting says
little about the next. A map (``map`` in the experiment's config) sweeps one arm's dotted training keys
(``map.axes``: one or two, e.g. ``penalty.weight`` x ``dpo.beta``); every cell is a variant of the arm
(``arms.arm_of``: ``probe-dpo-penalty@penalty.weight=4,dpo.beta=0.1``) run at every seed through the
same Tune trials, evaluation, null bands and declared outcome rule as any arm: its label is the one an
arm at that setting would get.

Boundaries are resolved by refinement (``map.refine_rounds``): after the coarse grid, the midpoint of
every pair of neighbouring cells (along one axis, the other fixed) whose labels differ is run, round
after round, at most ``map.refine_cells`` per round. The plan declares the grid and this rule before
the first trial, so a refined cell is declared by rule: it joins the Holm family like a coarse one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Mapping, Sequence

from probe_dpo.config import to_dict
from probe_dpo.errors import UserError
from probe_dpo.workflows.experiment.arms import arm_of
from probe_dpo.workflows.experiment.config import MapSettings

REFINE_RULE = ("after the coarse grid, each round runs the midpoint (geometric between two positive values, "
               "else arithmetic; 4 significant digits) of every pair of cells that are neighbours along one "
               "axis (the other axis equal) and whose outcome labels differ, at most refine_cells a round, "
               "axis by axis in grid order; a round that finds none ends the refinement")


def map_plan(settings: MapSettings) -> dict:
    """What the analysis plan declares about a map: the family, the coarse cells and the refinement rule."""
    return {**to_dict(settings), "coarse": settings.cells(), "refine_rule": REFINE_RULE}


def cell_point(plan_map: Mapping[str, Any], name: str) -> tuple[Any, ...] | None:
    """A cell's point on the map's axes; None for an arm that is not a cell of this map (another
    arm, another family, other keys, a number outside its axis' range or a name not on its axis:
    not declared by the rule)."""
    try:
        arm = arm_of(name)
    except UserError:
        return None
    keys = dict(arm.variant)
    axes = plan_map["axes"]
    if arm.family != plan_map["family"] or set(keys) != set(axes):
        return None
    point = []
    for axis, values in axes.items():
        value = keys[axis]
        if not _numeric(values):  # a category: one of its names
            if value not in values:
                return None
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not min(values) <= value <= max(values):
            return None
        point.append(float(value) if _numeric(values) else value)
    return tuple(point)


def _numeric(values: Sequence[Any]) -> bool:
    """An axis of numbers (refined, drawn on a scale), not of names (a category)."""
    return isinstance(values[0], float)


def _rank(values: Sequence[Any], value: Any) -> Any:
    """Where a value sits on its axis: a number by itself, a name by its declared place."""
    return value if _numeric(values) else values.index(value)


def _disagreeing_neighbours(labels: Mapping[tuple, str], axes: Mapping[str, list]) -> list[tuple[int, tuple, tuple]]:
    """``(axis index, lower point, upper point)`` of every two cells next to each other along one axis
    (the other axes equal) whose labels differ: axis by axis, in grid order (the axes' declared order)."""
    out = []
    for i, values in enumerate(axes.values()):
        lines: dict[tuple, list[tuple]] = defaultdict(list)
        for p in labels:
            lines[tuple(_rank(on, x) for j, (on, x) in enumerate(zip(axes.values(), p)) if j != i)].append(p)
        for _, line in sorted(lines.items()):
            line.sort(key=lambda p: _rank(values, p[i]))
            out += [(i, lo, hi) for lo, hi in zip(line, line[1:]) if labels[lo] != labels[hi]]
    return out


def midpoint(a: float, b: float) -> float:
    """Between two values of an axis: geometric when both are positive (the axes are usually log
    scales, a penalty of 1 and 4 meet at 2), else arithmetic; to the 4 digits a cell's name keeps."""
    middle = math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2
    return float(f"{middle:.4g}")


def refine(settings: MapSettings, labels: Mapping[str, str]) -> list[str]:
    """The next round's cells: midpoints between labelled neighbours whose labels differ (see REFINE_RULE)."""
    plan_map = {"family": settings.family, "axes": settings.axes}
    points = {p: lab for name, lab in labels.items() if (p := cell_point(plan_map, name)) is not None}
    axes = list(settings.axes)
    new: list[tuple[Any, ...]] = []
    for i, lo, hi in _disagreeing_neighbours(points, settings.axes):
        if not settings.numeric(axes[i]):  # no value lies between two names
            continue
        m = midpoint(lo[i], hi[i])
        candidate = lo[:i] + (m,) + lo[i + 1:]
        if m not in (lo[i], hi[i]) and candidate not in points and candidate not in new:
            new.append(candidate)
    return [settings.cell(p) for p in new[:settings.refine_cells]]


def phase_map(plan_map: Mapping[str, Any], arms: Mapping[str, Mapping[str, Any]],
              first_warnings: Mapping[str, Sequence[int | str | None]]) -> dict:
    """results.json's ``map``: every cell's point, stage (coarse or refined), label, the coordinates that
    decide labels (estimate and 95% interval), the train probe's TPR change at the base threshold (fixed
    texts; held-out and retrained probes beside it), and the step the early warning first fired at in
    each seed (None: on, never fired; "off"); ``boundaries``: neighbouring cells whose labels differ;
    ``early_warning``: the warning against the cells' labels (``warning_against_labels``)."""
    coarse = set(plan_map["coarse"])
    cells = []
    for name, arm in arms.items():
        point = cell_point(plan_map, name)
        if point is None:
            continue
        outcome = arm.get("outcome") or {}
        fixed = arm.get("fixed") or {}
        cells.append({
            "arm": name, "point": dict(zip(plan_map["axes"], point)),
            "stage": "coarse" if name in coarse else "refined", "seeds": arm.get("seeds"),
            "label": outcome.get("label", "exploratory (not in the plan)"),
            "coordinates": {c: {k: r.get(k) for k in ("estimate", "ci_low", "ci_high", "status")}
                            for c, r in (outcome.get("coordinates") or {}).items()},
            "tpr_change": {role: (fixed.get(role) or {}).get("tpr", {}).get("delta")
                           for role in ("train", "held_out", "retrained")},
            "early_warning_step": list(first_warnings.get(name) or [])})
    cells.sort(key=lambda c: tuple(_rank(plan_map["axes"][a], v) for a, v in c["point"].items()))
    return {"family": plan_map["family"], "axes": list(plan_map["axes"]), "cells": cells,
            "boundaries": _boundaries(cells, plan_map["axes"]), "early_warning": warning_against_labels(cells)}


def warning_against_labels(cells: Sequence[Mapping[str, Any]]) -> dict:
    """How the early warning (read during training) did against the labels (read after it), over the
    seeds where it was on: fired in a cell labelled obfuscated (a hit: it fires before the evaluation
    shows the drop, since it fires during training), fired in a cell labelled removed or blatant (a
    false alarm), silent in an obfuscated cell (a miss). Seeds of other labels (undetermined) count apart."""
    out = {"seeds_on": 0, "hits": 0, "misses": 0, "false_alarms": 0, "quiet": 0, "other_labels": 0}
    for cell in cells:
        for step in cell["early_warning_step"]:
            if step == "off":
                continue
            out["seeds_on"] += 1
            fired = step is not None
            if cell["label"].startswith("obfuscated"):
                out["hits" if fired else "misses"] += 1
            elif cell["label"] in ("removed", "blatant"):
                out["false_alarms" if fired else "quiet"] += 1
            else:
                out["other_labels"] += 1
    on_clean = out["false_alarms"] + out["quiet"]
    out["false_alarm_rate"] = out["false_alarms"] / on_clean if on_clean else None
    out["hit_rate"] = out["hits"] / (out["hits"] + out["misses"]) if out["hits"] + out["misses"] else None
    return out


def _boundaries(cells: list[dict], axes_values: Mapping[str, list]) -> list[dict]:
    """Neighbouring cells (along one axis, the others equal) with different labels: where a boundary
    lies, between the two points (its uncertainty is their distance)."""
    at = {tuple(c["point"].values()): c for c in cells}
    axes = list(axes_values)
    return [{"axis": axes[i], "between": [at[lo]["arm"], at[hi]["arm"]], "labels": [at[lo]["label"], at[hi]["label"]]}
            for i, lo, hi in _disagreeing_neighbours({p: c["label"] for p, c in at.items()}, axes_values)]
