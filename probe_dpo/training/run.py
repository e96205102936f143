"""The driver of one training run: check everything, build the data, train on Ray, publish.

``train(cfg)`` is what ``probe-dpo train`` runs::

    prepare(cfg)          every input is read and checked BEFORE any compute (model config,
                          probe compatibility, data columns, judge, storage): bad input is one
                          UserError line
    for each round:       (DPO) sample K completions per prompt from the current policy on
                          Ray actors, score them, build pairs -> <out>/round-<r>/pairs.jsonl
                          (SFT) the SFT rows (classifier-filtered for classifier-sft)
                          -> <out>/sft_data.jsonl
                          (GRPO) the training prompts -> <out>/prompts.jsonl; rollouts are
                          sampled inside the Train workers
                          fit on Ray Train (DeepSpeed workers, checkpoints in <out>/ray)
                          -> the round's policy, published (<out>/policy for the last round)
    <out>/train.json      the summary: config, data counts, pair stats, training metrics

A finished round (its policy published by a run with the same config hash) is skipped on a
re-run; an interrupted one resumes from its latest checkpoint in storage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from probe_dpo import storage
from probe_dpo.config import dump_yaml, to_dict
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError
from probe_dpo.training.config import DPO_METHODS, TrainConfig

log = logging.getLogger(__name__)

@dataclass
class Plan:
    """Everything ``prepare`` resolved and checked."""

    cfg: TrainConfig
    model: str
    testbed_info: dict | None
    probes: Any = None                      # ProbeSet or None
    prompts: list[dict] = field(default_factory=list)
    sft: list[dict] = field(default_factory=list)
    pairs: list[dict] | None = None
    candidates: list[dict] | None = None
    settings: Any = None                    # GenerationSettings
    config_hash: str = ""
    aggregation: str = "mean"


def train_config_hash(cfg: TrainConfig) -> str:
    """What identifies a run's results (not where or how it is run)."""
    data = to_dict(cfg)
    for key in ("fault", "tracking"):  # where and whether it is logged does not change the results
        data.pop(key, None)
    data["distributed"] = {k: v for k, v in data["distributed"].items()
                           if k in ("workers", "zero_stage", "use_gpu")}
    data["sampling"] = {k: v for k, v in data["sampling"].items() if k not in ("actors", "threads_per_actor")}
    return json_digest(data)


