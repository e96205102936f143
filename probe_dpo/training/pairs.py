"""Preference pairs from scored candidates, and the random-label control.

A *candidates* record is one prompt with its K sampled completions and every signal's
scores of them::

    {"prompt_id", "prompt", "source", "round", "completions": [K strings],
     "scores": {"probe": [K floats], "classifier:toxic-comment-classifier": [K floats]}}

``build_pairs`` ranks each prompt's completions by one signal: chosen = the lowest score,
rejected = the highest; a prompt whose margin (highest - lowest) is below ``min_margin``,
or whose two picks are the same text, gives no pair. Pairs carry TRL's columns (``prompt``,
``chosen``, ``rejected``) plus both scores, the margin, the signal and the other signals'
scores of the two picks, so a run can be inspected and replayed (``data.pairs``).

``randomize_labels`` is the random-label DPO control: the same pairs with chosen and
rejected swapped on exactly half of them, picked at random (``swapped`` records which).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from probe_dpo.errors import UserError


def build_pairs(candidates: Sequence[dict], signal: str, *, min_margin: float = 0.0) -> tuple[list[dict], dict]:
    """Pairs ranked by ``signal`` (a key of each record's ``scores``), and counts of what was skipped."""
    pairs: list[dict] = []
    skipped = {"margin": 0, "identical": 0}
    for row, cand in enumerate(candidates, start=1):
        scores = cand.get("scores", {})
        if signal not in scores:
            raise UserError(f"candidates row {row}: no '{signal}' scores (has: {', '.join(scores) or 'none'})")
        values = np.asarray(scores[signal], dtype=np.float64)
        completions = list(cand["completions"])
        if len(values) != len(completions) or len(completions) < 2:
            raise UserError(f"candidates row {row}: needs >= 2 completions with one '{signal}' score each, "
                            f"got {len(completions)} completions and {len(values)} scores")
        lo, hi = int(np.argmin(values)), int(np.argmax(values))
        margin = float(values[hi] - values[lo])
        if lo == hi or margin < min_margin or margin <= 0.0:
            skipped["margin"] += 1
            continue
        if completions[lo].strip() == completions[hi].strip():
            skipped["identical"] += 1
            continue
        pair = {"prompt": cand["prompt"], "chosen": completions[lo], "rejected": completions[hi],
                "chosen_score": round(float(values[lo]), 6), "rejected_score": round(float(values[hi]), 6),
                "margin": round(margin, 6), "signal": signal}
        for key in ("prompt_id", "source", "round"):
            if key in cand:
                pair[key] = cand[key]
        others = {name: (round(float(v[lo]), 6), round(float(v[hi]), 6))
                  for name, v in scores.items() if name != signal}
        if others:
            pair["other_scores"] = {name: {"chosen": c, "rejected": r} for name, (c, r) in others.items()}
        pairs.append(pair)
    stats = {"prompts": len(candidates), "pairs": len(pairs), "skipped_low_margin": skipped["margin"],
             "skipped_identical": skipped["identical"], "signal": signal, "min_margin": min_margin}
    if pairs:
        stats["mean_margin"] = float(np.mean([p["margin"] for p in pairs]))
        stats["mean_chosen_score"] = float(np.mean([p["chosen_score"] for p in pairs]))
        stats["mean_rejected_score"] = float(np.mean([p["rejected_score"] for p in pairs]))
    return pairs, stats


def randomize_labels(pairs: Sequence[dict], seed: int) -> list[dict]:
    """The random-label control: chosen/rejected swapped on a seeded random half of the pairs.

    Exactly ``len(pairs) // 2`` are swapped, not a coin flip each: independent flips left 92 of
    160 demo pairs in the signal's direction, so the "control" still carried the signal (and
    lowered toxicity by ~20%). With an exact half the pairs' net preference direction is zero
    by construction and only the fine-tuning itself is left.
    """
    flips = np.zeros(len(pairs), dtype=bool)
    flips[np.random.default_rng([int(seed), 0x5EED]).permutation(len(pairs))[: len(pairs) // 2]] = True
    out = []
    for pair, flip in zip(pairs, flips):
        new = dict(pair)
        new["swapped"] = bool(flip)
        if flip:
            new["chosen"], new["rejected"] = pair["rejected"], pair["chosen"]
            if "chosen_score" in pair and "rejected_score" in pair:
                new["chosen_score"], new["rejected_score"] = pair["rejected_score"], pair["chosen_score"]
            if "other_scores" in pair:
                new["other_scores"] = {k: {"chosen": v["rejected"], "rejected": v["chosen"]}
                                       for k, v in pair["other_scores"].items()}
        out.append(new)
    return out


def read_pairs(uri: str, what: str = "preference pairs") -> list[dict]:
    """A pair file with TRL's columns (standard or conversational format): prompt non-empty, chosen
    different from rejected, score columns numeric (UserError naming the file, row and column,
    before any compute; ``what``, e.g. the config key, names a missing one)."""
    from probe_dpo.data import read_pair_records

    return read_pair_records(uri, non_empty=("prompt",), what=what)


def check_candidates(records: Sequence[dict], uri: str, k_min: int = 2) -> None:
    """UserError unless every record has a prompt, >= ``k_min`` completions and numeric scores."""
    from probe_dpo.data import check_columns, finite_number

    check_columns(records, required=("prompt", "completions", "scores"), where=uri)
    for row, r in enumerate(records, start=1):
        if not isinstance(r["completions"], list) or len(r["completions"]) < k_min:
            raise UserError(f"{uri}: row {row}: 'completions' must list at least {k_min} completions")
        if not isinstance(r["scores"], dict):
            raise UserError(f"{uri}: row {row}: 'scores' must map a signal name to a list of numbers")
        for signal, values in r["scores"].items():
            if not isinstance(values, list):
                raise UserError(f"{uri}: row {row}: scores '{signal}' must be a list of numbers")
            bad = [v for v in values if finite_number(v) is None]
            if bad:
                raise UserError(f"{uri}: row {row}: scores '{signal}' must be finite numbers, got {bad[0]!r}")
