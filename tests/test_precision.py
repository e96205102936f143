"""The matmul precision of inference: resolving "auto", autocast, and sampling under it."""

from __future__ import annotations

import pytest
import torch

from probe_dpo import precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_on_gpus_and_on_cpus_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve("auto", "cuda:0") == "bfloat16"
    assert precision.resolve("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")
    assert precision.resolve("float32", "cuda") == "float32"  # an explicit choice is kept
    assert precision.resolve("bfloat16", "cpu") == "bfloat16"


def test_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with precision.autocast("bfloat16", "cpu"):
        y = layer(x)
    with precision.autocast("float32", "cpu"):
        z = layer(x)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32 and layer.weight.dtype == torch.float32
    assert torch.allclose(y.float(), z, atol=0.05) and not torch.equal(y.float(), z)


def test_sampling_runs_at_the_settings_precision(tiny_model_dir):
    """The forward passes of ``generate`` see bfloat16 matmuls only when the settings ask for it,
    and a bf16 sampler is as reproducible as an fp32 one."""
    from probe_dpo.generation import GenerationSettings, generate
    from probe_dpo.model import load_model, load_tokenizer

    lm, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    seen: list[torch.dtype] = []
    hook = lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    prompts = ["The weather today is", "My neighbour said that", "Hello"]
    outs = {}
    for dtype in ("float32", "bfloat16", "bfloat16"):
        seen.clear()
        outs.setdefault(dtype, []).append(generate(lm, prompts, 2, GenerationSettings(max_new_tokens=6, dtype=dtype),
                                                   seed=3, tokenizer=tok, progress=False))
        assert seen and set(seen) == {getattr(torch, dtype)}
    hook.remove()
    assert outs["bfloat16"][0] == outs["bfloat16"][1]
    assert next(lm.parameters()).dtype == torch.float32  # the caller's model is untouched
