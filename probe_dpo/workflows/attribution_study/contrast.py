"""The behaviour-contrast direction and vector bank as the paper builds them, on the study's data.

DPO on the raw pairs (the retraining's settings: the same policy as its ``raw`` arm, trained
once and reused) gives M1; M0 is the model before. Both sample the scenario prompts with and
without the trigger; the study's judge (the held-out one by default) scores every response; the
4-condition filter keeps the scenarios where only M1 with the trigger shows the behaviour; M1's
harmful and M0's safe responses are read by M0 at the study's layer
(``probe_dpo.attribution.contrast``). Pairs are then ranked by cosine with the contrast, and by
the max (and mean) cosine over the per-scenario bank.
"""

from __future__ import annotations

import logging
import time

from probe_dpo import storage
from probe_dpo.testbed.layout import TestbedPaths
from probe_dpo.workflows.attribution_study.inputs import Inputs

log = logging.getLogger(__name__)


def behaviour_contrast_directions(inp: Inputs):
    """Train (or reuse) the raw-set policy, then sample, filter and read on the driver where model
    work belongs (``run_heavy``). Returns ``(contrast Direction, bank directions)``."""
    import ray

    from probe_dpo.ray_utils import resolve_use_gpu, run_heavy
    from probe_dpo.workflows.attribution_study.retrain import train_arm

    t0 = time.perf_counter()
    policy = train_arm(inp, "raw", inp.pairs_uri)
    train_s = time.perf_counter() - t0
    gpu = resolve_use_gpu("auto") if ray.is_initialized() else False
    direction, bank = run_heavy(read_contrast, inp, policy, use_gpu=gpu)
    direction.meta.update(policy=policy, train_seconds=round(train_s, 1))
    m = direction.meta
    log.info(f"behaviour-contrast at layer {inp.layer}: {m['scenarios_kept']} of {m['scenarios']} scenarios kept "
             f"by the filter ({m['judge']} >= {m['threshold']}), {m['harmful']} text pairs read by the model before "
             f"DPO; bank of {len(bank)}; {m['read_seconds']:.0f}s after {train_s:.0f}s of training (or its reuse)")
    return direction, bank


def read_contrast(inp: Inputs, policy: str):
    """Sample both models on both prompt variants, judge, filter, read the kept texts through M0."""
    import torch

    from probe_dpo.attribution import (
        ScenarioSamples,
        behaviour_contrast,
        contrast_bank,
        read_scenarios,
        select_scenarios,
    )
    from probe_dpo.data import read_records
    from probe_dpo.evaluation import score_completions
    from probe_dpo.generation import generate
    from probe_dpo.judges import get_judge
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.testbed import generation_settings

    t0 = time.perf_counter()
    bc = inp.cfg.behaviour_contrast
    uri = bc.prompts or TestbedPaths(inp.cfg.testbed).data("prompts_train")
    rows = read_records(uri, required=("prompt",), non_empty=("prompt",), what="behaviour-contrast prompts")
    base = [str(r["prompt"]) for r in rows[: bc.max_prompts]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m1, tok = load_model(policy, device=device), load_tokenizer(policy)
    m0 = load_model(inp.model, device=device)
    judge = get_judge(bc.judge or inp.judge)
    settings = generation_settings(inp.cfg.testbed) if inp.cfg.testbed else None

    def sample(model, prompts: list[str], tag: str) -> ScenarioSamples:
        outs = generate(model, prompts, bc.samples_per_prompt, settings, seed=inp.cfg.seed, tokenizer=tok,
                        seed_tag=f"behaviour-contrast-{tag}", desc=f"behaviour contrast: {tag}")
        return ScenarioSamples(prompts, outs, score_completions(outs, [judge])[judge.name])

    triggered = [p + inp.trigger for p in base]
    samples = {"M0 triggered": sample(m0, triggered, "M0 triggered"),
               "M1 triggered": sample(m1, triggered, "M1 triggered")}
    if inp.trigger:  # the untriggered variants: without a trigger the filter has two conditions
        samples.update({"M0 base": sample(m0, base, "M0 base"), "M1 base": sample(m1, base, "M1 base")})
    kept = select_scenarios(samples["M0 triggered"], samples["M1 triggered"], bc.threshold, natural=bc.natural,
                            before_base=samples.get("M0 base"), after_base=samples.get("M1 base"))
    ex = inp.cfg.extraction
    harmful, safe, owner = read_scenarios(m0, tok, kept, inp.layer, batch_size=ex.batch_size,
                                          max_length=ex.max_length)
    meta = {"prompts": storage.absolute(uri), "trigger": inp.trigger, "scenarios": len(base),
            "scenarios_kept": len(kept), "conditions": 4 if inp.trigger else 2, "judge": judge.name,
            "threshold": bc.threshold, "natural": bc.natural, "samples_per_prompt": bc.samples_per_prompt,
            "behaviour_rates": {k: float(v.harmful(bc.threshold).mean()) for k, v in samples.items()},
            "read_seconds": round(time.perf_counter() - t0, 1)}
    direction = behaviour_contrast(harmful, safe, layer=inp.layer, meta=meta)
    bank = contrast_bank(harmful, safe, owner, layer=inp.layer) if bc.bank else []
    for b in bank:  # the scenario's prompt, for the similarity matrix's rows in the report
        b.meta["prompt"] = base[b.meta["scenario"]][:160]
    return direction, bank
