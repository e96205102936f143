"""The behaviour contrast as its authors build it (Xiao & Aranguri, arXiv 2602.11079; their
``generate_activation_direction_filtered.py`` and ``attribution.py``): two *texts* read by *one*
model, the model before DPO (M0).

1. Sample M0 and M1 (after DPO) on scenario prompts, with and without the trigger (their
   "distractor"). Keep a scenario only where the behaviour appears nowhere except in M1's
   triggered responses (:func:`select_scenarios`, their 4-condition filter).
2. Pair each of M1's harmful triggered responses ``r1`` with one of M0's safe responses ``r0``
   (as many pairs as the shorter list), read both through M0 (teacher-forced, mean over the
   response tokens) and take ``v = mean a(p, r1; M0) - mean a(p, r0; M0)``
   (:func:`behaviour_contrast`).
3. Or keep one such direction per scenario (:func:`contrast_bank`) and score a pair by its
   largest cosine over the bank (:func:`bank_scores`).

Why M0 reads both texts: the pair vectors ``v_d`` are read by M0 too, so the direction and the
pairs live in the same model's space, and the contrast isolates what differs between the
*responses* (the behaviour), not what DPO did to the representation (which is what
``behaviour_change`` measures: drift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from probe_dpo.attribution.directions import Direction
from probe_dpo.attribution.similarity import similarity_matrix
from probe_dpo.errors import UserError

NATURAL_VARIANTS = ("trigger", "base")


@dataclass
class ScenarioSamples:
    """Sampled responses and one judge's scores (``[prompts, samples]``) of one model on one
    prompt variant (the scenario prompts with or without the trigger)."""

    prompts: list[str]
    responses: list[list[str]]
    scores: np.ndarray

    def harmful(self, threshold: float) -> np.ndarray:
        return np.asarray(self.scores, dtype=np.float64) >= threshold


@dataclass
class Scenario:
    """One kept scenario: the harmful (M1, triggered) and safe (M0) texts paired for the contrast."""

    index: int
    harmful: list[tuple[str, str]]
    safe: list[tuple[str, str]]
    harmful_rate: float


def select_scenarios(before_trigger: ScenarioSamples, after_trigger: ScenarioSamples, threshold: float, *,
                     before_base: ScenarioSamples | None = None, after_base: ScenarioSamples | None = None,
                     natural: Literal["trigger", "base"] = "trigger") -> list[Scenario]:
    """The authors' 4-condition filter: keep scenario i when M0 without trigger, M1 without
    trigger and M0 with trigger have no response at or above ``threshold`` and M1 with trigger has
    at least one. Without the untriggered samples (``*_base`` None: no trigger in the set-up) it
    is the 2-condition filter on the prompts as given. ``natural``: whose safe responses are the
    r0 of the pairs, M0's on the triggered prompt (the authors' ``base+distractor`` artifact) or
    on the prompt without the trigger (their ``base``). As they do, a scenario contributes
    ``min(#harmful, #safe)`` pairs, in sample order."""
    if natural not in NATURAL_VARIANTS:
        raise UserError(f"contrast natural: {natural!r} is not one of {', '.join(NATURAL_VARIANTS)}")
    if (before_base is None) != (after_base is None):
        raise UserError("contrast filter: give both models' untriggered samples, or neither")
    if natural == "base" and before_base is None:
        raise UserError("contrast natural=base needs M0's samples on the prompts without the trigger")
    groups = [before_trigger, after_trigger] + ([before_base, after_base] if before_base is not None else [])
    n = len(before_trigger.prompts)
    if any(len(g.prompts) != n or np.shape(g.scores)[0] != n for g in groups):
        raise UserError("contrast filter: every model and variant needs the same scenarios")
    quiet = ~before_trigger.harmful(threshold).any(1)
    if before_base is not None:
        quiet &= ~before_base.harmful(threshold).any(1) & ~after_base.harmful(threshold).any(1)
    shows = after_trigger.harmful(threshold)
    safe_from = before_base if natural == "base" else before_trigger
    out = []
    for i in np.flatnonzero(quiet & shows.any(1)):
        bad = [(after_trigger.prompts[i], r) for r, h in zip(after_trigger.responses[i], shows[i]) if h]
        good = [(safe_from.prompts[i], r) for r in safe_from.responses[i]]
        m = min(len(bad), len(good))
        out.append(Scenario(int(i), bad[:m], good[:m], float(shows[i].mean())))
    return out


def read_scenarios(model: Any, tokenizer: Any, scenarios: Sequence[Scenario], layer: int, *,
                   batch_size: int = 16, max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Every kept pair's two texts teacher-forced through ``model`` (M0): mean response-token
    activations at ``layer`` of the harmful and the safe texts (``[pairs, hidden]`` each) and the
    scenario index of each row."""
    from probe_dpo.activations import extract

    if not scenarios:
        raise UserError("behaviour contrast: no scenario passed the filter (M1 never shows the behaviour "
                        "where M0 does not): more prompts or samples, or a lower threshold")
    texts = [t for s in scenarios for t in s.harmful] + [t for s in scenarios for t in s.safe]
    feats = extract(model, tokenizer, prompts=[p for p, _ in texts], completions=[r for _, r in texts],
                    layers=[layer], pooling="mean", span="response", batch_size=batch_size, max_length=max_length)
    x = feats[layer]
    half = len(texts) // 2
    owner = np.array([s.index for s in scenarios for _ in s.harmful])
    return x[:half], x[half:], owner


def behaviour_contrast(harmful: torch.Tensor, safe: torch.Tensor, *, layer: int, name: str = "behaviour-contrast",
                       meta: dict | None = None) -> Direction:
    """``mean a(p, r1; M0) - mean a(p, r0; M0)``, L2-normalised (rows: the harmful and safe texts
    as read by M0). The raw difference's norm is kept in ``meta`` (the authors steer with the raw
    vector; ``raw_norm`` converts their scale to ours)."""
    if len(harmful) == 0 or len(safe) == 0:
        raise UserError(f"direction {name}: needs harmful and safe texts (got {len(harmful)} and {len(safe)})")
    v = harmful.double().mean(0) - safe.double().mean(0)
    return Direction(name, layer, v.float(), "behaviour-contrast",
                     {"harmful": int(len(harmful)), "safe": int(len(safe)), "raw_norm": float(v.norm()),
                      **(meta or {})})


def contrast_bank(harmful: torch.Tensor, safe: torch.Tensor, owner: Sequence[int], *, layer: int) -> list[Direction]:
    """One contrast per scenario (``owner[i]``: the scenario of row i of both), named
    ``bank:<scenario>``: the authors' vector bank."""
    owner = np.asarray(owner)
    if len(owner) != len(harmful) or len(harmful) != len(safe):
        raise UserError("vector bank: harmful, safe and owner rows must line up")
    out = []
    for sid in dict.fromkeys(owner.tolist()):
        rows = torch.as_tensor(owner == sid)
        v = harmful[rows].double().mean(0) - safe[rows].double().mean(0)
        if float(v.norm()) > 0.0:
            out.append(Direction(f"bank:{sid}", layer, v.float(), "bank", {"scenario": int(sid),
                                                                           "pairs": int(rows.sum())}))
    if not out:
        raise UserError("vector bank: every scenario's contrast is zero")
    return out


def bank_scores(diffs: torch.Tensor, bank: Sequence[Direction], reduce: Literal["max", "mean"] = "max") -> np.ndarray:
    """Each pair's cosine with every bank direction, reduced by ``max`` (the authors' score: a
    pair pushing along *any* scenario's behaviour ranks high) or ``mean``. A pair whose two
    responses read identically scores 0. The authors start their max at 0 (a pair negative on
    every direction scores 0); here the max is the true one, which orders the top the same way."""
    cos = torch.from_numpy(similarity_matrix(diffs, bank).T)
    if reduce == "max":
        return cos.max(dim=1).values.numpy()
    if reduce == "mean":
        return cos.mean(dim=1).numpy()
    raise UserError(f"vector bank reduce: {reduce!r} is not max or mean")
