"""Cross-fitting: a probe never scores rows of a prompt it was fitted on (k folds over prompts).

Why: a probe scoring the very rows it was fitted on ranks them by the labels it memorised, so
a probe-ranked preference pair would be a judge-ranked pair by construction.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
import torch

from probe_dpo.errors import UserError
from probe_dpo.probes.fit import fit_probe
from probe_dpo.probes.probe import LinearProbe
from probe_dpo.stats import as_numpy as _np


def group_folds(groups: Sequence[Any], k: int, seed: int) -> np.ndarray:
    """A fold id in ``[0, k)`` per row, with every row of a group (prompt) in the same fold and
    the groups dealt round-robin after a seeded shuffle (folds differ in size by at most one group)."""
    unique = sorted(set(map(str, groups)))
    random.Random(seed).shuffle(unique)
    fold_of = {g: i % k for i, g in enumerate(unique)}
    return np.array([fold_of[str(g)] for g in groups], dtype=np.int64)


def cross_fit_scores(feats: dict[int, torch.Tensor], labels: np.ndarray, groups: Sequence[Any],
                     probes: Sequence["LinearProbe"], *, folds: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Each probe's probability on every row from a probe that never saw the row's prompt.

    The rows' prompts are dealt into ``folds`` folds (``group_folds``); for each fold, each
    probe's layer is refitted, with the probe's own C, on the rows of the other folds, and
    scores the fold's rows. Probes that share a layer and C (members of one ensemble that
    differ only by their data) share the refit. Why: a probe scoring the very rows it was
    fitted on ranks them by the labels it memorised, so a probe-ranked pair would be a
    judge-ranked pair by construction.
    """
    fold = group_folds(groups, folds, seed)
    y = np.asarray(labels)
    refits: dict[tuple[int, float], np.ndarray] = {}
    out = {}
    for probe in probes:
        key = (probe.layer, float(probe.card.get("c", 1.0)))
        if key not in refits:
            x = feats[probe.layer]
            scores = np.zeros(len(y))
            for f in range(folds):
                inside, outside = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
                if not len(inside):
                    continue
                if len(set(y[outside].tolist())) < 2:
                    raise UserError(f"cross-fitting: the prompts outside fold {f} have a single class; "
                                    "use fewer folds or more data")
                res = fit_probe(x[torch.as_tensor(outside)], y[outside], x[torch.as_tensor(inside)], y[inside],
                                [key[1]])
                with torch.no_grad():
                    scores[inside] = _np(LinearProbe.from_fit(res, layer=probe.layer).prob(
                        x[torch.as_tensor(inside)]))
            refits[key] = scores
        out[probe.name] = refits[key]
    return out