def prepare(cfg: TrainConfig) -> Plan:
    """Resolve and check every input of the run; raises UserError before any compute."""
    from probe_dpo.data import check_columns, read_records
    from probe_dpo.judges import get_judge
    from probe_dpo.testbed import generation_settings, read_testbed_info
    from probe_dpo.testbed.layout import MODEL
    from probe_dpo.training.pairs import check_candidates, read_pairs

    info = read_testbed_info(cfg.testbed) if cfg.testbed else None
    model = cfg.model or (storage.join(cfg.testbed, info["model"].get("path", MODEL)) if info else None)
    if not model:
        raise UserError("no model: set model=<folder or URI> or testbed=<testbed folder>")
    from probe_dpo.model import check_fit, model_dir, model_facts

    if not storage.exists(storage.join(model_dir(model), "config.json")):  # a hub id: its cached snapshot
        raise UserError(f"model {model}: no config.json there (not a save_pretrained folder)")

    model_facts(model)
    get_judge(cfg.judge)  # a name check; the classifier itself loads lazily

    w = cfg.penalty_weight
    check_penalty(cfg)
    if cfg.distributed.offload and cfg.distributed.zero_stage == 0:
        raise UserError("distributed.offload needs distributed.zero_stage >= 1")
    if cfg.data.pairs and not cfg.is_dpo:
        raise UserError(f"data.pairs is for DPO methods ({', '.join(DPO_METHODS)}), not {cfg.method}")
    if cfg.method == "dpo" and not cfg.data.pairs:
        raise UserError("method dpo trains on a given pair file: set data.pairs=<jsonl/parquet with prompt, "
                        "chosen, rejected>")
    if cfg.method == "dpo" and cfg.dpo.rounds > 1:
        raise UserError("method dpo replays a fixed pair file: dpo.rounds must be 1")
    if cfg.data.pairs and cfg.data.candidates:
        raise UserError("give data.pairs or data.candidates, not both")
    if cfg.early_warning.every_steps and not cfg.probes:
        raise UserError("early_warning.every_steps > 0 reads the train probes: set probes=<a published probe set>")
    if cfg.early_warning.every_steps and cfg.distributed.zero_stage == 3:
        raise UserError("early_warning needs distributed.zero_stage <= 2 (rank 0 samples with the whole policy)")
    if cfg.is_grpo:
        if w > 0:
            raise UserError(f"method {cfg.method}: penalty.weight is for SFT/DPO; GRPO's probe term is the reward "
                            "(grpo.reward_weight, grpo.form)")
        group = cfg.train.batch_size * cfg.distributed.workers * cfg.train.grad_accum
        if group % cfg.grpo.generations:
            raise UserError(f"method {cfg.method}: train.batch_size x distributed.workers x train.grad_accum = "
                            f"{group} completions per step is not a multiple of grpo.generations="
                            f"{cfg.grpo.generations} (GRPO's groups)")

    plan = Plan(cfg=cfg, model=model, testbed_info=info)
    if cfg.needs_probes or cfg.probes:
        if not cfg.probes:
            raise UserError(f"method {cfg.method} needs probes=<a published probe set>"
                            + (" (penalty.weight > 0)" if w > 0 else ""))
        from probe_dpo.probes import ProbeSet

        plan.probes = ProbeSet.load(cfg.probes)
        where = f"probes {plan.probes.uri}" if plan.probes.uri else "the probes"
        if not plan.probes.train_probes:
            raise UserError(f"{where}: no probes with role 'train' to train against")
        check_fit(plan.probes.probes, model, where=where, arch=plan.probes.meta.get("arch_hash"))
        plan.aggregation = cfg.aggregation or plan.probes.aggregation

    def data_path(value: str | None, split: str, key: str) -> str:
        if value:
            return value
        if cfg.testbed:
            from probe_dpo.testbed.layout import TestbedPaths

            return TestbedPaths(cfg.testbed).data(split)
        raise UserError(f"method {cfg.method} needs {key}=<file> (or testbed=<folder>)")

    if cfg.is_grpo:  # on-policy: the prompts alone; the completions are sampled while training
        uri = data_path(cfg.data.prompts, "prompts_train", "data.prompts")
        prompts = read_records(uri, required=("prompt",), non_empty=("prompt",),
                               what="data.prompts" if cfg.data.prompts else "training prompts")
        plan.prompts = prompts[: cfg.data.max_prompts] if cfg.data.max_prompts else prompts
    elif cfg.is_dpo:
        if cfg.data.pairs:
            plan.pairs = read_pairs(cfg.data.pairs, what="data.pairs")
        elif cfg.data.candidates:
            cands = read_records(cfg.data.candidates, what="data.candidates")
            check_candidates(cands, cfg.data.candidates)
            plan.candidates = cands[: cfg.data.max_prompts] if cfg.data.max_prompts else cands
            if cfg.signal == "probe" and not all("probe" in c["scores"] for c in plan.candidates):
                raise UserError(f"{cfg.data.candidates}: candidates have no 'probe' scores (sample them with probes)")
        if cfg.dpo.rounds > 1 or not (plan.pairs or plan.candidates):
            uri = data_path(cfg.data.prompts, "prompts_train", "data.prompts")
            prompts = read_records(uri, required=("prompt",), non_empty=("prompt",),
                                   what="data.prompts" if cfg.data.prompts else "training prompts")
            plan.prompts = prompts[: cfg.data.max_prompts] if cfg.data.max_prompts else prompts
    else:
        uri = data_path(cfg.data.sft, "sft", "data.sft")
        rows = read_records(uri, what="data.sft" if cfg.data.sft else "SFT data")
        pc = bool(rows) and "completion" in rows[0]
        column = "completion" if pc else "messages" if rows and "messages" in rows[0] else "text"
        check_columns(rows, required=("prompt", "completion") if pc else (column,),
                      non_empty=(column,), where=f"SFT data {uri}")
        plan.sft = rows[: cfg.data.max_sft] if cfg.data.max_sft else rows
    s = cfg.sampling
    plan.settings = generation_settings(cfg.testbed, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                        top_p=s.top_p, top_k=s.top_k, batch_size=s.batch_size)
    storage.check_reachable(cfg.out)  # an unreachable or missing bucket fails here, not after sampling
    if cfg.tracking.report_to:
        from probe_dpo.tracking import check_installed, log_dir

        check_installed(cfg.tracking)
        log_dir(cfg.tracking, cfg.out)  # a remote run folder needs tracking.dir
    plan.config_hash = train_config_hash(cfg)
    return plan


