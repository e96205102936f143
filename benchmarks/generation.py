"""Sampling and probe-row reading throughput: float32 against bfloat16 autocast, same everything else.

Same model (the real SmolLM2-135M, float32 weights: autocast makes no copy, so start-up is the
same on both sides and left out), same prompts (the first ``--prompts`` RealToxicityPrompts
prompts), same settings (``probe_dpo.generation.generate``: k continuations of 20 tokens,
batches of 64 length-sorted sequences, the same seed), same threads. The only difference is
``GenerationSettings.dtype``. Variants alternate within each round (f, b, b, f, ...) so load from
other processes hits both alike; medians, min and max are reported.

The second pair of rows is the evaluation's other bfloat16 use: reading probe rows
(``probe_dpo.activations.extract`` of prompt + completion, mean over the completion, four
layers; ``--rows`` further RealToxicityPrompts prompts cut in two at a word) under ``precision.autocast``, with the features' relative L2 error against float32.

vLLM is the backend users expect on GPU clusters; it is not offered here (``vllm==0.32`` needs
``transformers<5.20``, this project pins 5.23), so it has no row.

    .venv/bin/python benchmarks/generation.py [--prompts 128] [--k 2] [--rounds 3] [--threads 2]

Prints ``RESULT {json}`` and writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from _bench import publish  # noqa: E402 - sets the offline environment first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rows", type=int, default=256, help="probe rows read per extraction run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    import torch

    from probe_dpo.activations import extract
    from probe_dpo.generation import GenerationSettings, generate
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.precision import autocast, cpu_has_native_bf16
    from probe_dpo.testbed import load_rtp_prompts, smollm2_dir

    torch.set_num_threads(args.threads)
    model_dir = str(smollm2_dir())
    lm, tok = load_model(model_dir), load_tokenizer(model_dir)
    prompts = [p["prompt"] for p in load_rtp_prompts()][: args.prompts]
    gen_s: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    read_s: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    feats: dict[str, dict] = {}
    # the rows read: later prompts split into prompt + continuation at a word, the same for both
    words = [p["prompt"].split() for p in load_rtp_prompts()[args.prompts: args.prompts + args.rows]]
    read_p = [" ".join(w[: len(w) // 2]) for w in words]
    read_c = [" " + " ".join(w[len(w) // 2:]) for w in words]
    for r in range(args.rounds):
        for dtype in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
            settings = GenerationSettings(max_new_tokens=20, batch_size=64, dtype=dtype)
            t = time.perf_counter()
            generate(lm, prompts, args.k, settings, seed=0, tokenizer=tok, progress=False)
            gen_s[dtype].append(time.perf_counter() - t)
            t = time.perf_counter()
            with autocast(dtype, "cpu"):
                feats[dtype] = extract(lm, tok, prompts=read_p, completions=read_c, layers=[6, 12, 18, 24],
                                       batch_size=32, max_length=256)
            read_s[dtype].append(time.perf_counter() - t)
        print(f"round {r + 1}: sampling f32 {gen_s['float32'][-1]:.1f}s bf16 {gen_s['bfloat16'][-1]:.1f}s; "
              f"reading f32 {read_s['float32'][-1]:.1f}s bf16 {read_s['bfloat16'][-1]:.1f}s", flush=True)
    rel_err = {layer: float((feats["bfloat16"][layer] - feats["float32"][layer]).norm()
                            / feats["float32"][layer].norm()) for layer in feats["float32"]}
    n_seq = args.prompts * args.k

    def row(times: dict[str, list[float]], unit_count: int, unit: str) -> dict:
        med = {d: statistics.median(v) for d, v in times.items()}
        return {f"{unit}_per_s": {d: round(unit_count / m, 2) for d, m in med.items()},
                "median_s": {d: round(m, 2) for d, m in med.items()},
                "min_max_s": {d: [round(min(v), 2), round(max(v), 2)] for d, v in times.items()},
                "speedup_bf16": round(med["float32"] / med["bfloat16"], 3)}

    result = {
        "benchmark": "generation", "model": model_dir, "threads": args.threads, "rounds": args.rounds,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "sampling": {"prompts": args.prompts, "k": args.k, "max_new_tokens": 20, "batch_size": 64,
                     **row(gen_s, n_seq, "sequences")},
        "probe_reads": {"rows": len(read_p), "layers": [6, 12, 18, 24], **row(read_s, len(read_p), "rows"),
                        "bf16_feature_rel_l2_error": {str(k): round(v, 5) for k, v in rel_err.items()}},
        "backends_not_run": {"vllm": "not installable under the pins: vllm 0.32 needs transformers<5.20, "
                                     "this project pins 5.23"},
        "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))},
        "all_s": {"sampling": gen_s, "probe_reads": read_s},
    }
    print(f"sampling: {result['sampling']['speedup_bf16']}x with bf16 autocast; "
          f"probe reads: {result['probe_reads']['speedup_bf16']}x (feature error {max(rel_err.values()):.4f})")
    publish("generation", result, {k: v for k, v in result.items() if k != "all_s"})


if __name__ == "__main__":
    main()
