"""Scale on paper: what this CPU box measures with the real SmolLM2-135M, and GPU estimates.

No GPU is available here, so this script does two separate things and labels them:

1. **measured (CPU, 135M)**: with the real SmolLM2-135M-Instruct (fp32, plain PyTorch, one
   torch thread by default), on real text from the testbed (token ids packed so every sequence is
   exactly ``--length`` tokens, no padding):
   - extraction: the decoder body's forward pass with hidden states (what an extraction actor
     runs; no LM head), batch ``--extract-batch``; tokens/s.
   - SFT step: forward + backward + AdamW step, batch ``--batch`` x ``--length``; seconds/step.
   - DPO step: policy forward + backward on chosen and rejected (2 x batch sequences), a frozen
     reference model's forward on both, the DPO loss on the second half of each sequence
     (the "completion"), AdamW step; seconds/step.
   The box is shared with other jobs, so the primary number is the CPU time the work consumed
   (stable under load, single-core with one thread); wall times are recorded as well.
   From these, the achieved FLOP per CPU-second under the usual counts (forward 2*N*tokens, training
   6*N*tokens, DPO 6*N*policy tokens + 2*N*reference tokens) and how well the 3x rule
   (train ~ 3 x forward per token, here 3 x N_train/N_body) holds on real hardware.
2. **estimate**: per-GPU extraction tokens/s and fine-tuning step times for a 1B and an 8B
   Llama-class model on H100 SXM (p5.48xlarge: 8 GPUs/node), from the FLOP counts, a roofline
   for extraction (min of compute and weight-streaming bandwidth), an assumed MFU for training,
   and ZeRO-2 / ZeRO-3 communication volumes over NVLink (1 node) or EFA (2+ nodes). Every
   assumption is a named constant below and is written into the JSON.

Prints ``RESULT {json}`` last and writes benchmarks/results/scale.json.

    .venv/bin/python benchmarks/scale.py [--reps 2] [--batch 4] [--length 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _bench import RESULTS, publish  # noqa: E402 - sets the offline environment first

if TYPE_CHECKING:  # torch is imported late, after _bench has set the offline environment
    import torch

# --- GPU assumptions (estimates only) --------------------------------------------------------
H100_BF16_DENSE_FLOPS = 989e12      # H100 SXM bf16 dense peak (no sparsity)
H100_HBM_BYTES_PER_S = 3.35e12      # H100 SXM HBM3 bandwidth
EXTRACT_MFU = 0.50                  # large-batch inference forward, no KV cache, seq 512
TRAIN_MFU = (0.30, 0.40)            # assumed model-FLOP utilisation range for training
NVLINK_BUS_BYTES_PER_S = 360e9      # per-GPU NCCL bus bandwidth inside a p5 node (NVLink 4)
EFA_NODE_BYTES_PER_S = 3200e9 / 8   # p5.48xlarge EFA: 3200 Gbit/s per node
EFA_EFFICIENCY = 0.8                # share of EFA line rate NCCL reaches
GPUS_PER_NODE = 8
GPU_TOKENS_PER_STEP = 8 * 512       # per GPU per optimizer step (e.g. 8 sequences x 512 tokens)
EXTRACT_TOKENS_PER_PASS = 32 * 512  # extraction batch: 32 sequences x 512 tokens

# Matmul parameters (embeddings are lookups: not counted in the forward FLOPs; an LM head is).
MODELS = {
    # Llama-3.2-1B: 1.236B total, tied 128256 x 2048 embedding (262.7M).
    "1B (Llama-3.2-1B)": {"total": 1.236e9, "body": 0.973e9, "head": 0.263e9},
    # Llama-3.1-8B: 8.03B total, untied 128256 x 4096 input and output embeddings (525M each).
    "8B (Llama-3.1-8B)": {"total": 8.03e9, "body": 6.98e9, "head": 0.525e9},
}


def packed_batches(tok, n_seqs: int, length: int) -> "torch.Tensor":
    """``n_seqs`` x ``length`` token ids from real text, packed end to end (no padding)."""
    import torch

    texts = []
    data = Path("/tmp/tb/data")
    if (data / "probe_train.jsonl").exists():
        with open(data / "probe_train.jsonl") as f:
            for line in f:
                row = json.loads(line)
                texts.append(str(row.get("prompt", "")) + str(row.get("completion", "")))
    if len(texts) < 50:
        from probe_dpo.testbed import load_rtp_prompts

        texts = [p["prompt"] for p in load_rtp_prompts()]
    ids: list[int] = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n_seqs * length:
            break
    if len(ids) < n_seqs * length:
        ids = (ids * (n_seqs * length // max(1, len(ids)) + 1))
    return torch.tensor(ids[:n_seqs * length]).view(n_seqs, length)


def timed(fn, reps: int) -> dict:
    """Wall and process-CPU seconds of ``reps`` calls after one warm-up call.

    This box is shared with other jobs: wall time swings with their load, so the minimum wall
    time (the least-disturbed run) and the CPU seconds the work itself consumed are reported
    next to the median.
    """
    fn()  # warm-up (allocations, lazy init)
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": wall, "cpu_s": cpu, "min_wall_s": min(wall), "median_wall_s": statistics.median(wall),
            "median_cpu_s": statistics.median(cpu)}


def measure(model_dir: str, reps: int, batch: int, length: int, extract_batch: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from probe_dpo.model import load_model, load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    n_total = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n_body = n_total - n_embed
    n_train = n_body + n_embed  # the LM head matmul (tied: same weights as the embedding)

    x_ext = packed_batches(tok, extract_batch, length)
    model.eval()

    def extract():
        with torch.inference_mode():
            model.model(input_ids=x_ext, output_hidden_states=True)

    ext_s = timed(extract, reps)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x_sft = packed_batches(tok, batch, length)

    def sft_step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=x_sft, labels=x_sft)
        out.loss.backward()
        opt.step()

    sft_s = timed(sft_step, reps)

    ref = load_model(model_dir).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    pairs = packed_batches(tok, 2 * batch, length)  # first half: chosen, second half: rejected
    half = length // 2

    def seq_logp(m, ids):
        logits = m(input_ids=ids).logits[:, half - 1:-1].float()
        return torch.gather(F.log_softmax(logits, -1), 2, ids[:, half:, None]).squeeze(-1).sum(-1)

    def dpo_step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ref_lp = seq_logp(ref, pairs)
        pol_lp = seq_logp(model, pairs)
        margin = (pol_lp[:batch] - ref_lp[:batch]) - (pol_lp[batch:] - ref_lp[batch:])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
        opt.step()

    dpo_s = timed(dpo_step, reps)

    ext_tokens, sft_tokens, dpo_tokens = extract_batch * length, batch * length, 2 * batch * length
    ext_cpu, sft_cpu, dpo_cpu = ext_s["median_cpu_s"], sft_s["median_cpu_s"], dpo_s["median_cpu_s"]
    return {
        "model": {"dir": model_dir, "parameters": n_total, "embedding": n_embed, "tied_head": tied,
                  "body_matmul_params": n_body, "train_matmul_params": n_train},
        "primary_metric": "CPU seconds the work consumed (process_time): stable under other jobs' load, "
                          "unlike wall time; with 1 torch thread it is single-core time",
        "extraction": {"label": "measured (CPU, 135M)", "batch": extract_batch, "length": length, **ext_s,
                       "tokens_per_cpu_s": ext_tokens / ext_cpu, "tokens_per_wall_s_best": ext_tokens / ext_s["min_wall_s"],
                       "gflop_per_cpu_s": 2 * n_body * ext_tokens / ext_cpu / 1e9},
        "sft_step": {"label": "measured (CPU, 135M)", "batch": batch, "length": length, **sft_s,
                     "tokens_per_cpu_s": sft_tokens / sft_cpu,
                     "gflop_per_cpu_s": 6 * n_train * sft_tokens / sft_cpu / 1e9},
        "dpo_step": {"label": "measured (CPU, 135M)", "pairs": batch, "length": length, **dpo_s,
                     "gflop_per_cpu_s": (6 + 2) * n_train * dpo_tokens / dpo_cpu / 1e9},
        # Per token, 6*N_train (train) / 2*N_body (forward) predicts this ratio; the box shows:
        "train_over_forward_cpu_per_token": (sft_cpu / sft_tokens) / (ext_cpu / ext_tokens),
        "train_over_forward_predicted": 6 * n_train / (2 * n_body),
        "flop_model_check": "train/forward CPU time per token, measured vs predicted by the FLOP counts",
    }


def comm_bytes_per_gpu(n_params: float, stage: int) -> float:
    """Bytes each GPU sends per optimizer step (bf16 params/grads, ring collectives).

    ZeRO-2: reduce-scatter of gradients + all-gather of updated parameters = 2 x 2N bytes.
    ZeRO-3: parameters all-gathered in forward and again in backward + gradient reduce-scatter
    = 3 x 2N bytes (the ZeRO paper's 1.5x of data parallelism).
    """
    return (2 if stage == 2 else 3) * 2 * n_params


def bandwidth_per_gpu(nodes: int) -> float:
    if nodes == 1:
        return NVLINK_BUS_BYTES_PER_S
    return EFA_NODE_BYTES_PER_S * EFA_EFFICIENCY / GPUS_PER_NODE


def estimate() -> dict:
    out = {}
    for name, m in MODELS.items():
        body, train_n = m["body"], m["body"] + m["head"]
        compute_bound = EXTRACT_MFU * H100_BF16_DENSE_FLOPS / (2 * body)
        # One pass streams the bf16 weights once: with EXTRACT_TOKENS_PER_PASS tokens per pass
        # the bandwidth bound is far above the compute bound (so compute bound it is).
        bandwidth_bound = H100_HBM_BYTES_PER_S / (2 * body) * EXTRACT_TOKENS_PER_PASS
        per_gpu = min(compute_bound, bandwidth_bound)
        row = {"label": "estimate", "extraction_tokens_per_s_per_gpu": per_gpu,
               "extraction_compute_bound": compute_bound, "extraction_bandwidth_bound": bandwidth_bound,
               "extraction_tokens_per_s_by_nodes": {n: per_gpu * n * GPUS_PER_NODE for n in (1, 2, 4)},
               "training": {}}
        for kind, factor in (("sft", 6), ("dpo", 8)):
            flops = factor * train_n * GPU_TOKENS_PER_STEP
            compute = [flops / (mfu * H100_BF16_DENSE_FLOPS) for mfu in reversed(TRAIN_MFU)]
            for stage in (2, 3):
                for nodes in (1, 2, 4):
                    comm = comm_bytes_per_gpu(train_n, stage) / bandwidth_per_gpu(nodes)
                    # Full overlap of communication with compute .. none at all.
                    lo, hi = max(compute[0], comm), compute[1] + comm
                    gpus = nodes * GPUS_PER_NODE
                    row["training"][f"{kind}_zero{stage}_{nodes}node"] = {
                        "step_s": [lo, hi], "compute_s": compute, "comm_s": comm,
                        "cluster_tokens_per_s": [gpus * GPU_TOKENS_PER_STEP / hi, gpus * GPU_TOKENS_PER_STEP / lo]}
        # Per-GPU memory for full fine-tuning with bf16 weights + fp32 Adam (16 bytes/param):
        g = GPUS_PER_NODE
        row["memory_gib_per_gpu_8gpus"] = {
            "zero2": (2 * m["total"] + 14 * m["total"] / g) / 2**30,
            "zero3": 16 * m["total"] / g / 2**30,
            "zero3_offload_optimizer": 4 * m["total"] / g / 2**30,
        }
        out[name] = row
    return out


def markdown_table(result: dict) -> str:
    """The README's "Scale on paper" tables from a result JSON (every row labelled)."""
    m, est, a = result["measured_cpu_135m"], result["estimates_h100"], result["assumptions"]
    ext, sft, dpo = m["extraction"], m["sft_step"], m["dpo_step"]
    t = result["setup"]["threads"]
    label = "measured (CPU, 135M)"
    rows = ["| quantity (SmolLM2-135M, fp32, %d torch thread) | value | label |" % t, "| --- | --- | --- |",
            f"| extraction, batch {ext['batch']} x {ext['length']} tokens | {ext['tokens_per_cpu_s']:.0f} tokens per "
            f"CPU-second ({ext['gflop_per_cpu_s']:.1f} GFLOP/s at 2N FLOP/token) | {label} |",
            f"| SFT step, {sft['batch']} x {sft['length']} tokens | {sft['median_cpu_s']:.1f} CPU-seconds "
            f"({sft['gflop_per_cpu_s']:.1f} GFLOP/s at 6N) | {label} |",
            f"| DPO step, {dpo['pairs']} pairs x {dpo['length']} tokens, with reference forward | "
            f"{dpo['median_cpu_s']:.1f} CPU-seconds ({dpo['gflop_per_cpu_s']:.1f} GFLOP/s at 8N) | {label} |",
            f"| train / forward cost per token | {m['train_over_forward_cpu_per_token']:.1f}x (FLOP counts predict "
            f"{m['train_over_forward_predicted']:.1f}x) | {label} |",
            "",
            "| model | quantity (H100 SXM, bf16) | per GPU | 1 node (8 GPUs) | 2 nodes (16) | 4 nodes (32) | label |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in est.items():
        by = {int(k): v for k, v in r["extraction_tokens_per_s_by_nodes"].items()}
        rows.append(f"| {name} | extraction tokens/s | {r['extraction_tokens_per_s_per_gpu'] / 1e3:.0f}k | "
                    + " | ".join(f"{by[n] / 1e6:.2f}M" for n in (1, 2, 4)) + " | estimate |")
        for kind in ("sft", "dpo"):
            for stage in (2, 3):
                runs = [r["training"][f"{kind}_zero{stage}_{n}node"] for n in (1, 2, 4)]
                c_lo, c_hi = runs[0]["compute_s"]
                cells = [f"{x['step_s'][0]:.2f}-{x['step_s'][1]:.2f} s ({x['cluster_tokens_per_s'][0] / 1e3:.0f}k-"
                         f"{x['cluster_tokens_per_s'][1] / 1e3:.0f}k tok/s)" for x in runs]
                rows.append(f"| {name} | {kind.upper()} step, ZeRO-{stage} | {c_lo:.2f}-{c_hi:.2f} s compute | "
                            + " | ".join(cells) + " | estimate |")
    rows += ["", f"Training rows: {a['gpu_tokens_per_step']} tokens per GPU per optimizer step (DPO: chosen + "
             f"rejected), MFU {a['train_mfu_range'][0]:.0%}-{a['train_mfu_range'][1]:.0%} of "
             f"{a['h100_bf16_dense_flops'] / 1e12:.0f} TFLOP/s; a step time range runs from full overlap of "
             "communication with compute to none; tok/s is the whole cluster's."]
    return "\n".join(rows)

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="SFT sequences / DPO pairs per step")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--extract-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="model folder (default: /tmp/tb/model or the cached SmolLM2)")
    ap.add_argument("--table", action="store_true", help="print the README tables from the last results and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads((RESULTS / "scale.json").read_text())))
        return 0

    import torch

    model_dir = args.model or ("/tmp/tb/model" if Path("/tmp/tb/model/config.json").exists() else None)
    if model_dir is None:
        from probe_dpo.testbed import smollm2_dir

        model_dir = str(smollm2_dir())
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    measured = measure(model_dir, args.reps, args.batch, args.length, args.extract_batch, args.threads)
    result = {
        "name": "scale",
        "measured_cpu_135m": measured,
        "estimates_h100": estimate(),
        "assumptions": {
            "h100_bf16_dense_flops": H100_BF16_DENSE_FLOPS, "h100_hbm_bytes_per_s": H100_HBM_BYTES_PER_S,
            "extract_mfu": EXTRACT_MFU, "train_mfu_range": TRAIN_MFU,
            "nvlink_bus_bytes_per_s_per_gpu": NVLINK_BUS_BYTES_PER_S,
            "efa_node_bytes_per_s": EFA_NODE_BYTES_PER_S, "efa_efficiency": EFA_EFFICIENCY,
            "gpus_per_node": GPUS_PER_NODE, "gpu_tokens_per_step": GPU_TOKENS_PER_STEP,
            "extract_tokens_per_pass": EXTRACT_TOKENS_PER_PASS, "models": MODELS,
            "flops": "forward 2*N*tokens; SFT 6*N*tokens; DPO 6*N*policy tokens + 2*N*reference tokens",
            "comm": "ZeRO-2 2x2N bytes/GPU/step, ZeRO-3 3x2N; step time between full overlap "
                    "(max(compute, comm)) and none (compute + comm)",
        },
        "setup": {"threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                  "python": platform.python_version(), "reps": args.reps,
                  "load_average_before": load_before, "load_average_after": os.getloadavg(),
                  "wall_s": time.perf_counter() - t0},
    }
    m = measured
    summary = {"extraction_tokens_per_cpu_s_135m": m["extraction"]["tokens_per_cpu_s"],
               "sft_step_cpu_s_135m": m["sft_step"]["median_cpu_s"], "dpo_step_cpu_s_135m": m["dpo_step"]["median_cpu_s"],
               "sft_step_wall_s_best": m["sft_step"]["min_wall_s"], "dpo_step_wall_s_best": m["dpo_step"]["min_wall_s"],
               "gflop_per_cpu_s": {k: m[k]["gflop_per_cpu_s"] for k in ("extraction", "sft_step", "dpo_step")},
               "train_over_forward_cpu_per_token": m["train_over_forward_cpu_per_token"],
               "train_over_forward_predicted": m["train_over_forward_predicted"],
               "threads": args.threads, "load_average_during": result["setup"]["load_average_after"],
               "extraction_tokens_per_s_per_h100_estimate": {k: v["extraction_tokens_per_s_per_gpu"]
                                                             for k, v in result["estimates_h100"].items()}}
    print(markdown_table(result))
    publish("scale", result, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
