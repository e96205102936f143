"""The trainers as a library, without Ray: ``from probe_dpo import ProbeDPOTrainer`` in a plain TRL
script under ``accelerate launch`` (``examples/trl_probe_dpo.py``), and with ``probe_weight=0``
exactly TRL's ``DPOTrainer``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trl_probe_dpo.py"
PAIRS = [{"prompt": "Say something:", "chosen": " thank you, friend", "rejected": " you stupid idiot"},
         {"prompt": "Reply:", "chosen": " the garden is lovely", "rejected": " shut up, moron"},
         {"prompt": "Answer me:", "chosen": " happy to help", "rejected": " go away, loser"},
         {"prompt": "Tell me:", "chosen": " music makes the day", "rejected": " I hate you all"}]
# TRL flags of both runs: CPU fp32 (TRL's configs default to bf16 and gradient checkpointing)
COMMON = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
          "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32", "--logging_steps", "1",
          "--learning_rate", "1e-3", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def assets(tiny_model_dir, tmp_path_factory):
    """A one-probe set on the tiny model's layer 1 (a fixed random direction) and four pairs."""
    from probe_dpo.data import write_records
    from probe_dpo.probes import ProbeSet
    from probe_dpo.probes.probe import LinearProbe

    root = tmp_path_factory.mktemp("trl-example")
    gen = torch.Generator().manual_seed(0)
    d = 64
    probe = LinearProbe(torch.randn(d, generator=gen) / d ** 0.5, 0.0, torch.zeros(d), torch.ones(d), layer=1,
                        name="train-L1")
    ProbeSet([probe]).save(str(root / "probes"))
    write_records(PAIRS, str(root / "pairs.jsonl"))
    return {"model": str(tiny_model_dir), "probes": str(root / "probes"), "pairs": str(root / "pairs.jsonl"),
            "root": root}


