"""The attribution study: rank a preference set's pairs and sources by a behaviour direction,
cluster and audit them, mitigate, and (optionally) retrain with plain DPO to measure the effect.

What ``probe-dpo attribute`` and ``ray job submit -- python -m probe_dpo.workflows.attribution`` run::

    1. check every input first (pair columns, probes vs model, layer, behaviour data, judge)
       — with a testbed and no pair file, build the poisoned preference mix (<out>/mix)
    2. pair activations on Ray actors (ExtractorPool + extract_sharded; <out>/activations)
    3. behaviour directions: the probe's, the difference of means and (behaviour_change.enabled:
       DPO on the raw set first) the behaviour change -> <out>/directions
    4. scores (cos(v_d, v_b)) -> <out>/scores.parquet; sources -> <out>/sources.json;
       clusters -> <out>/clusters.json (and, with the behaviour change, clusters of what raw-set DPO
       changed in each pair -> <out>/change_clusters.json; with the contrast's bank, the test-prompt x
       pair similarity matrix clustered -> <out>/matrix_clusters.json); concept audit -> <out>/audit.json
    5. comparators (judge(chosen) - judge(rejected); LESS/LoGra-style gradients)
    6. mitigations -> <out>/mitigated/<method>-<filter|swap|drop-sources>.<ext>
    7. retraining (plain DPO on Ray Train, same settings for every arm) and evaluation: the
       judges' toxicity of held-out prompts' continuations (with the mix's trigger),
       benign perplexity, the share of the DPO-induced rise each mitigation removes
    8. <out>/results.json (last) and <out>/report.{md,html}

Each expensive step is restartable: complete activation shards, trained policies (same
config) and evaluations (same policy and settings) are reused on a re-run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from probe_dpo import storage
from probe_dpo.config import to_dict
from probe_dpo.errors import UserError
from probe_dpo.logs import setup as setup_logs
from probe_dpo.workflows import bundled_config
from probe_dpo.workflows.attribution_study.config import AttributionConfig
from probe_dpo.workflows.attribution_study.inputs import prepare_inputs
from probe_dpo.workflows.attribution_study.report import build_report, method_labels
from probe_dpo.workflows.attribution_study.retrain import retrain_and_evaluate, write_mitigations
from probe_dpo.workflows.attribution_study.scoring import recall_summary, score_all, write_scores

log = logging.getLogger(__name__)


def _absolute(cfg: AttributionConfig) -> AttributionConfig:
    """Local paths made absolute: Ray workers (training, extraction) run in other folders. An
    input is rewritten only when it exists here, so a hub id (``org/model``, a dataset id) stays."""
    return storage.absolute_paths(cfg, ("pairs", "model", "probes", "testbed", "behaviour_data", "poison_labels",
                                        "evaluation.prompts", "evaluation.perplexity"), outputs=("out",))


def _public(clusters: dict) -> dict:
    """A clustering without its per-pair labels and centroids (they are in scores.parquet and directions)."""
    return {k: v for k, v in clusters.items() if k not in ("labels", "centroids")}


def run(cfg: AttributionConfig) -> dict:
    t_start = time.perf_counter()
    cfg = _absolute(cfg)
    inp = prepare_inputs(cfg)
    log.info(f"{len(inp.pairs)} pairs from {inp.pairs_uri}; model {inp.model}; layer {inp.layer}; out {cfg.out}")
    change = None
    if cfg.behaviour_change.enabled:  # DPO on the raw set first: the direction is what it changed
        from probe_dpo.workflows.attribution_study.change import behaviour_change_direction

        change = behaviour_change_direction(inp)
    contrast = None
    if cfg.behaviour_contrast.enabled:  # the same raw-set policy (reused): the paper's label-free direction
        from probe_dpo.workflows.attribution_study.contrast import behaviour_contrast_directions

        contrast = behaviour_contrast_directions(inp)
    if cfg.extraction.in_process:
        result = score_all(inp, change, contrast)
    else:  # on a joined cluster the comparators' gradients run in a task, not in the driver
        from probe_dpo.ray_utils import init_ray, resolve_use_gpu, run_heavy

        init_ray(cfg.extraction.address)
        result = run_heavy(score_all, inp, change, contrast, use_gpu=resolve_use_gpu("auto"))
    scores_uri = write_scores(inp, result)
    recall = recall_summary(result["scores"], inp.bad, result["k"]) if inp.bad is not None else None
    if recall:
        log.info("recall@k (k = %d): " % result["k"] + ", ".join(f"{m} {v['recall_at_k']:.3f}" for m, v in recall.items()))
    storage.write_json(storage.join(cfg.out, "sources.json"), result["tables"])
    for name in ("clusters", "change_clusters", "matrix_clusters"):
        if result[name]:
            storage.write_json(storage.join(cfg.out, f"{name}.json"), _public(result[name]))
    storage.write_json(storage.join(cfg.out, "audit.json"), result["audit"])
    arms = write_mitigations(inp, result)  # {} when no mitigation, budget or floor is asked for
    retrain = None
    if cfg.retrain.enabled:
        retrain = retrain_and_evaluate(inp, arms)
    rep = build_report(inp, result, recall, arms, retrain)
    report = rep.publish(cfg.out)
    summary = {
        "config": to_dict(cfg), "pairs": inp.pairs_uri, "model": inp.model, "layer": inp.layer,
        "direction": result["primary"].name, "k": result["k"], "scores": scores_uri,
        "method_labels": method_labels(inp, result),
        "sources": result["tables"], "recall": {m: v["recall_at_k"] for m, v in (recall or {}).items()},
        "recall_budgets": {m: {b: r["recall"] for b, r in v["budgets"].items()} for m, v in (recall or {}).items()},
        "recall_ci": {m: v["ci"] for m, v in (recall or {}).items()},
        "recall_curves": {m: v["curve"] for m, v in (recall or {}).items() if "curve" in v},
        "timings": result["timings"], "comparators": result["comparators"],
        "clusters": _public(result["clusters"] or {}), "change_clusters": _public(result["change_clusters"] or {}),
        "matrix_clusters": _public(result["matrix_clusters"] or {}),
        "audit": result["audit"], "mitigations": arms, "retrain": retrain, "report": report,
        "mix": {k: v for k, v in (inp.mix or {}).items() if k not in ("config",)} or None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    storage.write_json(storage.join(cfg.out, "results.json"), summary)
    log.info(f"done in {summary['seconds']:.0f}s: results {storage.join(cfg.out, 'results.json')}, report {report['html']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m probe_dpo.workflows.attribution [--config FILE] [key=value ...]`` (what a Ray job runs)."""
    setup_logs()
    from probe_dpo.config import load_config

    parser = argparse.ArgumentParser(prog="python -m probe_dpo.workflows.attribution", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file, or the bundled study by name: attribution")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        run(load_config(AttributionConfig, bundled_config(args.config), args.overrides))
    except UserError as exc:
        print(f"probe-dpo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
