"""Steering checks: does a direction the study ranks pairs by *cause* the behaviour?

A ranking is only as good as its direction. The authors (Xiao & Aranguri, arXiv 2602.11079,
``src/activation_analysis/steering.py``) validate theirs by adding it to the residual stream
of the model before DPO during generation (harmful rate 0.8% -> 29.2%) and by projecting it
out. Here the same two interventions run against the control that must not move: a random
direction of the same norm, seeded, steered identically, on the same prompts with the same
sampling seeds (so the comparison is paired prompt by prompt).

Scale: ``alpha`` is in multiples of the layer's median residual-stream norm on the check's
prompts (the added vector is ``alpha * norm * u``, ``u`` the unit direction), so an alpha means
the same push at any layer and for any model; the median, because a first-position "attention
sink" can be many times the other tokens' norm and would set the scale alone. The authors add
``scale * v`` with ``v`` their raw (unnormalised) difference; ``Direction.meta['raw_norm']``
converts one to the other.
As theirs, the hook by default leaves the prompt's positions alone and steers each generated
token (the forward passes over a single new position); ``positions="all"`` steers every
position of every pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from probe_dpo.attribution.directions import Direction
from probe_dpo.config import bounded
from probe_dpo.errors import UserError
from probe_dpo.stats import stable_seed

Mode = Literal["add", "project_out"]


@contextlib.contextmanager
def steer(model: Any, layer: int, vector: torch.Tensor, *, mode: Mode = "add",
          positions: Literal["generated", "all"] = "generated") -> Iterator[None]:
    """While active, decoder layer ``layer``'s output ``h`` becomes ``h + vector`` (``add``) or
    ``h - (h . u) u`` with ``u = vector / |vector|`` (``project_out``: the component along the
    direction removed exactly)."""
    from probe_dpo.model import get_layer

    if mode not in ("add", "project_out"):
        raise UserError(f"steering mode {mode!r}: use add or project_out")
    v = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
    if mode == "project_out":
        if float(v.norm()) == 0.0:
            raise UserError("steering: cannot project out a zero vector")
        v = v / v.norm()

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if positions == "generated" and hidden.shape[1] > 1:
            return output
        u = v.to(device=hidden.device, dtype=hidden.dtype)
        new = hidden + u if mode == "add" else hidden - (hidden @ u).unsqueeze(-1) * u
        return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

    handle = get_layer(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def residual_norm(model: Any, tokenizer: Any, prompts: Sequence[str], layer: int, *, batch_size: int = 16,
                  max_length: int = 64) -> float:
    """Median L2 norm of layer ``layer``'s output over the prompts' (non-padding) tokens: the
    unit of the steering scale."""
    from probe_dpo.generation import device_of
    from probe_dpo.model import residual_hooks

    norms_all = []
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with torch.inference_mode(), residual_hooks(model, [layer]) as store:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length).to(device_of(model))
            model(**enc)
            norms = store[layer].float().norm(dim=-1)
            norms_all.append(norms[enc["attention_mask"].bool()])
    if not norms_all or sum(len(n) for n in norms_all) == 0:
        raise UserError("steering: no prompt tokens to measure the residual norm on")
    return float(torch.cat(norms_all).median())


def random_unit(hidden: int, seed: Any) -> torch.Tensor:
    """A seeded random unit vector (the control direction)."""
    g = torch.Generator().manual_seed(stable_seed("random-direction", seed) % (2 ** 63))
    r = torch.randn(hidden, generator=g, dtype=torch.float64)
    return (r / r.norm()).float()


@dataclass
class SteeringSettings:
    """One steering check: each alpha adds the direction and its random control; projection
    removes each; every condition is sampled on the same prompts with the same seeds."""

    alphas: list[float] = field(default_factory=lambda: [0.5])
    """Added vector sizes, in multiples of the layer's median residual norm."""
    project_out: bool = True
    """Also generate with the direction (and the control) projected out."""
    samples_per_prompt: int = bounded(1, ge=1)
    """Continuations per prompt and condition."""
    positions: Literal["generated", "all"] = "generated"
    """Steer generated tokens only (the authors' hook) or every position."""
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """A judge score at or above this counts as the behaviour."""
    bootstrap: int = bounded(2000, ge=10)
    """Bootstrap resamples of every interval (prompts resampled, paired across conditions)."""
    seed: int = bounded(0, ge=0)
    """Seeds sampling (the same for every condition) and the random control."""


