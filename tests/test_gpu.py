"""The GPU paths, for real, on one CUDA GPU: bf16 extraction, probe fitting, generation, and DPO
steps under DeepSpeed ZeRO-2 and ZeRO-3 on NCCL through the Ray Train entry point.

Every test here is marked ``gpu`` and skipped without CUDA (the conftest hook and the
``skipif`` below), so on the CPU machines this project is developed on they are collected and
skipped, never faked. ``benchmarks/gpu_check.sh`` runs them on a GPU box.

Tolerances for bf16 against fp32. bf16 keeps 8 significant bits (unit roundoff
u = 2^-8 ~ 3.9e-3); matmuls accumulate in fp32 on both CPU and GPU, so the error of a pooled
hidden state is a few u per layer, growing with depth. Measured on CPU (bf16 vs fp32, same
inputs as below): the tiny 2-layer model 4.6e-3 / 6.4e-3 relative L2 error per row
(cosine >= 0.99998); SmolLM2-135M 5e-3 at layer 0, 1.0e-2 at layer 18 and 4.8e-2 at its last
layer 29 (cosine >= 0.9992). GPU kernels (SDPA attention, cuBLAS split-K) sum in another
order, so the bounds are 3-5x those measurements: a wrong dtype or device path (fp16
overflow, features left in bf16, a skipped layer) is off by far more.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from test_probes import labelled_records
from test_training import _cfg, inputs  # noqa: F401 - `inputs` is a module fixture (probes on the tiny model)

from probe_dpo import activations as A
from probe_dpo import storage
from probe_dpo.config import load_config
from probe_dpo.data import write_records
from probe_dpo.generation import GenerationSettings, generate
from probe_dpo.model import load_model, load_tokenizer, source_dtype
from probe_dpo.probes import ProbeTrainConfig, train_probes
from probe_dpo.training import TrainConfig, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["The weather today is", "You are such a", "Once upon a time there was a", "Hi",
           "A long prompt about the history of the Roman empire and its many emperors, who", "Why"]
COMPLETIONS = [" sunny and warm.", " wonderful friend!", " princess", "", " ruled for years.", " not?"]

# model -> (layers, max relative L2 error per row, min cosine); see the module docstring
TOLERANCE = {"tiny": ([0, 1], 3e-2, 0.9995), "smollm2": ([0, 6, 18, 29], 0.15, 0.995)}


def _model_path(name: str, tiny_model_dir: Path) -> str:
    if name == "tiny":
        return str(tiny_model_dir)
    from probe_dpo.testbed import smollm2_dir

    return str(smollm2_dir())


def _assert_close_to_fp32(got: torch.Tensor, want: torch.Tensor, max_rel: float, min_cos: float) -> None:
    rel = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1).min().item()
    assert rel <= max_rel and cos >= min_cos, f"relative error {rel:.3g} (<= {max_rel}), cosine {cos:.6f}"


@pytest.fixture(scope="module")
def cpu_features(tiny_model_dir):
    """The reference, fp32 extraction on CPU: ``cpu_features(name)[layer]``, computed when a test
    first asks for that model (a box without the smollm2 GGUF deselects its tests and never loads it)."""

    @functools.cache
    def features(name: str) -> dict[int, torch.Tensor]:
        path = _model_path(name, tiny_model_dir)
        return A.extract(load_model(path), load_tokenizer(path), prompts=PROMPTS, completions=COMPLETIONS,
                         layers=TOLERANCE[name][0])

    return features


@pytest.mark.parametrize("name", list(TOLERANCE))
def test_bf16_extraction_on_gpu_matches_cpu_fp32(name, tiny_model_dir, cpu_features):
    """The model runs in bf16 on the GPU; pooling (and so every probe's input) is fp32 on CPU."""
    layers, max_rel, min_cos = TOLERANCE[name]
    path = _model_path(name, tiny_model_dir)
    model = load_model(path, dtype="bfloat16", device="cuda")
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    stats: dict = {}
    feats = A.extract(model, load_tokenizer(path), prompts=PROMPTS, completions=COMPLETIONS, layers=layers,
                      batch_size=4, stats=stats)
    assert stats["empty_spans"] == 1  # the "" completion: its last prompt token stands in, as on CPU
    for layer in layers:
        got = feats[layer]
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == cpu_features(name)[layer].shape
        assert torch.isfinite(got).all()
        _assert_close_to_fp32(got, cpu_features(name)[layer], max_rel, min_cos)


def test_sharded_extraction_on_a_gpu_actor_writes_float32_shards(tiny_model_dir, ray_cluster, tmp_path,
                                                                 cpu_features):
    """A Ray actor holding one GPU (num_gpus=1) extracts in bf16; its safetensors shards hold fp32."""
    out = str(tmp_path / "acts")
    manifest = A.extract_sharded(str(tiny_model_dir), out, prompts=PROMPTS, completions=COMPLETIONS, layers=[0, 1],
                                 batch_size=4, shard_size=4, actors=1, use_gpu=True, dtype="bfloat16", load=False)
    meta = manifest["metadata"]
    assert meta["dtype"] == "bfloat16" and meta["run"]["use_gpu"] is True and meta["run"]["device"] == "cuda"
    shards = sorted(n for n in storage.list_dir(out) if n.endswith(".safetensors"))
    assert len(shards) == 2
    for shard in shards:  # the files as written, not as load_activations hands them back
        tensors = load_bytes(storage.read_bytes(storage.join(out, shard)))
        assert {k: t.dtype for k, t in tensors.items()} == {"layer.0": torch.float32, "layer.1": torch.float32}
    feats, _ = A.load_activations(out)
    _, max_rel, min_cos = TOLERANCE["tiny"]
    for layer in (0, 1):
        assert feats[layer].dtype == torch.float32
        _assert_close_to_fp32(feats[layer], cpu_features("tiny")[layer], max_rel, min_cos)


def test_probes_fit_on_gpu_from_bf16_features(tiny_model_dir, tmp_path):
    """``train_probes(device=cuda, dtype=bfloat16)``: extraction in bf16, the fit on the GPU in fp64,
    the saved probes fp32; the per-layer validation AUROC agrees with the all-CPU fp32 run."""
    files = {}
    for split, (n, seed) in {"train": (40, 1), "val": (20, 2)}.items():
        files[split] = str(tmp_path / f"{split}.jsonl")
        write_records(labelled_records(n, seed), files[split])
    results = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        cfg = load_config(ProbeTrainConfig, None, ["train_probe.kind=layers", "train_probe.layers=[0,1]",
                                                   f"device={device}", f"dtype={dtype}"])
        results[device] = train_probes(cfg, model=str(tiny_model_dir), train=files["train"], val=files["val"],
                                       out=str(tmp_path / f"probes-{device}"))
    for probe in results["cuda"].probeset.probes:
        assert probe.weight.dtype == torch.float32 and probe.weight.device.type == "cpu"
        assert torch.isfinite(probe.weight).all()
    # 60 validation rows (~15 positives): one swapped pair of close scores moves AUROC by ~1/(pos*neg)
    # ~ 1e-3, and C is picked from the same grid; 0.05 is dozens of swapped pairs
    for layer in ("0", "1"):
        cpu, gpu = (results[d].report["sweep"][layer]["val_auroc"] for d in ("cpu", "cuda"))
        assert abs(gpu - cpu) <= 0.05, (layer, cpu, gpu)


def test_generation_on_gpu_is_seeded():
    """``generate`` on a bf16 model on the GPU: [prompts][k] strings, the same for the same seed."""
    from probe_dpo.testbed import smollm2_dir

    path = str(smollm2_dir())
    model, tok = load_model(path, dtype="bfloat16", device="cuda"), load_tokenizer(path)
    settings = GenerationSettings(max_new_tokens=12, batch_size=8)
    prompts = PROMPTS[:5]
    first = generate(model, prompts, 3, settings, seed=7, tokenizer=tok, progress=False)
    assert len(first) == len(prompts) and all(len(row) == 3 and all(isinstance(c, str) for c in row) for row in first)
    assert any(c.strip() for row in first for c in row)
    assert generate(model, prompts, 3, settings, seed=7, tokenizer=tok, progress=False) == first
    assert generate(model, prompts, 3, settings, seed=8, tokenizer=tok, progress=False) != first
    assert next(model.parameters()).is_cuda and not model.training


def _finite_loss(metrics: dict) -> None:
    """The run's mean loss and its first and last logged step losses are numbers (bf16 did not overflow)."""
    for key in ("train_loss", "first_loss", "last_loss"):
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)


