"""The probe-DPO step (differentiable probe penalty on) against a plain TRL DPO step.

Same model (the real SmolLM2-135M from the testbed, or ``--model``), same pairs, same batch
size and length, same optimizer; the only difference is ``penalty.weight`` (0 = TRL's own
``DPOTrainer.compute_loss`` with no hook registered, > 0 = hooks on the probe layers plus the
penalty). Each variant runs in its own child process so that its peak memory can be read
(``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on GPU); children alternate
(plain, probe, probe, plain, ...) so background load hits both alike. Both variants see the
same pairs in the same order, so step i of one is compared with step i of the other (the
batches' lengths, which move a step's time by 2x, cancel): the ratio is the median of those
per-step ratios, reported with its interquartile range and the per-run medians. Prints ``RESULT {json}`` and writes
benchmarks/results/train_step.json.

    .venv/bin/python benchmarks/train_step.py [--model DIR] [--probes URI] [--batch 4] [--length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _bench import publish  # noqa: E402 - sets the offline environment first


def _pairs(n: int) -> list[dict]:
    tb = Path("/tmp/tb/data/pairs.jsonl")
    if tb.exists():
        rows = [json.loads(line) for line in tb.read_text().splitlines() if line.strip()]
    else:
        from probe_dpo.testbed import load_rtp_prompts

        rows = [{"prompt": p["prompt"], "chosen": " I would rather not say that.", "rejected": " You are an idiot."}
                for p in load_rtp_prompts()]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[:n]]


def _probes(path: str | None, model):
    from probe_dpo.model import hidden_size, num_layers
    from probe_dpo.probes import LinearProbe, ProbeSet

    if path:
        return ProbeSet.load(path).train_probes
    import torch

    d, layer = hidden_size(model), num_layers(model) // 2
    # The step's cost does not depend on the probe's values: one frozen probe at the middle layer.
    gen = torch.Generator().manual_seed(0)
    return [LinearProbe(torch.randn(d, generator=gen) / d ** 0.5, 0.0, torch.zeros(d), torch.ones(d), layer=layer,
                        name=f"train-L{layer}")]


def child(args: argparse.Namespace) -> None:
    """One variant: warm-up + timed optimizer steps; prints a JSON line."""
    import resource

    import torch
    from transformers import TrainerCallback

    from probe_dpo.config import load_config
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.training import TrainConfig
    from probe_dpo.training.trainers import build_trainer

    torch.set_num_threads(args.threads)
    use_gpu = torch.cuda.is_available()
    model = load_model(args.model, device="cuda" if use_gpu else None)
    ref = load_model(args.model, device="cuda" if use_gpu else None)
    tok = load_tokenizer(args.model)
    weight = args.weight if args.variant == "probe" else 0.0
    steps = args.warmup + args.steps
    cfg = load_config(TrainConfig, None, ["method=probe-dpo", f"penalty.weight={weight}", f"train.max_steps={steps}",
                                          f"train.batch_size={args.batch}", f"train.max_length={args.length}",
                                          "train.lr=1e-6", f"seed={args.seed}"])
    probes = _probes(args.probes, model) if weight > 0 else None
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if use_gpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if use_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer = build_trainer("dpo", model, tok, _pairs(steps * args.batch), cfg, output_dir=args.tmp, ref_model=ref,
                            probes=probes, callbacks=[Clock()], save_steps=0, use_gpu=use_gpu)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if use_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    penalty = trainer.state.log_history[-2].get("probe_penalty") if weight > 0 else None
    print(json.dumps({"variant": args.variant, "step_s": times[args.warmup:], "peak_bytes": int(peak),
                      "rss_before_train_bytes": int(rss_before * 1024), "device": "cuda" if use_gpu else "cpu",
                      "probe_layers": [p.layer for p in probes] if probes else [], "last_penalty": penalty}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/tb/model")
    ap.add_argument("--probes", default="/tmp/probes-tb" if Path("/tmp/probes-tb/_MANIFEST.json").exists() else None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="child processes per variant (alternating)")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=["plain", "probe"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    if not Path(args.model, "config.json").exists():
        from probe_dpo.testbed import smollm2_dir

        args.model = str(smollm2_dir())
    import tempfile

    runs: dict[str, list[dict]] = {"plain": [], "probe": []}
    order = [v for r in range(args.rounds) for v in (("plain", "probe") if r % 2 == 0 else ("probe", "plain"))]
    for variant in order:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--variant", variant, "--tmp", tmp, "--model", args.model,
                   "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--weight", str(args.weight), "--threads", str(args.threads),
                   "--seed", str(args.seed)] + (["--probes", args.probes] if args.probes else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{variant} child failed:\n{done.stderr[-3000:]}")
            line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
            runs[variant].append(json.loads(line))
            print(f"{variant}: median step {statistics.median(runs[variant][-1]['step_s']):.3f}s, "
                  f"peak {runs[variant][-1]['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    med = {v: statistics.median([t for r in rs for t in r["step_s"]]) for v, rs in runs.items()}
    peak = {v: max(r["peak_bytes"] for r in rs) for v, rs in runs.items()}
    # step i of the k-th probe run against step i of the k-th plain run: the same batch
    paired = [p / q for a, b in zip(runs["probe"], runs["plain"]) for p, q in zip(a["step_s"], b["step_s"])]
    quart = statistics.quantiles(paired, n=4)
    result = {
        "benchmark": "train_step", "model": args.model, "device": runs["plain"][0]["device"],
        "batch_pairs": args.batch, "max_length": args.length, "timed_steps_per_run": args.steps,
        "runs_per_variant": args.rounds, "threads": args.threads, "penalty_weight": args.weight,
        "probe_layers": runs["probe"][0]["probe_layers"], "probes": args.probes or "one random probe, middle layer",
        "plain_trl_dpo_step_s": round(med["plain"], 4), "probe_dpo_step_s": round(med["probe"], 4),
        "time_ratio": round(statistics.median(paired), 4),
        "time_ratio_iqr": [round(quart[0], 4), round(quart[2], 4)],
        "ratio_of_median_step_times": round(med["probe"] / med["plain"], 4),
        "per_run_median_step_s": {v: [round(statistics.median(r["step_s"]), 3) for r in rs] for v, rs in runs.items()},
        "plain_peak_bytes": peak["plain"], "probe_peak_bytes": peak["probe"],
        "peak_memory_ratio": round(peak["probe"] / peak["plain"], 4),
        "peak_memory_measure": "torch.cuda.max_memory_allocated" if runs["plain"][0]["device"] == "cuda"
        else "process ru_maxrss (includes the model, reference model and Python)",
        "target": "time_ratio <= 1.10", "meets_target": statistics.median(paired) <= 1.10,
        "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))},
        "all_step_s": {v: [r["step_s"] for r in rs] for v, rs in runs.items()},
    }
    publish("train_step", result, {k: v for k, v in result.items() if k != "all_step_s"})


if __name__ == "__main__":
    main()