def _existing(uri: str, chash: str) -> bool:
    """True if a policy published by a run with this config hash is at ``uri``."""
    if not storage.is_complete(uri):
        return False
    meta = storage.read_manifest(uri).get("metadata", {})
    if meta.get("config_hash") != chash:
        raise UserError(f"{uri} holds a policy from a different run (config hash {meta.get('config_hash')}, "
                        f"this run {chash}): choose another out=")
    return True


def _build_pairs(plan: Plan, r: int, model: str, round_uri: str) -> tuple[list[dict], dict]:
    from probe_dpo.data import write_records
    from probe_dpo.training.pairs import build_pairs, randomize_labels
    from probe_dpo.training.sampling import PROBE, add_classifier_scores, classifier_key, sample_candidates

    cfg = plan.cfg
    if r == 0 and plan.pairs is not None:
        pairs, stats = [dict(p) for p in plan.pairs], {"pairs": len(plan.pairs), "replayed": cfg.data.pairs}
    else:
        if r == 0 and plan.candidates is not None:
            candidates = [dict(c, scores=dict(c["scores"])) for c in plan.candidates]
            log.info(f"round {r}: reusing {len(candidates)} candidate sets from {cfg.data.candidates}")
        else:
            s = cfg.sampling
            candidates = sample_candidates(
                model, plan.prompts, k=s.k, settings=plan.settings, seed=cfg.seed, round_index=r,
                probes=cfg.probes if plan.probes is not None else None, aggregation=plan.aggregation,
                actors=s.actors, threads_per_actor=s.threads_per_actor, use_gpu=cfg.distributed.use_gpu,
                accelerator_type=cfg.distributed.accelerator_type, shard_size=s.shard_size,
                probe_model=plan.model if s.probe_reads == "base" else None)
        key = classifier_key(cfg.judge)
        if not all(key in c["scores"] for c in candidates):
            add_classifier_scores(candidates, cfg.judge)
        write_records(candidates, storage.join(round_uri, "candidates.jsonl"))
        signal = PROBE if cfg.signal == "probe" else key
        pairs, stats = build_pairs(candidates, signal, min_margin=cfg.sampling.min_margin)
    if cfg.method == "random-dpo":
        pairs = randomize_labels(pairs, cfg.seed)
        stats["swapped"] = int(sum(p["swapped"] for p in pairs))
    for p in pairs:
        p["round"] = r
    if not pairs:
        raise UserError(f"round {r}: no preference pairs (every prompt's margin was below "
                        f"sampling.min_margin={cfg.sampling.min_margin})")
    write_records(pairs, storage.join(round_uri, "pairs.jsonl"))
    log.info(f"round {r}: {len(pairs)} pairs -> {storage.join(round_uri, 'pairs.jsonl')} ({json.dumps(stats)})")
    return pairs, stats