def test_probe_dpo_zero2_on_one_gpu(inputs, ray_cluster, tmp_path):  # noqa: F811 - the imported fixture
    """Sampling on a GPU actor, probe-ranked pairs, DPO + probe penalty under ZeRO-2 on NCCL in bf16;
    the policy is published in the base model's dtype (fp32 here)."""
    out = str(tmp_path / "zero2")
    cfg = _cfg(inputs, out, "method=probe-dpo", "penalty.weight=0.5", "train.max_steps=2", "train.lr=1e-3",
               "distributed.use_gpu=true", "distributed.workers=1", "distributed.zero_stage=2",
               "sampling.actors=1", "data.max_prompts=6",
               # the pairs' diagnostic judge scores: VADER (a lexicon) rather than the default Keras
               # classifier, so a GPU box given only the runtime packages needs no Keras or its weights
               "judge=vader-negative")
    summary = train(cfg)
    m = summary["rounds"][0]["train"]
    assert m["global_step"] == 2 and m["dtype"] == "bfloat16", m
    _finite_loss(m)
    assert math.isfinite(m["first_probe_penalty"]) and m["first_probe_penalty"] > 0
    policy = load_file(str(Path(out) / "policy" / "model.safetensors"))
    base = load_file(str(Path(inputs["model"]) / "model.safetensors"))
    assert source_dtype(inputs["model"]) == "float32" and source_dtype(f"{out}/policy") == "float32"
    assert {t.dtype for t in policy.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in policy.values())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(policy[name], base[name])  # two steps moved the weights


