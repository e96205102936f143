"""The probe-GRPO step against a plain TRL GRPO step with a text reward.

Same model, prompts, group size, completion length, optimizer and seed; the only difference
is the reward: ``plain`` is TRL's GRPOTrainer with a text reward that costs nothing (minus the
completion's share of non-letters; ``ProbeGRPOTrainer`` with ``probe_weight=0`` IS
GRPOTrainer), ``probe-policy`` adds the probe reward read on the policy's own states (one
extra no-grad forward up to the probe's layer), ``probe-frozen`` reads the frozen reference
(TRL's own reference pass is reused: no extra forward). ``beta > 0`` on all three, so the
reference pass runs on all three. A step's time is TRL's ``step_time`` (rollout, scoring,
reward, backward, optimizer). Runs alternate (plain, policy, frozen, frozen, policy, plain,
...) in one process so background load hits every variant alike; the first step of each run
(warm-up) is dropped. Reported: per variant the median step time over all kept steps with its
interquartile range, and the ratio probe / plain of the medians with the per-round ratios'
spread. Writes benchmarks/results/grpo_step.json.

    .venv/bin/python benchmarks/grpo_step.py [--model DIR] [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from _bench import publish  # noqa: E402 - sets the offline environment first

VARIANTS = ("plain", "probe-policy", "probe-frozen")


def text_reward(prompts, completions, **_):
    """A text reward that costs nothing: minus the share of characters that are not letters."""
    return [-sum(not ch.isalpha() for ch in c) / max(1, len(c)) for c in completions]


def _probe(model_dir: str):
    """One probe at 60% depth with random weights: its cost, not its accuracy, is measured."""
    import torch

    from probe_dpo.model import hidden_size, load_model, num_layers
    from probe_dpo.probes import LinearProbe

    model = load_model(model_dir)
    size, layers = hidden_size(model), num_layers(model)
    g = torch.Generator().manual_seed(0)
    return LinearProbe(torch.randn(size, generator=g), 0.0, torch.zeros(size), torch.ones(size),
                       layer=int(0.6 * layers), name="bench")


def run(variant: str, model_dir: str, probe, prompts: list[str], steps: int, args) -> list[float]:
    import torch

    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.training.grpo import ProbeGRPOConfig, ProbeGRPOTrainer

    torch.manual_seed(0)
    from datasets import Dataset

    tok = load_tokenizer(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with tempfile.TemporaryDirectory() as out:
        cfg = ProbeGRPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, num_generations=args.generations,
            max_completion_length=args.tokens, max_steps=steps, learning_rate=1e-6, beta=0.04, seed=0,
            use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            probe_weight=1.0 if variant != "plain" else 0.0,
            probe_reader="frozen" if variant == "probe-frozen" else "policy",
            reward_weights=[0.0, 1.0] if variant != "plain" else None)
        trainer = ProbeGRPOTrainer(load_model(model_dir), [text_reward], cfg, train_dataset=Dataset.from_list(
            [{"prompt": p} for p in prompts]), processing_class=tok,
            probes=[probe] if variant != "plain" else None)
        trainer.train()
        times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    return times[1:]  # the first step warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a save_pretrained folder (default: the testbed's SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is dropped)")
    ap.add_argument("--batch", type=int, default=8, help="completions per step")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20, help="completion tokens")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from probe_dpo.testbed.assets import smollm2_dir

        model_dir = str(smollm2_dir())
    from probe_dpo.testbed import load_rtp_prompts

    prompts = [p["prompt"] for p in load_rtp_prompts()[:64]]
    probe = _probe(model_dir)
    times: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            times[variant].append(run(variant, model_dir, probe, prompts, args.steps, args))
            print(f"round {r} {variant}: {[round(t, 3) for t in times[variant][-1]]}", flush=True)

    def quartiles(xs: list[float]) -> list[float]:
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return [round(q[0], 4), round(q[2], 4)]

    summary: dict = {}
    for v in VARIANTS:
        flat = [t for run_times in times[v] for t in run_times]
        summary[v] = {"median_step_s": round(statistics.median(flat), 4), "iqr_s": quartiles(flat)}
    for v in VARIANTS[1:]:
        per_round = [statistics.median(a) / statistics.median(b) for a, b in zip(times[v], times["plain"])]
        summary[f"{v}/plain"] = {"ratio": round(summary[v]["median_step_s"] / summary["plain"]["median_step_s"], 3),
                                 "per_round": [round(x, 3) for x in per_round]}
    result = {"summary": summary, "step_times_s": times, "model": os.path.basename(model_dir.rstrip("/")),
              "completions_per_step": args.batch, "generations": args.generations, "completion_tokens": args.tokens,
              "probe_layer": probe.layer, "threads": args.threads, "rounds": args.rounds, "steps_per_run": args.steps,
              "machine": platform.machine(), "cpus": os.cpu_count(), "seconds": round(time.perf_counter() - t0, 1)}
    publish("grpo_step", result, summary)


if __name__ == "__main__":
    main()