def _sft_rows(plan: Plan) -> tuple[list[dict], dict]:
    cfg = plan.cfg
    columns = (("prompt", "completion", "source") if plan.sft and "completion" in plan.sft[0] else
               ("messages", "source") if plan.sft and "messages" in plan.sft[0] else ("text", "source"))
    rows = [{k: r[k] for k in columns if k in r} for r in plan.sft]
    stats: dict[str, Any] = {"rows": len(rows)}
    if cfg.method == "classifier-sft":
        from probe_dpo.data import message_text
        from probe_dpo.judges import get_judge

        scores = get_judge(cfg.judge).score([message_text(r.get("completion", r.get("messages", r.get("text"))))
                                             for r in rows])
        for r, s in zip(rows, scores):
            r["score"] = round(float(s), 6)
        kept = [r for r in rows if r["score"] < cfg.classifier_threshold]
        stats.update(kept=len(kept), dropped=len(rows) - len(kept), judge=cfg.judge,
                     threshold=cfg.classifier_threshold)
        log.info(f"classifier-sft: kept {len(kept)} of {len(rows)} SFT rows ({cfg.judge} < {cfg.classifier_threshold})")
        rows = kept
        if not rows:
            raise UserError(f"classifier-sft: the classifier dropped every SFT row (threshold {cfg.classifier_threshold})")
    return rows, stats


def check_penalty(cfg: TrainConfig, where: str = "") -> None:
    """The method, the probe penalty's weight and the KL anchor agree (a config check, also run at an
    experiment's load for every arm and search value). probe-sft at weight 0 is SFT with the penalty
    off: an obfuscation map's zero-penalty column, its baseline."""
    if cfg.method == "sft" and cfg.penalty_weight > 0:
        raise UserError(f"{where}method sft is plain SFT (no probe penalty): use method=probe-sft for "
                        "penalty.weight > 0")
    if cfg.sft.kl_weight > 0 and (cfg.is_dpo or cfg.is_grpo):
        raise UserError(f"{where}sft.kl_weight is the SFT methods' KL anchor; method {cfg.method} has its own "
                        "(dpo.beta, grpo.beta)")
    if cfg.sft.kl_weight > 0 and cfg.distributed.zero_stage == 3:
        raise UserError(f"{where}sft.kl_weight needs distributed.zero_stage <= 2 (the reference model is not "
                        "sharded)")