@pytest.fixture
def bf16_model_dir(tiny_model_dir, tmp_path) -> str:
    """The tiny model saved in bf16: its policy must come back in bf16."""
    path = tmp_path / "tiny-bf16"
    load_model(tiny_model_dir, dtype="bfloat16").save_pretrained(str(path))
    load_tokenizer(tiny_model_dir).save_pretrained(str(path))
    return str(path)


def test_dpo_zero3_on_one_gpu_keeps_a_bf16_source_in_bf16(bf16_model_dir, ray_cluster, tmp_path):
    pairs = str(tmp_path / "pairs.jsonl")
    write_records([{"prompt": f"Say {i}:", "chosen": " thank you friend", "rejected": " you idiot"} for i in range(4)],
                  pairs)
    out = str(tmp_path / "zero3")
    cfg = load_config(TrainConfig, None, [f"model={bf16_model_dir}", "method=dpo", f"data.pairs={pairs}",
                                          f"out={out}", "train.batch_size=2", "train.max_length=48",
                                          "train.max_steps=2", "train.lr=1e-3", "distributed.use_gpu=true",
                                          "distributed.workers=1", "distributed.zero_stage=3"])
    m = train(cfg)["rounds"][0]["train"]
    assert m["global_step"] == 2 and m["dtype"] == "bfloat16", m
    _finite_loss(m)
    assert m["parameter_elements_held_at_load"] == m["parameter_elements"]  # world size 1: one shard is all
    assert source_dtype(bf16_model_dir) == "bfloat16" and source_dtype(f"{out}/policy") == "bfloat16"
    policy = load_file(str(Path(out) / "policy" / "model.safetensors"))
    base = load_file(str(Path(bf16_model_dir) / "model.safetensors"))
    assert {t.dtype for t in policy.values()} == {torch.bfloat16}
    assert sum(t.numel() for t in policy.values()) == sum(t.numel() for t in base.values())  # gathered whole
    assert all(torch.isfinite(t.float()).all() for t in policy.values())
