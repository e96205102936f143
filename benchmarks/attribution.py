"""Probe attribution vs its comparators, side by side in ONE run, on the same model and data.

Model: the testbed's SmolLM2-135M-Instruct (the model before DPO). Data: the poisoned
preference mix built from the testbed (``probe_dpo.preference_mix``; which pairs are poisoned
is used for scoring the rankings only). Behaviour examples: the same seeded sample of the
testbed's probe_train split for every method (``--behaviour-examples`` per class).

Methods, each in a FRESH child process (so peak memory is its own; wall time includes
loading the model):

- ``probe``: the workflow's default path: pair activations on 2 Ray actors (1 torch thread
  each) through ``ExtractorPool`` + ``extract_sharded``, the difference-of-means direction
  from the behaviour examples (same actors), cos(v_d, v_b). Also scored: the trained probe's
  direction (``--probes``), from the same activations. Peak memory = driver + actors.
- ``probe-fit``: the same actors; the probe is FITTED inside the timed run on the same labelled
  behaviour examples the gradient side gets (logistic regression on their pooled activations,
  C by AUROC on a seeded 20% of them, ``probe_dpo.probes.fit``), and its direction ranks the
  pairs. With ``probe`` (whose difference of means is built inside the run too) this is the
  like-for-like side of the headline: the gradient side computes its behaviour gradient inside
  its run, so the probe side counts its own direction-building.
- ``probe-weights`` (secondary): the same actors, but the direction is a probe trained OUTSIDE
  the timed run (the first train probe of ``--probes`` at the layer, fitted on the probe
  data's ~1,800 labelled rows against the gradient side's 192-256 behaviour examples): pair
  activations only. Not like for like; reported as its own row.
- ``probe-in-process``, ``probe-fit-in-process``: the same as ``probe`` and ``probe-fit`` in one
  process with 2 torch threads (``extract``): like with like with ``gradient``, which also runs
  in one process on 2 threads with no Ray to start.
- ``probe-weights-in-process`` (secondary): ``probe-weights`` in one process, 2 threads.
- ``judge``: judge(chosen) - judge(rejected) with a judge that did NOT define the poison: with
  ``--poison-judges all`` both testbed judges defined it, so the comparator is hatesonar
  (``judge_defined_poison`` in the JSON says whether the comparator is circular).
- ``gradient``: LESS-style per-pair DPO-loss gradients (one pair at a time) of the
  ``GradientConfig`` parameter subset, Rademacher-projected chunk-wise; behaviour gradient of
  the positives' log-likelihood; cosine. 2 torch threads.
- ``gradient-factorized``: LoGra-style per-example gradients of every linear layer through
  hooks, Kronecker-factored Gaussian projection, batched. 2 torch threads.
- ``gradient-less``: closer to published LESS: LoRA adapters (rank 8 on q/k/v/o) warmed up with
  DPO on 5% of the pairs for 4 epochs; at each epoch's checkpoint every pair's DPO gradient on
  the adapters becomes its Adam update (that checkpoint's moments), Rademacher-projected, and
  is compared with the behaviour's gradient there; lr-weighted sum over the 4 checkpoints.
  The warm-up is counted in its time. 2 torch threads.

Reports wall time, peak RSS, recall of the poisoned pairs at k (k = their number), recall
of the clearly toxic poisoned pairs among them (chosen scored >= 0.8 by the judge that picked
the poison: shows whether the misses are the borderline ones), the source ranking, the ratios
gradient / probe, and, when ``--study`` points at a finished
``probe_dpo/workflows/attribution`` run on the same mix with retraining, the toxicity after filtering
with each ranking. Prints a table and ``RESULT {json}`` (last line); writes
benchmarks/results/attribution.json.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/attribution.py --testbed /tmp/tb \\
        --probes /tmp/probes-tb --study runs/attribution-tb

Every method runs in a fresh child process and the headline ratio is whole-process wall time
(imports, model loads, ``ray.init`` and actor start-up included on every side that has them:
start-up counted on both sides); the in-method seconds are reported beside it. Memory is the
peak RSS of every process involved (children and Ray actors). ``--trace-python-heap`` turns on
``tracemalloc`` for the Python heap peak, on every side alike; it is off by default because it
slows Python-heavy code about 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import RESULTS  # noqa: E402 - sets the offline environment first

os.environ.setdefault("KERAS_BACKEND", "torch")

METHODS = ("probe", "probe-fit", "probe-weights", "probe-in-process", "probe-fit-in-process", "probe-weights-in-process",
           "judge", "gradient", "gradient-factorized", "gradient-less")
PROBE_METHODS = ("probe", "probe-fit", "probe-weights", "probe-in-process", "probe-fit-in-process",
                 "probe-weights-in-process")
IN_PROCESS = ("probe-in-process", "probe-fit-in-process", "probe-weights-in-process")
WEIGHTS = ("probe-weights", "probe-weights-in-process")  # a probe trained outside the run: secondary rows
FIT = ("probe-fit", "probe-fit-in-process")  # the probe fitted inside the run on the behaviour examples
JUDGES = ("profanity-check", "toxic-comment-classifier", "hatesonar")
CLEAR_POISON = 0.8  # chosen score (selecting judge) of a clearly toxic poisoned pair


def _rss_peak_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _inputs(spec: dict):
    from probe_dpo.data import read_records
    from probe_dpo.workflows.attribution_study.inputs import sample_behaviour

    pairs = read_records(spec["pairs"])
    behaviour = sample_behaviour(read_records(spec["behaviour"]), spec["behaviour_examples"], spec["seed"])
    return pairs, behaviour


def _fitted_direction(model, behaviour: list[dict], layer: int, seed: int, *, tokenizer=None, pool=None,
                      activations: str | None = None):
    """A probe fitted here, in the timed run, on the behaviour examples' pooled activations (C by
    validation AUROC on a seeded 20% of them); its direction (``weight / std``) ranks the pairs."""
    import numpy as np
    import torch

    from probe_dpo import attribution as A
    from probe_dpo.activations import extract, extract_sharded
    from probe_dpo.data import chat_value
    from probe_dpo.probes import LinearProbe
    from probe_dpo.probes.fit import fit_probe

    cols = dict(prompts=[chat_value(r["prompt"]) for r in behaviour],
                completions=[chat_value(r["completion"]) for r in behaviour], layers=[layer], pooling="mean",
                span="response", batch_size=16, max_length=256)
    feats = extract(model, tokenizer, **cols) if pool is None else \
        extract_sharded(model, activations, pool=pool, overwrite=True, **cols)
    x, y = feats[layer], np.array([float(r["label"]) > 0.5 for r in behaviour])
    val = np.random.default_rng([seed, 0xF17]).random(len(y)) < 0.2
    fit = fit_probe(x[torch.as_tensor(~val)], y[~val], x[torch.as_tensor(val)], y[val])
    probe = LinearProbe.from_fit(fit, layer=layer, name="fit-in-run")
    return A.Direction("probe-fit", layer, probe.direction(), "probe",
                       {"c": fit.c, "val_auroc": fit.val_auroc, "n_train": int((~val).sum()), "fit_s": fit.seconds})


def worker(method: str, spec: dict) -> dict:
    """Run one method in this (fresh) process; returns scores and costs."""
    import tracemalloc

    trace = bool(spec.get("trace_python_heap"))
    t_import = time.perf_counter()
    import torch

    from probe_dpo import attribution as A
    from probe_dpo.workflows.attribution_study.config import GRADIENT_MODES

    pairs, behaviour = _inputs(spec)
    import_s = time.perf_counter() - t_import
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    out: dict = {"method": method}
    model = spec["model"]
    layer = spec["layer"]
    extra: dict = {}
    if method in PROBE_METHODS:
        if method in WEIGHTS:
            from probe_dpo.probes import ProbeSet

            if spec["probe"] is None:
                raise SystemExit(f"{method}: no train probe at layer {layer} in {spec['probes']}")
            probe_direction = A.probe_directions(ProbeSet.load(spec["probes"]), [spec["probe"]])[0]
        if method not in IN_PROCESS:
            from probe_dpo.activations import ExtractorPool
            from probe_dpo.ray_utils import init_ray

            t_ray = time.perf_counter()
            init_ray(None, num_cpus=2)
            extra["ray_init_s"] = round(time.perf_counter() - t_ray, 2)  # counted: in seconds and process_seconds
            pool = ExtractorPool(model, actors=2, threads_per_actor=1)
            tmp = tempfile.mkdtemp(prefix="bench-attr-")
            try:
                feats = A.pair_features(model, pairs, [layer], pool=pool, activations=f"{tmp}/pairs",
                                        batch_size=16, max_length=256)
                if method in WEIGHTS:
                    direction = probe_direction
                elif method in FIT:
                    direction = _fitted_direction(model, behaviour, layer, spec["seed"], pool=pool,
                                                  activations=f"{tmp}/beh")
                else:
                    direction = A.behaviour_direction(model, behaviour, layer, pool=pool, activations=f"{tmp}/beh",
                                                      batch_size=16, max_length=256)
                import ray

                actor_rss = ray.get([a.__ray_call__.remote(lambda self: _rss_peak_bytes()) for a in pool.actors])
            finally:
                pool.close()
                shutil.rmtree(tmp, ignore_errors=True)
            extra["actor_peak_rss_bytes"] = [int(x) for x in actor_rss]
            extra["actor_startup_s"] = round(pool.startup_s, 2)
        else:
            torch.set_num_threads(2)
            from probe_dpo.model import load_model, load_tokenizer

            lm, tok = load_model(model), load_tokenizer(model)
            feats = A.pair_features(lm, pairs, [layer], tokenizer=tok, batch_size=16, max_length=256)
            if method in WEIGHTS:
                direction = probe_direction
            elif method in FIT:
                direction = _fitted_direction(lm, behaviour, layer, spec["seed"], tokenizer=tok)
            else:
                direction = A.behaviour_direction(lm, behaviour, layer, tokenizer=tok, batch_size=16,
                                                  max_length=256)
        scores = A.cosine_scores(feats.diffs(layer), direction)
        out["direction"] = direction.name
        if method in FIT:
            out["fit"] = direction.meta
        if spec.get("probes") and method not in WEIGHTS:
            from probe_dpo.probes import ProbeSet

            for d in A.probe_directions(ProbeSet.load(spec["probes"])):
                if d.layer == layer:
                    out.setdefault("other_scores", {})[d.name] = A.cosine_scores(feats.diffs(layer), d).tolist()
    elif method == "judge":
        scores = A.judge_scores(pairs, spec["judge"])
    elif method in GRADIENT_MODES:
        torch.set_num_threads(2)
        from probe_dpo.model import load_model, load_tokenizer

        lm, tok = load_model(model), load_tokenizer(model)
        cfg = A.GradientConfig(mode=GRADIENT_MODES[method], **spec.get("gradient", {}))
        positives = [r for r in behaviour if float(r["label"]) > 0.5]
        scores, info = A.gradient_scores(lm, tok, pairs, positives, cfg)
        extra["gradient"] = info
    else:
        raise SystemExit(f"unknown method {method}")
    wall = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1] if trace else None
    out.update({"seconds": round(wall, 2), "import_and_read_s": round(import_s, 2), "scores": [float(s) for s in scores],
                "peak_rss_bytes": _rss_peak_bytes(), "python_heap_peak_bytes": py_peak,
                "torch_threads": torch.get_num_threads(), **extra})
    if "actor_peak_rss_bytes" in out:
        out["driver_peak_rss_bytes"] = out["peak_rss_bytes"]
        out["peak_rss_bytes"] = out["peak_rss_bytes"] + sum(out["actor_peak_rss_bytes"])
    return out


def run_child(method: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-attr-child-") as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", method, "--spec", str(spec_file),
                               "--result", str(result_file)], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(result_file.read_text())
        result["process_seconds"] = round(time.perf_counter() - t0, 2)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", default="/tmp/tb")
    parser.add_argument("--probes", default=None, help="a ProbeSet on the testbed model (its layer is used)")
    parser.add_argument("--layer", type=int, default=None, help="layer when no probes are given")
    parser.add_argument("--mix", default=None, help="where the poisoned mix is built (default: a cache folder)")
    parser.add_argument("--study", default=None, help="a finished attribution study run (toxicity after filtering)")
    parser.add_argument("--poison-judges", choices=["train", "all"], default="train",
                        help="the mix's poison: toxic under the training judge, or under every judge (issue 21)")
    parser.add_argument("--behaviour-examples", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, the order reversed on every other round; "
                             "times are medians with their min-max (scores are deterministic: the last run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-python-heap", action="store_true", help="tracemalloc on every side (slows it)")
    parser.add_argument("--out", default=str(RESULTS / "attribution.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return 0

    import numpy as np

    from probe_dpo import attribution as A
    from probe_dpo.preference_mix import PreferenceMixConfig, build_preference_mix, read_poison_labels
    from probe_dpo.workflows.attribution_study.config import GRADIENT_MODES

    mix_dir = args.mix or os.path.join(os.path.expanduser("~/.cache/probe_dpo"), "attribution-bench-mix")
    mix = build_preference_mix(args.testbed, mix_dir, PreferenceMixConfig(poison_judges=args.poison_judges))
    pairs_uri = os.path.join(mix_dir, "pairs.jsonl")
    pairs = A.read_pair_file(pairs_uri)
    bad = read_poison_labels(os.path.join(mix_dir, "poison_labels.jsonl"), pairs)
    layer, probe = args.layer, None
    if args.probes:
        from probe_dpo.probes import ProbeSet

        ps = ProbeSet.load(args.probes)
        layer = ps.default_probe.layer if layer is None else layer
        # the probe whose own direction the probe-weights method scores with
        probe = next((p.name for p in ps.train_probes or ps.probes if p.layer == layer), None)
    if layer is None:
        raise SystemExit("give --probes or --layer")
    # the judges that defined the poison: the comparator must not be one of them (else circular)
    defining = {mix["train_judge"]} | ({c[len("score_"):].replace("_", "-") for c in mix["poison_judges"]
                                        if c.startswith("score_")} if args.poison_judges == "all" else set())
    judge = next((j for j in JUDGES if j not in defining), None)
    if judge is None:
        raise SystemExit(f"every judge ({', '.join(JUDGES)}) defined the poison: no non-circular judge comparator")
    spec = {"pairs": pairs_uri, "behaviour": os.path.join(args.testbed, "data", "probe_train.jsonl"),
            "behaviour_examples": args.behaviour_examples, "seed": args.seed,
            "model": os.path.join(args.testbed, "model"), "layer": layer, "probes": args.probes, "probe": probe,
            "judge": judge, "trace_python_heap": args.trace_python_heap}
    methods = [m for m in args.methods.split(",") if m and (m not in WEIGHTS or args.probes)]
    k = int(bad.sum())
    # A diagnostic, not the target: which poisoned pairs are missed? Those whose chosen response
    # the selecting judge scores only just above the poison threshold are the borderline ones.
    from probe_dpo.data import read_records

    chosen_score = {r["pair_id"]: float(r.get("chosen_score") or 0.0)
                    for r in read_records(os.path.join(mix_dir, "poison_labels.jsonl"))}
    clear = bad & np.array([chosen_score.get(p.get("pair_id"), 0.0) >= CLEAR_POISON for p in pairs])
    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rnd in range(max(1, args.rounds)):
        for method in (methods if rnd % 2 == 0 else methods[::-1]):  # alternating: background load hits all
            print(f"[bench] {method} (round {rnd + 1}) ...", file=sys.stderr, flush=True)
            runs[method].append(run_child(method, spec))
    for method in methods:
        r = dict(runs[method][-1])
        if len(runs[method]) > 1:
            for key in ("process_seconds", "seconds"):
                values = sorted(x[key] for x in runs[method])
                r[key] = float(np.median(values))
                r[f"{key}_runs"] = values
        scores = np.asarray(r.pop("scores"))
        r["recall_at_k"] = A.recall_at_k(scores, bad, k)
        r["recall_at_k_clear_poison"] = A.recall_at_k(scores, clear, k)
        r["recall_curve"] = A.recall_curve(scores, bad, [k // 2, k, 2 * k])
        table = A.source_table(scores, A.pair_sources(pairs), k, n_boot=1000, seed=args.seed)
        r["source_ranking"] = [t["source"] for t in table]
        r["sources"] = [{x: t[x] for x in ("source", "mean_score", "ci_low", "ci_high", "in_top_k", "flagged")}
                        for t in table]
        for name, other in (r.pop("other_scores", None) or {}).items():
            r.setdefault("other_directions", {})[name] = {"recall_at_k": A.recall_at_k(np.asarray(other), bad, k)}
        results[method] = r
        print(f"[bench] {method}: {r['seconds']:.1f}s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"recall@{k} {r['recall_at_k']:.3f}, sources {r['source_ranking']}", file=sys.stderr, flush=True)

    ratios = {}
    for probe in PROBE_METHODS:
        for grad in GRADIENT_MODES:
            if probe in results and grad in results:
                ratios[f"{grad}/{probe}"] = {
                    "like_for_like": probe not in WEIGHTS,  # the probe's direction built inside the timed run
                    "whole_process_time": results[grad]["process_seconds"] / results[probe]["process_seconds"],
                    "in_method_time": results[grad]["seconds"] / results[probe]["seconds"],
                    "peak_rss": results[grad]["peak_rss_bytes"] / results[probe]["peak_rss_bytes"],
                    "recall_probe_minus_gradient": results[probe]["recall_at_k"] - results[grad]["recall_at_k"]}
                if len(runs[probe]) > 1:  # each round's own ratio: the spread of the headline
                    ratios[f"{grad}/{probe}"]["whole_process_time_per_round"] = [
                        g["process_seconds"] / p["process_seconds"] for g, p in zip(runs[grad], runs[probe])]
    toxicity = None
    if args.study and os.path.exists(os.path.join(args.study, "results.json")):
        study = json.loads(Path(args.study, "results.json").read_text())
        retrain = study.get("retrain") or {}
        toxicity = {"study": args.study, "k": study.get("k"), "arms": {}}
        for name, entry in (retrain.get("arms") or {}).items():
            toxicity["arms"][name] = {"rates": {j: entry["rates"][j]["rate"] for j in entry["rates"]},
                                      "share_removed": {j: v["share"] for j, v in (entry.get("share_removed") or {}).items()},
                                      "reduction": {j: v["reduction"] for j, v in (entry.get("reduction") or {}).items()},
                                      "perplexity": entry["perplexity"]}
    summary = {
        "benchmark": "attribution", "testbed": args.testbed, "model": spec["model"], "layer": layer,
        "pairs": len(pairs), "poisoned": k, "k": k, "behaviour_examples_per_class": args.behaviour_examples,
        "judge": judge, "judge_defined_poison": judge in defining, "poison_defined_by_judges": sorted(defining),
        "poison_selected_by": mix["train_judge"] if args.poison_judges == "train" else mix["poison_judges"],
        "clear_poison": {"chosen_score_at_least": CLEAR_POISON, "pairs": int(clear.sum())},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "methods": results, "ratios": ratios, "toxicity_after_filtering": toxicity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"\n{'method':22s} {'process s':>9s} {'method s':>8s} {'peak RSS MiB':>13s} {'recall@k':>9s} {'clear':>6s}"
          "  source ranking")
    for m, r in results.items():
        print(f"{m:22s} {r['process_seconds']:9.1f} {r['seconds']:8.1f} {r['peak_rss_bytes'] / 2**20:13.0f} "
              f"{r['recall_at_k']:9.3f} "
              f"{r['recall_at_k_clear_poison']:6.3f}  {' > '.join(r['source_ranking'])}")
    for name, v in ratios.items():
        print(f"{name}{'' if v['like_for_like'] else ' (secondary: probe trained outside the run)'}: "
              f"whole-process time x{v['whole_process_time']:.1f} (in-method x{v['in_method_time']:.1f}), "
              f"peak RSS x{v['peak_rss']:.2f}, "
              f"recall probe - gradient {v['recall_probe_minus_gradient']:+.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("RESULT " + json.dumps({"pairs": len(pairs), "k": k,
                                  "recall": {m: round(r["recall_at_k"], 4) for m, r in results.items()},
                                  "process_seconds": {m: r["process_seconds"] for m, r in results.items()},
                                  "peak_rss_mib": {m: round(r["peak_rss_bytes"] / 2**20) for m, r in results.items()},
                                  "ratios": {n: {k2: (round(v2, 3) if isinstance(v2, float) else
                                                      [round(x, 3) for x in v2] if isinstance(v2, list) else v2)
                                                 for k2, v2 in v.items()}
                                             for n, v in ratios.items()},
                                  "json": args.out}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