def test_import_probe_dpo_is_light_and_the_trainers_load_on_first_use():
    code = ("import sys, probe_dpo\n"
            "heavy = [m for m in ('torch', 'trl', 'transformers', 'ray') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert {'ProbeDPOConfig', 'ProbeDPOTrainer', 'ProbeSFTConfig', 'ProbeSFTTrainer'} <= set(dir(probe_dpo))\n"
            "print(probe_dpo.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(ROOT / "probe_dpo" / "__init__.py")
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from probe_dpo import ProbeDPOConfig, ProbeDPOTrainer, ProbeSFTConfig, ProbeSFTTrainer
    from probe_dpo.training import trainers

    assert issubclass(ProbeDPOConfig, DPOConfig) and issubclass(ProbeDPOTrainer, DPOTrainer)
    assert issubclass(ProbeSFTConfig, SFTConfig) and issubclass(ProbeSFTTrainer, SFTTrainer)
    assert ProbeDPOTrainer is trainers.ProbeDPOTrainer
    with pytest.raises(AttributeError):
        import probe_dpo

        probe_dpo.NoSuchThing


def test_example_under_accelerate_launch_trains_with_the_probe_penalty(assets, tmp_path):
    """``accelerate launch --cpu --num_processes 2 examples/trl_probe_dpo.py``: it trains, saves,
    and the loss it logs is DPO's + λ · the logged probe penalty."""
    out = tmp_path / "out"
    # two CPU processes (gloo): the logged loss and probe_penalty are both means over the processes
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "2",
           "--num_machines", "1", "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLE),
           "--model_name_or_path", assets["model"], "--pairs", assets["pairs"], "--output_dir", str(out),
           "--probe_path", assets["probes"], "--probe_weight", "2.0", "--probe_form", "logit", *COMMON]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all("probe_penalty" in h for h in steps)
    # step 1: the policy IS the reference, so DPO's sigmoid loss is log 2; the rest is λ · penalty
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2) + 2.0 * first["probe_penalty"], abs=2e-4)
    assert abs(first["probe_penalty"]) > 1e-3  # a logit-form penalty on a random direction is not 0
    # the trained weights moved (lr 1e-3 over two steps)
    from safetensors.torch import load_file

    trained, base = load_file(str(out / "model.safetensors")), load_file(os.path.join(assets["model"],
                                                                                     "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(trained[name], base[name])


def test_probe_weight_zero_is_trl_dpo_and_the_penalty_is_read_from_the_config(assets, tmp_path):
    """The same CLI flags through TrlParser: probe_weight=0 trains exactly DPOTrainer's run (same
    losses, same weights); probe_weight > 0 loads the probe set named by probe_path."""
    from trl import DPOConfig, DPOTrainer, TrlParser

    from probe_dpo import ProbeDPOConfig, ProbeDPOTrainer
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.probes import ProbeSet

    torch.set_num_threads(1)
    from datasets import Dataset

    data = Dataset.from_list(PAIRS)
    tok = load_tokenizer(assets["model"])
    flags = ["--output_dir", str(tmp_path / "probe"), "--probe_path", assets["probes"], "--probe_form", "bce",
             "--probe_aggregation", "max", *COMMON]
    (probe_args,) = TrlParser((ProbeDPOConfig,)).parse_args_and_config(flags + ["--probe_weight", "0"])
    (plain_args,) = TrlParser((DPOConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path / "plain"), *COMMON])
    assert (probe_args.probe_weight, probe_args.probe_form, probe_args.probe_aggregation) == (0.0, "bce", "max")

    runs = {}
    for name, cls, args in (("probe", ProbeDPOTrainer, probe_args), ("plain", DPOTrainer, plain_args)):
        trainer = cls(model=load_model(assets["model"]), ref_model=load_model(assets["model"]), args=args,
                      train_dataset=data, processing_class=tok)
        trainer.train()
        runs[name] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                      {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        if name == "probe":
            assert trainer._penalty is None  # λ = 0: no probe loaded, no hook
    assert runs["probe"][0] == runs["plain"][0] and len(runs["plain"][0]) == 2
    for key, value in runs["plain"][1].items():
        assert torch.equal(runs["probe"][1][key], value), key

    # λ > 0: the trainer reads the penalty from its args and loads probe_path's train probes
    (on,) = TrlParser((ProbeDPOConfig,)).parse_args_and_config(flags + ["--probe_weight", "0.5",
                                                                        "--probe_tokens", "chosen"])
    trainer = ProbeDPOTrainer(model=load_model(assets["model"]), ref_model=load_model(assets["model"]), args=on,
                              train_dataset=data, processing_class=tok)
    penalty = trainer._penalty
    assert (penalty.weight, penalty.form, penalty.aggregation, penalty.tokens) == (0.5, "bce", "max", "chosen")
    assert [p.name for p in penalty.recorder.probes] == [p.name for p in ProbeSet.load(assets["probes"]).train_probes]


def test_penalty_settings_errors(assets, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from probe_dpo import ProbeDPOConfig, ProbeDPOTrainer
    from probe_dpo.errors import UserError
    from probe_dpo.model import load_model, load_tokenizer

    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(ValueError, match="probe_form must be one of"):
        ProbeDPOConfig(probe_form="probability", **base)
    with pytest.raises(ValueError, match="probe_weight must be >= 0"):
        ProbeDPOConfig(probe_weight=-1, **base)
    data, tok = Dataset.from_list(PAIRS), load_tokenizer(assets["model"])
    model = load_model(assets["model"])
    with pytest.raises(UserError, match="needs the probes: set probe_path"):
        ProbeDPOTrainer(model=model, ref_model=load_model(assets["model"]), args=ProbeDPOConfig(probe_weight=1, **base),
                        train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="pass args=ProbeDPOConfig"):
        ProbeDPOTrainer(model=model, ref_model=load_model(assets["model"]), args=DPOConfig(**base),
                        train_dataset=data, processing_class=tok, probes=[])
