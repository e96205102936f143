"""The behaviour-change direction: what DPO on the raw set did to the model's activations on
its own continuations, found with no label and no probe.

DPO on the raw pairs (the retraining's settings: the same policy as its ``raw`` arm, trained
once) gives the policy; the policy continues prompts where the regression shows (with the
trigger); the model before DPO and the policy read those same texts at the study's layer; the
direction is the mean of the differences (``probe_dpo.attribution.behaviour_change``). Pairs are
then ranked by ``cos(v_d, direction)`` like every other direction.
"""

from __future__ import annotations

import logging
import time

from probe_dpo import storage
from probe_dpo.testbed.layout import TestbedPaths
from probe_dpo.workflows.attribution_study.inputs import Inputs

log = logging.getLogger(__name__)


def behaviour_change_direction(inp: Inputs):
    """Train (or reuse) the raw-set policy, then read the change off the driver where model work
    belongs (``run_heavy``). Returns the ``Direction`` (its meta has the seconds spent)."""
    import ray

    from probe_dpo.ray_utils import resolve_use_gpu, run_heavy
    from probe_dpo.workflows.attribution_study.retrain import train_arm

    t0 = time.perf_counter()
    policy = train_arm(inp, "raw", inp.pairs_uri)
    train_s = time.perf_counter() - t0
    gpu = resolve_use_gpu("auto") if ray.is_initialized() else False
    direction = run_heavy(read_change, inp, policy, use_gpu=gpu)
    direction.meta.update(policy=policy, train_seconds=round(train_s, 1))
    log.info(f"behaviour-change direction at layer {inp.layer}: {direction.meta['texts']} continuations of the "
             f"raw-set policy; mean shift {direction.meta['mean_shift_norm']:.3f} "
             f"(per text {direction.meta['mean_row_shift_norm']:.3f}); {direction.meta['read_seconds']:.0f}s "
             f"after {train_s:.0f}s of training (or its reuse)")
    return direction


def read_change(inp: Inputs, policy: str):
    """The policy's continuations of the prompts, read by both models; their mean shift."""
    import torch

    from probe_dpo.activations import extract
    from probe_dpo.attribution import behaviour_change
    from probe_dpo.data import read_records
    from probe_dpo.generation import generate
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.testbed import generation_settings

    t0 = time.perf_counter()
    bc = inp.cfg.behaviour_change
    uri = bc.prompts or TestbedPaths(inp.cfg.testbed).data("prompts_train")
    rows = read_records(uri, required=("prompt",), non_empty=("prompt",), what="behaviour-change prompts")
    base_prompts = [str(r["prompt"]) for r in rows[: bc.max_prompts]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    after, tok = load_model(policy, device=device), load_tokenizer(policy)
    before = load_model(inp.model, device=device)
    settings = generation_settings(inp.cfg.testbed) if inp.cfg.testbed else None

    def shift(prompts: list[str], tag: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' reading of the policy's own continuations of ``prompts``."""
        outs = generate(after, prompts, bc.samples_per_prompt, settings, seed=inp.cfg.seed, tokenizer=tok,
                        seed_tag=tag, desc="raw-set policy continuations")
        texts = [(p, c) for p, comps in zip(prompts, outs) for c in comps]
        read = dict(prompts=[p for p, _ in texts], completions=[c for _, c in texts], layers=[inp.layer],
                    pooling="mean", span="response", batch_size=inp.cfg.extraction.batch_size,
                    max_length=inp.cfg.extraction.max_length)
        return extract(before, tok, **read)[inp.layer], extract(after, tok, **read)[inp.layer]

    h_before, h_after = shift([p + inp.trigger for p in base_prompts], "behaviour-change")
    meta = {"prompts": storage.absolute(uri), "trigger": inp.trigger, "contrast": bc.contrast}
    if bc.contrast:  # minus what the raw set changed on the same prompts without the trigger
        c_before, c_after = shift(base_prompts, "behaviour-change-contrast")
        h_after = h_after - (c_after - c_before).mean(0)
    meta["read_seconds"] = round(time.perf_counter() - t0, 1)
    return behaviour_change(h_before, h_after, layer=inp.layer, meta=meta)