def steering_check(model: Any, tokenizer: Any, prompts: Sequence[str], direction: Direction, judge: Any,
                   settings: SteeringSettings | None = None, generation: Any = None) -> dict:
    """The behaviour rate (judge at ``threshold``) of ``model``'s continuations of ``prompts``
    unsteered, with the direction added at each alpha, and projected out, each beside the same
    intervention with a random direction of the same norm. Each intervention's ``vs_none`` is the
    paired change from unsteered and ``vs_random`` the paired change from its control, whose
    ``moves`` says the direction beats it (add: more behaviour, the delta's CI above 0; project
    out: less, below 0). The check's ``moves``: some alpha's addition beats its control; a
    direction without it is flagged before anything is ranked by it."""
    from probe_dpo.evaluation import paired_relative_change, rate_with_ci, score_completions
    from probe_dpo.generation import generate
    from probe_dpo.judges import Judge, get_judge

    s = settings or SteeringSettings()
    j = judge if isinstance(judge, Judge) else get_judge(judge)
    prompts = list(prompts)
    norm = residual_norm(model, tokenizer, prompts, direction.layer)
    control = random_unit(direction.hidden_size, (s.seed, direction.name))
    conditions: dict[str, tuple[Mode, torch.Tensor] | None] = {"none": None}
    for a in s.alphas:
        conditions[f"add {a:g}"] = ("add", a * norm * direction.vector)
        conditions[f"add {a:g} random"] = ("add", a * norm * control)
    if s.project_out:
        conditions["project-out"] = ("project_out", direction.vector)
        conditions["project-out random"] = ("project_out", control)
    scores = {}
    for name, how in conditions.items():
        with steer(model, direction.layer, how[1], mode=how[0], positions=s.positions) if how else \
                contextlib.nullcontext():
            outs = generate(model, prompts, s.samples_per_prompt, generation, s.seed, tokenizer=tokenizer,
                            seed_tag="steering-check", desc=f"steering {direction.name}: {name}", progress=False)
        scores[name] = score_completions(outs, [j])[j.name]
    rows = []
    for name in conditions:
        row = {"condition": name, **rate_with_ci(scores[name], s.threshold, s.bootstrap, s.seed)}
        if name != "none":
            row["vs_none"] = _paired(paired_relative_change(scores["none"], scores[name], s.threshold,
                                                            s.bootstrap, s.seed))
        if name != "none" and not name.endswith("random"):
            res = paired_relative_change(scores[f"{name} random"], scores[name], s.threshold, s.bootstrap, s.seed)
            moves = res["delta_ci_low"] > 0 if name.startswith("add") else res["delta_ci_high"] < 0
            row["vs_random"] = {**_paired(res), "moves": bool(moves)}
        rows.append(row)
    return {"direction": direction.name, "kind": direction.kind, "layer": direction.layer, "judge": j.name,
            "residual_norm": norm, "prompts": len(prompts), "samples_per_prompt": s.samples_per_prompt,
            "positions": s.positions, "rows": rows,
            "moves": any(r["vs_random"]["moves"] for r in rows if "vs_random" in r and r["condition"].startswith("add"))}


def _paired(res: dict) -> dict:
    """The paired comparison's delta, its CI and p-value (the relative change is undefined at a zero base)."""
    return {k: (None if isinstance(res[k], float) and np.isnan(res[k]) else res[k])
            for k in ("delta", "delta_ci_low", "delta_ci_high", "p_value", "change")}