def train(cfg: TrainConfig, *, callbacks: list | None = None, report_steps: int | None = None) -> dict:
    """Run the configured method end to end; returns (and writes) the summary.

    ``callbacks`` are passed to each round's Ray Train run (a Tune trial passes
    ``TuneReportCallback`` so training metrics reach Tune as they are reported). ``report_steps``:
    the workers also report the training metrics (``loop.TRAIN_METRICS``) every that many
    optimizer steps (a Tune search's ASHA scheduler reads them)."""
    from probe_dpo.data import write_records
    from probe_dpo.model import hub_env
    from probe_dpo.ray_utils import init_ray
    from probe_dpo.training.loop import TrainJob, fit_round

    t_start = time.perf_counter()
    # relative paths mean the caller's folder; Ray Train workers run elsewhere (issue 19)
    cfg = storage.absolute_paths(cfg, ("testbed", "model", "probes", "data.prompts", "data.sft", "data.pairs",
                                       "data.candidates"), outputs=("out",))
    plan = prepare(cfg)  # every input checked before Ray starts
    if cfg.distributed.use_gpu == "auto":  # one answer for every component, and in the config's key
        from probe_dpo.ray_utils import resolve_use_gpu

        init_ray(cfg.distributed.address)
        cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(
            cfg.distributed, use_gpu=resolve_use_gpu(cfg.distributed.use_gpu)))
        plan = dataclasses.replace(plan, cfg=cfg, config_hash=train_config_hash(cfg))
    out = cfg.out
    chash = plan.config_hash
    rounds = cfg.dpo.rounds if cfg.is_dpo else 1
    final_policy = storage.join(out, "policy")
    if _existing(final_policy, chash):
        log.info(f"train: {final_policy} is already complete for this config; nothing to do")
        if storage.exists(storage.join(out, "train.json")):
            return storage.read_json(storage.join(out, "train.json"))
        # published, but the run stopped before its summary (e.g. a search's scheduler ended the trial)
        from probe_dpo.training.loop import RUN_FILE

        run_file = storage.join(final_policy, RUN_FILE)
        metrics = storage.read_json(run_file).get("metrics", {}) if storage.exists(run_file) else {}
        return {"policy": final_policy, "config_hash": chash,
                "rounds": [{"round": rounds - 1, "policy": final_policy, "skipped": True, "train": metrics}]}
    storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
    init_ray(cfg.distributed.address)
    if cfg.distributed.use_gpu is True:  # more than the cluster has would wait for GPUs forever
        from probe_dpo.ray_utils import check_gpus

        d = cfg.distributed
        check_gpus(d.workers, f"distributed.workers={d.workers} with distributed.use_gpu (one GPU per Train worker)",
                   accelerator_type=d.accelerator_type)
    summary: dict[str, Any] = {"method": cfg.method, "config_hash": chash, "base_model": plan.model,
                               "probes": cfg.probes, "judge": cfg.judge, "seed": cfg.seed, "rounds": [],
                               "generation": plan.settings.to_dict()}
    model = plan.model
    for r in range(rounds):
        round_uri = storage.join(out, f"round-{r}")
        policy = final_policy if r == rounds - 1 else storage.join(round_uri, "policy")
        entry: dict[str, Any] = {"round": r, "policy": policy, "model": model}
        if _existing(policy, chash):
            log.info(f"round {r}: {policy} already complete; skipping")
            entry["skipped"] = True
            summary["rounds"].append(entry)
            model = policy
            continue
        t0 = time.perf_counter()
        if cfg.is_grpo:
            data_uri = storage.join(out, "prompts.jsonl")
            write_records([{k: p[k] for k in ("prompt_id", "prompt", "source") if k in p} for p in plan.prompts],
                          data_uri)
            entry["prompts"] = {"prompts": len(plan.prompts)}
            kind = "grpo"
        elif cfg.is_dpo:
            pairs, stats = _build_pairs(plan, r, model, round_uri)
            entry["pairs"] = stats
            data_uri = storage.join(round_uri, "pairs.jsonl")
            kind = "dpo"
        else:
            rows, stats = _sft_rows(plan)
            entry["sft"] = stats
            data_uri = storage.join(out, "sft_data.jsonl")
            write_records(rows, data_uri)
            kind = "sft"
        entry["data_seconds"] = round(time.perf_counter() - t0, 2)
        run_name = f"{cfg.method}-round{r}-{chash[:8]}"
        tracking: dict[str, Any] = {}
        if cfg.tracking.report_to:
            from probe_dpo.tracking import trainer_args, trainer_env

            tracking = dict(tracking_env=trainer_env(cfg.tracking, out, run_name),
                            tracking_args=trainer_args(cfg.tracking, run_name))
        job = TrainJob(cfg=cfg, kind=kind, data=data_uri, model=model,
                       reference=plan.model if cfg.dpo.reference == "base" else model, policy=policy, round=r,
                       config_hash=chash, generation=plan.settings.to_dict(), env=hub_env(),
                       report_steps=report_steps, **tracking)
        entry["train"] = fit_round(job, storage_root=storage.join(out, "ray"), run_name=run_name,
                                   callbacks=callbacks)
        if not cfg.distributed.keep_finished_checkpoints:  # the published policy supersedes them
            storage.remove(storage.join(out, "ray", run_name))
            entry["train"]["checkpoint"] = None
        summary["rounds"].append(entry)
        model = policy
    summary["policy"] = final_policy
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    storage.write_json(storage.join(out, "train.json"), summary)
    log.info(f"train: {cfg.method} done in {summary['seconds']:.1f}s; policy at {final_policy}")
    return summary
