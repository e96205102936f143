"""Sampling K completions per prompt from a policy, sharded over Ray actors, and scoring them.

The prompts are cut into fixed shards of ``shard_size`` prompts; each shard is one actor
task and is seeded from ``(seed, round, shard start)``, so the candidates do not depend on
how many actors ran them. An actor holds one copy of the policy (and, when probes are
given, the probe set): it samples, then scores every completion with the probe signal on
the SAME policy's hidden states (mean over the completion's tokens at each probe's layer),
or, with ``probe_model``, on a frozen copy of that model (the base model: the policy cannot
move what the probe reads).
Classifier scores are added on the driver (``add_classifier_scores``), one judge call for
all candidates.

``actors=0`` runs the same code in this process (tests, benchmarks, a laptop without Ray).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from probe_dpo.generation import GenerationSettings

log = logging.getLogger(__name__)

PROBE = "probe"


def classifier_key(judge_name: str) -> str:
    return f"classifier:{judge_name}"


class _Sampler:
    """Holds a policy (and optionally probes); samples and probe-scores one shard per call."""

    def __init__(self, model: str, probes: str | None, aggregation: str | None, threads: int, use_gpu: bool,
                 probe_model: str | None = None):
        import os

        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, threads))
        from probe_dpo.logs import setup
        from probe_dpo.model import load_model, load_tokenizer

        setup()

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_model(model, dtype="bfloat16" if device == "cuda" else "float32", device=device)
        self.tokenizer = load_tokenizer(model)
        self.signal = None
        if probes:
            from probe_dpo.objectives import ProbeSignal
            from probe_dpo.probes import ProbeSet

            probeset = ProbeSet.load(probes)
            reader = self.model
            if probe_model is not None and probe_model != model:
                reader = load_model(probe_model, dtype="bfloat16" if device == "cuda" else "float32", device=device)
            self.signal = ProbeSignal(probeset, reader, self.tokenizer, aggregation=aggregation)

    def run(self, task: dict) -> list[dict]:
        from probe_dpo.generation import generate

        t0 = time.perf_counter()
        settings = GenerationSettings(**task["settings"])
        rows = task["rows"]
        prompts = [r["prompt"] for r in rows]
        completions = generate(self.model, prompts, task["k"], settings, task["seed"], tokenizer=self.tokenizer,
                               desc=f"sampling shard {task['start']}", progress=task.get("progress", False),
                               seed_tag=f"round{task['round']}/shard{task['start']}")
        probe_scores = None
        if self.signal is not None:
            flat_p = [p for p, comps in zip(prompts, completions) for _ in comps]
            flat_c = [c for comps in completions for c in comps]
            probe_scores = self.signal.score(flat_p, flat_c).reshape(len(prompts), task["k"])
        out = []
        for i, (r, comps) in enumerate(zip(rows, completions)):
            rec = {"prompt_id": r.get("prompt_id", f"p{task['start'] + i}"), "prompt": r["prompt"],
                   "source": r.get("source"), "round": task["round"], "completions": list(comps), "scores": {}}
            if probe_scores is not None:
                rec["scores"][PROBE] = [round(float(x), 6) for x in probe_scores[i]]
            out.append(rec)
        out[0]["_seconds"] = time.perf_counter() - t0 if out else None
        return out


def sample_candidates(model: str, prompts: Sequence[dict], *, k: int, settings: GenerationSettings, seed: int,
                      round_index: int = 0, probes: str | None = None, aggregation: str | None = None,
                      actors: int = 2, threads_per_actor: int = 1, use_gpu: bool = False, shard_size: int = 32,
                      probe_model: str | None = None, accelerator_type: str | None = None) -> list[dict]:
    """K sampled completions per prompt (and probe scores when ``probes`` is given), in prompt order.

    ``probe_model``: the model whose activations the probes read (None: the sampling policy)."""
    rows = [dict(p) for p in prompts]
    tasks = [{"rows": rows[s:s + shard_size], "start": s, "k": k, "settings": settings.to_dict(),
              "seed": seed, "round": round_index} for s in range(0, len(rows), shard_size)]
    t0 = time.perf_counter()
    if actors <= 0:
        sampler = _Sampler(model, probes, aggregation, threads_per_actor, use_gpu, probe_model)
        results = []
        for i, task in enumerate(tasks):
            results.append(sampler.run({**task, "progress": True}))
    else:
        import ray
        from ray.util import ActorPool

        n = min(actors, len(tasks))
        if use_gpu:
            from probe_dpo.ray_utils import cluster_gpus, gpu_actors

            n = gpu_actors(n, cluster_gpus(), "sampling")
        # "DEFAULT": outside a Tune trial's placement group (whose slots its Train workers hold),
        # so an on-policy round inside a trial can start its samplers
        from probe_dpo.ray_utils import gpu_options

        options = {**gpu_options(use_gpu, accelerator_type, num_cpus=threads_per_actor),
                   "scheduling_strategy": "DEFAULT"}
        remote = ray.remote(_Sampler).options(**options)
        pool_actors = [remote.remote(model, probes, aggregation, threads_per_actor, use_gpu, probe_model)
                       for _ in range(n)]
        try:
            pool = ActorPool(pool_actors)
            results = []
            for i, res in enumerate(pool.map(lambda a, t: a.run.remote(t), tasks)):
                results.append(res)
                log.info(f"sampling: shard {i + 1}/{len(tasks)} done ({sum(len(r) for r in results)}/{len(rows)} prompts)")
        except Exception as exc:  # noqa: BLE001 - surface a UserError raised inside an actor
            from probe_dpo.ray_utils import unwrap_ray_error

            raise unwrap_ray_error(exc) from None
        finally:
            for actor in pool_actors:
                ray.kill(actor)
    out = [r for shard in results for r in shard]
    for r in out:
        r.pop("_seconds", None)
    log.info(f"sampling: {len(out)} prompts x {k} completions in {time.perf_counter() - t0:.1f}s "
        f"({'in-process' if actors <= 0 else f'{min(actors, len(tasks))} Ray actors'})")
    return out


def add_classifier_scores(candidates: list[dict], judge: Any) -> None:
    """Add the judge's score of every completion to each record's ``scores``, in place."""
    from probe_dpo.judges import Judge, get_judge

    j = judge if isinstance(judge, Judge) else get_judge(judge)
    flat = [c for r in candidates for c in r["completions"]]
    scores = j.score(flat)
    pos = 0
    for r in candidates:
        n = len(r["completions"])
        r.setdefault("scores", {})[classifier_key(j.name)] = [round(float(x), 6) for x in scores[pos:pos + n]]
        pos += n
