"""The task-level capability check of one retrained arm (``probe_dpo.capability``), cached at
<out>/eval/<arm>.capability.json on the model's files and the settings."""

from __future__ import annotations

import dataclasses
import logging
import time

from probe_dpo import storage
from probe_dpo.data import json_digest
from probe_dpo.workflows.attribution_study.inputs import Inputs

log = logging.getLogger(__name__)


def capability_check(inp: Inputs, name: str, model: str, model_key: str) -> dict:
    """Accuracy of ``model`` on the configured task with its Wilson interval (without the
    per-item predictions, which stay in the cache file). ``model_key``: what identifies the
    model's weights (retraining's ``policy_key``)."""
    import torch

    from probe_dpo.capability import load_items, score_items
    from probe_dpo.model import load_model, load_tokenizer

    cap = inp.cfg.capability
    key = json_digest({"model": model_key, "capability": dataclasses.asdict(cap)})
    uri = storage.join(inp.cfg.out, "eval", f"{name}.capability.json")
    if storage.exists(uri):
        cached = storage.read_json(uri)
        if cached.get("key") == key:
            return {k: v for k, v in cached.items() if k not in ("key", "predictions")}
    t0 = time.perf_counter()
    items = load_items(cap.task, cap.items, cap.seed)
    lm = load_model(model, device="cuda" if torch.cuda.is_available() else "cpu")
    res = {"task": cap.task, **score_items(lm, load_tokenizer(model), items, batch_size=cap.batch_size,
                                           max_length=cap.max_length),
           "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_json(uri, {"key": key, **res})
    log.info(f"capability {name}: {cap.task} accuracy {res['accuracy']:.3f} [{res['ci_low']:.3f}, {res['ci_high']:.3f}] "
             f"on {res['items']} items (always the majority answer: {res['majority']:.3f})")
    return {k: v for k, v in res.items() if k != "predictions"}
