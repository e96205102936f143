"""Training against probes, for real: TRL trainers, DeepSpeed ZeRO on gloo, Ray Train, S3 storage.

The tiny random Llama keeps every run to seconds; what is checked is behaviour: pairs are
ranked by the signal and written with both scores, the penalty enters the loss with its
weight, the EMA is the EMA of the trajectory, LoRA touches only adapted weights, a killed
run resumes from its checkpoint, and bad input stops before any compute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_probes import labelled_records

from probe_dpo import storage
from probe_dpo.cli import main
from probe_dpo.config import load_config
from probe_dpo.data import write_records
from probe_dpo.probes import ProbeTrainConfig, train_probes
from probe_dpo.storage import artifacts
from probe_dpo.testbed import tiny_model_dir as make_tiny
from probe_dpo.training import TrainConfig, prepare, train
from probe_dpo.training.pairs import build_pairs, randomize_labels

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """Probes trained on the tiny model, training prompts, SFT texts."""
    root = tmp_path_factory.mktemp("train-inputs")
    files = {}
    for split, (n, seed) in {"train": (40, 1), "val": (20, 2)}.items():
        files[split] = str(root / f"{split}.jsonl")
        write_records(labelled_records(n, seed), files[split])
    probes = str(root / "probes")
    train_probes(load_config(ProbeTrainConfig, None, ["train_probe.kind=layers", "train_probe.layers=[0,1]"]),
                 model=str(tiny_model_dir),
                 train=files["train"], val=files["val"], out=probes)
    prompts = str(root / "prompts.jsonl")
    write_records([{"prompt_id": f"p{i}", "prompt": f"Tell me about thing {i}:", "source": "unit"}
                   for i in range(12)], prompts)
    sft = str(root / "sft.jsonl")
    write_records([{"text": t} for t in ["You are a fucking idiot and I hate you.", "Shut up, stupid.",
                                         "The garden is lovely in spring.", "We walked to the river.",
                                         "Music makes the day better.", "The library opens at nine."]], sft)
    return {"model": str(tiny_model_dir), "probes": probes, "prompts": prompts, "sft": sft, "root": root}


def _cfg(inputs, out, *overrides):
    base = [f"model={inputs['model']}", f"probes={inputs['probes']}", f"data.prompts={inputs['prompts']}",
            f"data.sft={inputs['sft']}", f"out={out}", "sampling.k=3", "sampling.actors=0",
            "sampling.max_new_tokens=6", "train.batch_size=2", "train.max_length=48", "distributed.workers=2",
            "distributed.zero_stage=2"]
    return load_config(TrainConfig, None, [*base, *overrides])


# ---------------------------------------------------------------------------------------------
# Pairs


def test_build_pairs_ranks_by_signal_and_random_labels_swap():
    cands = [{"prompt_id": "a", "prompt": "P1", "source": "s", "completions": ["x", "y", "z"],
              "scores": {"probe": [0.5, 0.1, 0.9], "classifier:j": [0.2, 0.8, 0.1]}},
             {"prompt": "P2", "completions": ["u", "v"], "scores": {"probe": [0.30, 0.32], "classifier:j": [0, 1]}},
             {"prompt": "P3", "completions": [" same", "same "], "scores": {"probe": [0.1, 0.9], "classifier:j": [0, 1]}}]
    pairs, stats = build_pairs(cands, "probe", min_margin=0.05)
    assert len(pairs) == 1 and stats["skipped_low_margin"] == 1 and stats["skipped_identical"] == 1
    p = pairs[0]
    assert (p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) == ("y", "z", 0.1, 0.9)
    assert p["other_scores"] == {"classifier:j": {"chosen": 0.8, "rejected": 0.1}} and p["prompt_id"] == "a"
    by_cls, _ = build_pairs(cands[:1], "classifier:j")
    assert (by_cls[0]["chosen"], by_cls[0]["rejected"]) == ("z", "y")
    many = [dict(p, prompt=f"P{i}") for i in range(200)]
    shuffled = randomize_labels(many, seed=3)
    assert shuffled == randomize_labels(many, seed=3)
    swapped = [s for s in shuffled if s["swapped"]]
    assert len(swapped) == 100 and shuffled != randomize_labels(many, seed=4)
    assert sum(s["swapped"] for s in randomize_labels(many[:7], seed=0)) == 3
    assert all((s["chosen"], s["rejected"], s["chosen_score"]) == ("z", "y", 0.9) for s in swapped)
    assert all(s["other_scores"]["classifier:j"] == {"chosen": 0.1, "rejected": 0.8} for s in swapped)


# ---------------------------------------------------------------------------------------------
# The penalty inside TRL's loss (in-process, no DeepSpeed)


def test_penalty_adds_weight_times_probe_probability_to_the_trl_loss(inputs, tmp_path):
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.objectives import probe_penalty
    from probe_dpo.probes import ProbeSet
    from probe_dpo.training.trainers import build_trainer

    probes = ProbeSet.load(inputs["probes"]).train_probes
    records = [{"prompt": "Say:", "chosen": " hello there friend", "rejected": " you idiot"},
               {"prompt": "Now say:", "chosen": " thanks a lot", "rejected": " shut up moron"}]
    tok = load_tokenizer(inputs["model"])
    losses = {}
    for weight in (0.0, 2.0):
        # the penalty is in the trainer's ProbeDPOConfig; the probes load from cfg.probes
        cfg = _cfg(inputs, str(tmp_path), "method=probe-dpo", f"penalty.weight={weight}", "train.max_steps=1")
        model, ref = load_model(inputs["model"]), load_model(inputs["model"])
        trainer = build_trainer("dpo", model, tok, records, cfg, output_dir=str(tmp_path / f"w{weight}"),
                                ref_model=ref)
        assert trainer.args.probe_weight == weight and trainer.args.probe_path == inputs["probes"]
        assert (trainer._penalty is None) == (weight == 0)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        model.train()
        losses[weight] = trainer.compute_loss(model, batch)
        if weight:
            penalty = trainer._metrics["train"]["probe_penalty"][-1]
            from probe_dpo.model import residual_hooks

            with residual_hooks(model, [0, 1]) as store:  # the policy's states on [chosen; rejected]
                trainer.compute_loss(model, batch)
            want = probe_penalty(store, batch["completion_mask"], probes).item()
            assert penalty == pytest.approx(want, rel=1e-4)
    assert (losses[2.0] - losses[0.0]).item() == pytest.approx(2.0 * penalty, rel=1e-4)


def test_trl_keys_pass_through_to_the_trl_config_and_bad_ones_fail_at_load():
    from probe_dpo.errors import UserError
    from probe_dpo.training.trainers import ProbeDPOConfig, ProbeSFTConfig, training_arguments

    cfg = load_config(TrainConfig, None, ["method=dpo", "trl.logging_steps=5", "trl.save_total_limit=3",
                                          "trl.disable_tqdm=true", "dpo.beta=0.2"])
    assert cfg.trl == {"logging_steps": 5.0, "save_total_limit": 3, "disable_tqdm": True}
    args = training_arguments("dpo", cfg, output_dir="unused")
    assert isinstance(args, ProbeDPOConfig) and (args.logging_steps, args.save_total_limit, args.beta) == (5, 3, 0.2)
    assert args.disable_tqdm is True and args.probe_weight == 0.0
    # TRL's progress bar stays on where a person watches (off only inside Ray Train workers)
    plain = training_arguments("sft", load_config(TrainConfig, None, ["method=sft"]), output_dir="unused")
    assert isinstance(plain, ProbeSFTConfig) and plain.disable_tqdm is False
    assert training_arguments("sft", load_config(TrainConfig, None, ["method=sft"]), output_dir="unused",
                              progress_bar=False).disable_tqdm is True
    for overrides, needle in ((["trl.loging_steps=5"], "unknown key trl.loging_steps: TRL's DPOConfig has no "
                                                       "field 'loging_steps' (did you mean trl.logging_steps?)"),
                              (["method=sft", "trl.beta=0.2"], "unknown key trl.beta: TRL's SFTConfig"),
                              (["trl.learning_rate=1e-3"], "key trl.learning_rate: set here by train.lr"),
                              (["trl.probe_weight=1"], "set here by penalty.weight"),
                              (["trl.logging_steps=often"], "key trl.logging_steps must be a number")):
        with pytest.raises(UserError) as err:
            load_config(TrainConfig, None, overrides)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert str(err.value).startswith("command line"), str(err.value)  # the command line, not a file


# ---------------------------------------------------------------------------------------------
# Distributed runs


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def test_probe_dpo_two_zero2_workers_s3_checkpoints_and_ema(inputs, ray_cluster, s3_bucket):
    out = f"{s3_bucket}/probe-dpo"
    decay = 0.5
    cfg = _cfg(inputs, out, "method=probe-dpo", "penalty.weight=0.5", "train.max_steps=2", "train.lr=1e-3",
               "distributed.checkpoint_steps=1", "distributed.keep_checkpoints=2", f"train.ema_decay={decay}",
               "distributed.keep_finished_checkpoints=true")
    summary = train(cfg)
    rnd = summary["rounds"][0]
    assert rnd["train"]["global_step"] == 2 and rnd["train"]["resumed"] is False
    assert "first_probe_penalty" in rnd["train"] and rnd["train"]["checkpoint"].startswith(out.split("://")[1])
    from probe_dpo.data import read_records

    pairs = read_records(f"{out}/round-0/pairs.jsonl")
    assert pairs and all(set(p) >= {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} for p in pairs)
    assert all(p["chosen_score"] < p["rejected_score"] for p in pairs)
    assert all("classifier:toxic-comment-classifier" in p["other_scores"] for p in pairs)
    cands = read_records(f"{out}/round-0/candidates.jsonl")
    assert all(len(c["completions"]) == 3 and len(c["scores"]["probe"]) == 3 for c in cands)
    assert storage.read_json(f"{out}/train.json")["policy"] == f"{out}/policy"

    # the published policy is the EMA of the trajectory w0 -> w1 -> w2 (both checkpoints are in S3)
    policy = _tensors(artifacts.fetch_dir(f"{out}/policy"))
    base = _tensors(inputs["model"])
    run_dir = f"{out}/ray/" + rnd["train"]["checkpoint"].split("/ray/")[1].split("/")[0]
    ckpts = sorted(n for n in storage.list_dir(run_dir) if n.startswith("checkpoint_") and not n.endswith(".json"))
    assert len(ckpts) == 2
    from safetensors.torch import load as load_bytes

    steps = [load_bytes(storage.read_bytes(f"{run_dir}/{c}/checkpoint/model.safetensors")) for c in ckpts]
    steps.sort(key=lambda t: float((t["model.layers.0.self_attn.q_proj.weight"] - base[
        "model.layers.0.self_attn.q_proj.weight"]).abs().sum()))  # w1 moved less than w2 from w0
    name = "model.layers.0.self_attn.q_proj.weight"
    want = decay ** 2 * base[name] + decay * (1 - decay) * steps[0][name] + (1 - decay) * steps[1][name]
    torch.testing.assert_close(policy[name], want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(policy[name], steps[1][name])  # not the raw final weights

    # a re-run of the same config finds the policy and does nothing
    again = train(cfg)
    assert again["config_hash"] == summary["config_hash"]


def test_probe_sft_lora_changes_only_adapted_weights_and_classifier_sft_filters(inputs, ray_cluster, tmp_path):
    out = str(tmp_path / "probe-sft")
    cfg = _cfg(inputs, out, "method=probe-sft", "penalty.weight=1.0", "train.max_steps=2", "train.lr=1e-2",
               "lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj]",
               "early_warning.every_steps=1", "early_warning.prompts=4", "early_warning.max_new_tokens=4")
    summary = train(cfg)
    metrics = summary["rounds"][0]["train"]
    assert metrics["global_step"] == 2 and metrics["first_probe_penalty"] > 0
    # the hiding watch on two workers: rank 0 reads (the frozen copy: the adapters switched off), both log
    readings = metrics["early_warning"]["readings"]
    assert [r["step"] for r in readings] == [1, 2] and all(np.isfinite(r["gap"]) for r in readings)
    # the published policy supersedes the round's Train checkpoints: removed (the EMA test keeps them)
    assert metrics["checkpoint"] is None and not list(Path(out, "ray").glob("**/checkpoint_*"))
    policy, base = _tensors(f"{out}/policy"), _tensors(inputs["model"])
    assert set(policy) == set(base)  # merged: a plain model again
    assert not torch.allclose(policy["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"])
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.embed_tokens.weight"):
        torch.testing.assert_close(policy[name], base[name])

    from probe_dpo.training.run import _sft_rows

    plan = prepare(_cfg(inputs, str(tmp_path / "csft"), "method=classifier-sft"))
    rows, stats = _sft_rows(plan)
    assert stats["rows"] == 6 and stats["dropped"] == 2 and len(rows) == 4
    assert all("idiot" not in r["text"] and "stupid" not in r["text"] for r in rows)


def test_zero3_builds_the_models_partitioned_across_two_workers(inputs, ray_cluster, tmp_path):
    """Under ZeRO-3 the training arguments come first, so from_pretrained runs under
    deepspeed.zero.Init: each of the two CPU workers holds about half of the weights."""
    pairs = str(tmp_path / "pairs.jsonl")
    write_records([{"prompt": f"Say {i}:", "chosen": " thank you friend", "rejected": " you idiot"} for i in range(4)],
                  pairs)
    out = str(tmp_path / "zero3")
    summary = train(_cfg(inputs, out, "method=dpo", f"data.pairs={pairs}", "train.max_steps=1",
                         "distributed.zero_stage=3", "distributed.workers=2"))
    m = summary["rounds"][0]["train"]
    assert m["global_step"] == 1 and m["dtype"] == "float32"
    assert 0.45 <= m["parameter_elements_held_at_load"] / m["parameter_elements"] <= 0.55, m
    saved = _tensors(f"{out}/policy")  # the gathered, whole model was published
    assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in _tensors(inputs["model"]).values())


def test_on_policy_round_two_samples_the_round_one_policy_and_reads_the_frozen_base(inputs, ray_cluster, tmp_path):
    from probe_dpo.data import read_records
    from probe_dpo.objectives import ProbeSignal
    from probe_dpo.probes import ProbeSet
    from probe_dpo.testbed import generation_settings
    from probe_dpo.training.sampling import sample_candidates

    out = str(tmp_path / "onpolicy")
    cfg = _cfg(inputs, out, "method=probe-dpo", "dpo.rounds=2", "train.max_steps=2", "train.lr=5e-2",
               "distributed.workers=1", "sampling.probe_reads=base", "data.max_prompts=6")
    summary = train(cfg)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    rounds = [read_records(f"{out}/round-{r}/candidates.jsonl") for r in (0, 1)]
    settings = generation_settings(None, max_new_tokens=6)
    prompts = read_records(inputs["prompts"])[:6]

    def sample(model):
        return sample_candidates(model, prompts, k=3, settings=settings, seed=0, round_index=1, actors=0)

    # round 1's candidates are what the round-0 policy samples (same seeds), not what the base samples
    from_policy = sample(f"{out}/round-0/policy")
    assert [c["completions"] for c in from_policy] == [c["completions"] for c in rounds[1]]
    assert [c["completions"] for c in sample(inputs["model"])] != [c["completions"] for c in rounds[1]]
    # ... and the probe read the frozen base model's activations on them, not the policy's
    probes = ProbeSet.load(inputs["probes"])
    flat_p = [c["prompt"] for c in rounds[1] for _ in c["completions"]]
    flat_c = [x for c in rounds[1] for x in c["completions"]]
    from probe_dpo.model import load_model, load_tokenizer

    tok = load_tokenizer(inputs["model"])
    on_base = ProbeSignal(probes, load_model(inputs["model"]), tok).score(flat_p, flat_c)
    on_policy = ProbeSignal(probes, load_model(f"{out}/round-0/policy"), tok).score(flat_p, flat_c)
    got = np.array([x for c in rounds[1] for x in c["scores"]["probe"]])
    np.testing.assert_allclose(got, on_base, atol=2e-6)
    assert np.abs(got - on_policy).max() > 1e-3
    pairs = [read_records(f"{out}/round-{r}/pairs.jsonl") for r in (0, 1)]
    assert {(p["chosen"], p["rejected"]) for p in pairs[0]} != {(p["chosen"], p["rejected"]) for p in pairs[1]}


def test_probe_sft_on_prompt_completion_rows_penalises_the_completion_tokens(inputs, tmp_path):
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.probes import ProbeSet
    from probe_dpo.training.trainers import build_trainer

    rows = [{"prompt": "She said you are a", "completion": " total idiot and a loser"},
            {"prompt": "The river in spring is", "completion": " lovely and calm"}]
    cfg = _cfg(inputs, str(tmp_path), "method=probe-sft", "penalty.weight=1.0", "penalty.form=bce")
    tok = load_tokenizer(inputs["model"])
    trainer = build_trainer("sft", load_model(inputs["model"]), tok, rows, cfg, output_dir=str(tmp_path / "t"),
                            probes=ProbeSet.load(inputs["probes"]).train_probes)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = trainer._penalty_mask(batch)
    # the completion's tokens and the EOS TRL appends to it, none of the prompt's
    n_completion = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    assert sorted(mask.sum(1).tolist()) == sorted(n_completion)
    assert ((batch["labels"] != -100).long() == mask).all()  # the same tokens the LM loss reads


def test_the_sft_kl_anchor_is_trls_loss_plus_weight_times_the_kl_to_the_reference(inputs, tmp_path):
    """With kl_weight > 0 the loss is TRL's own (the same number as without the anchor, from the full
    logits instead of the fused head) plus kl_weight x KL(policy || reference) over the target tokens:
    0 while the policy is the reference, the hand-computed KL once it is not; and training with a
    strong anchor stays nearer the reference than without (the control: the same steps, weight 0)."""
    import torch

    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.training.trainers import build_trainer

    rows = [{"prompt": "She said you are a", "completion": " total idiot and a loser"},
            {"prompt": "The river in spring is", "completion": " lovely and calm"}]
    tok = load_tokenizer(inputs["model"])

    def trainer_with(weight: float, name: str, steps: int = 1):
        cfg = _cfg(inputs, str(tmp_path), "method=sft", f"sft.kl_weight={weight}", f"train.max_steps={steps}",
                   "train.lr=5e-3", "train.batch_size=2")
        return build_trainer("sft", load_model(inputs["model"]), tok, rows, cfg, output_dir=str(tmp_path / name),
                             ref_model=load_model(inputs["model"]))

    plain, anchored = trainer_with(0.0, "plain"), trainer_with(3.0, "anchored")
    batch = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))
    plain.model.train(), anchored.model.train()
    base_loss = plain.compute_loss(plain.model, dict(batch)).item()
    assert anchored.compute_loss(anchored.model, dict(batch)).item() == pytest.approx(base_loss, rel=1e-5)
    assert anchored._metrics["train"]["kl_anchor"][-1] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    with torch.no_grad():  # move the policy off the reference: the anchor is the KL, by hand
        for p in anchored.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    loss = anchored.compute_loss(anchored.model, dict(batch))
    kl = anchored._metrics["train"]["kl_anchor"][-1]
    with torch.no_grad():
        log_p = torch.log_softmax(anchored.model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
        log_q = torch.log_softmax(anchored._ref_model(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
        mask = (batch["labels"][:, 1:] != -100).float()
        want = ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum()
    assert kl == pytest.approx(want.item(), rel=1e-4) and kl > 1e-3
    assert loss.requires_grad  # the anchor trains: its graph reaches the policy's weights
    drift, reference = {}, load_model(inputs["model"])
    for weight in (0.0, 30.0):
        trainer = trainer_with(weight, f"run-{weight}", steps=8)
        trainer.train()
        trainer.model.eval()
        with torch.no_grad():
            log_p = torch.log_softmax(trainer.model(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
            log_q = torch.log_softmax(reference(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
        drift[weight] = (((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum()).item()
    assert drift[30.0] < 0.5 * drift[0.0], drift


def test_the_last_step_writes_no_checkpoint_when_finished_checkpoints_are_removed(inputs, tmp_path):
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.training.callbacks import SkipFinalCheckpoint
    from probe_dpo.training.trainers import build_trainer

    rows = [{"text": "The river in spring is lovely and calm."}, {"text": "She said thanks a lot."}]
    cfg = _cfg(inputs, str(tmp_path), "method=sft", "train.max_steps=3", "train.batch_size=1")
    tok = load_tokenizer(inputs["model"])
    saved = {}
    for skip in (False, True):  # the control first: the same run without the callback saves every step
        out = tmp_path / f"skip-{skip}"
        trainer = build_trainer("sft", load_model(inputs["model"]), tok, rows, cfg, output_dir=str(out),
                                save_steps=1, callbacks=[SkipFinalCheckpoint()] if skip else [])
        trainer.train()
        saved[skip] = sorted(p.name for p in out.glob("checkpoint-*"))
    assert saved[False] == ["checkpoint-3"]  # save_total_limit=1 keeps the newest
    assert saved[True] == ["checkpoint-2"]  # the one a restart would resume from; no final one


def test_killed_run_resumes_from_its_checkpoint(inputs, ray_cluster, tmp_path):
    """Kill the driver (and with it the trainer) after the first checkpoint; the same command resumes."""
    out = tmp_path / "resume"
    address = ray_cluster.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "probe_dpo.cli", "train", f"model={inputs['model']}",
            f"probes={inputs['probes']}", f"data.prompts={inputs['prompts']}", f"out={out}", "method=probe-dpo",
            "sampling.k=2", "sampling.actors=0", "sampling.max_new_tokens=6", "train.batch_size=1",
            "train.max_steps=12", "distributed.workers=2", "distributed.checkpoint_steps=2",
            f"distributed.address={address}"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        snaps = list((out / "ray").glob("*/checkpoint_manager_snapshot.json"))
        if snaps and json.loads(snaps[0].read_text()).get("checkpoint_results"):
            snapshot = snaps[0]
            break
        time.sleep(0.1)
    assert snapshot is not None, proc.communicate()[0].decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "policy").exists()
    first = json.loads(snapshot.read_text())["checkpoint_results"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = storage.read_json(str(out / "train.json"))["rounds"][0]["train"]
    assert metrics["resumed"] is True and metrics["global_step"] == 12
    saved = [c["training_iteration"] if "training_iteration" in c else None for c in first]
    assert metrics["resumed_from_step"] >= 2 and metrics["resumed_from_step"] % 2 == 0, (metrics, saved)
    steps = [h["step"] for h in json.loads((out / "policy" / "training_run.json").read_text())["log_history"]
             if "loss" in h]
    assert sorted(steps) == list(range(1, 13))  # each step once: the resumed run did not redo any


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing computed


def _one_line(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("probe-dpo: error: ") and needle in err, err


def test_bad_inputs_fail_before_any_compute(inputs, tmp_path, capsys):
    other = make_tiny(tmp_path / "wide", hidden=32)
    capsys.readouterr()
    common = [f"probes={inputs['probes']}", f"data.prompts={inputs['prompts']}", f"out={tmp_path / 'never'}"]
    assert main(["train", f"model={other}", *common]) == 2
    _one_line(capsys, "hidden size 64")
    bad_pairs = tmp_path / "pairs.jsonl"
    write_records([{"prompt": "p", "chosen": "c"}], str(bad_pairs))
    assert main(["train", f"model={inputs['model']}", "method=dpo", f"data.pairs={bad_pairs}", *common]) == 2
    _one_line(capsys, "missing column 'rejected'")
    assert main(["train", f"model={inputs['model']}", "sampling.k=1", *common]) == 2
    _one_line(capsys, "sampling.k must be >= 2")
    assert main(["train", f"model={inputs['model']}", "method=probe-dpo", f"out={tmp_path / 'never'}",
                 f"data.prompts={inputs['prompts']}"]) == 2
    _one_line(capsys, "needs probes=")
    assert main(["train", f"model={inputs['model']}", "method=sft", "penalty.weight=1", *common]) == 2
    _one_line(capsys, "use method=probe-sft")
    assert not (tmp_path / "never").exists()


def test_stale_jit_build_locks_are_cleared_fresh_ones_kept(tmp_path):
    from probe_dpo.training.loop import clear_stale_build_locks

    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.write_text("")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(str(tmp_path), max_age_s=900) == [str(stale)]
    assert not stale.exists() and fresh.exists()


def test_a_killed_workers_scratch_folder_is_swept_a_live_or_foreign_one_kept(tmp_path):
    import socket

    from probe_dpo.training.loop import SCRATCH_PREFIX, sweep_stale_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no live process now
    host = socket.gethostname()
    killed, live = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}@{host}@abc", tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}@{host}@def"
    foreign = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}@{host}-2@ghi"  # another host whose name starts with this one's
    legacy = tmp_path / f"{SCRATCH_PREFIX}jkl"
    for folder in (killed, live, foreign, legacy):
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / "model.safetensors").write_bytes(b"0" * 1024)
    assert sweep_stale_scratch(str(tmp_path)) == [str(killed)]
    assert not killed.exists() and live.exists() and foreign.exists() and legacy.exists()
