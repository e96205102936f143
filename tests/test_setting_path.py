"""One setting from the command line to TRL's DPOConfig inside a Ray Train worker (issue 32).

``train.lr`` changes form at most 4 times on the way; every other hop hands the same typed
object on (by pickle: Tune's ``with_parameters``, Ray Train's function argument).

``probe-dpo train train.lr=2.5e-5``, 2 conversions:
  1. the command line's string -> its YAML value -> the typed ``TrainConfig`` (``load_config``);
  2. ``TrainConfig`` -> ``DPOConfig`` in the worker (``loop.worker_arguments`` ->
     ``trainers.training_arguments``: ``learning_rate=cfg.train.lr``).
  The worker gets the ``TrainJob`` holding that ``TrainConfig`` (pickled by Ray, not converted).

An experiment arm (``probe-dpo experiment dpo_train.lr=2.5e-5``), 3 conversions:
  1. the command line's string -> the typed ``ExperimentConfig`` (``load_config``);
  2. ``Arm.train_config``: ``ExperimentConfig`` -> ``TrainConfig`` (the arm's settings as dotted
     keys through ``set_dotted``, then ``from_dict``). The Tune trial gets the ExperimentConfig
     itself (``tune.with_parameters``: pickled, not converted);
  3. ``TrainConfig`` -> ``DPOConfig`` in the worker, as above.
"""

from __future__ import annotations

import pytest

from probe_dpo.config import load_config
from probe_dpo.workflows.experiment.arms import ARMS, SharedInputs
from probe_dpo.workflows.experiment.config import ExperimentConfig


def _pickled(obj):
    """``obj`` after the hop Ray makes (cloudpickle), as a Tune trial or a Train worker gets it."""
    from ray import cloudpickle

    return cloudpickle.loads(cloudpickle.dumps(obj))


@pytest.fixture
def worker_dpo_config(monkeypatch, tiny_model_dir, tmp_path):
    """Runs ``probe_dpo.training.train`` up to Ray Train: ``fit_round`` gets the round's
    ``TrainJob``, which is pickled and turned into the worker's TRL config as ``train_worker`` does.
    Returns a list that collects those configs."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from probe_dpo.training import loop

    seen = []

    def fit_round(job, *, storage_root, run_name, callbacks=None):
        job = _pickled(job)
        seen.append(loop.worker_arguments(job, str(tmp_path / "worker")))
        unset_hf_deepspeed_config()  # the arguments registered their DeepSpeed config with transformers
        return {"global_step": 0}

    monkeypatch.setattr(loop, "fit_round", fit_round)
    monkeypatch.setattr("probe_dpo.ray_utils.init_ray", lambda *a, **k: None)
    return seen


def _pairs(tmp_path) -> str:
    from conftest import write_planted_pairs

    return write_planted_pairs(str(tmp_path / "pairs.jsonl"), n=8)


def test_train_lr_on_the_command_line_reaches_the_workers_dpo_config(worker_dpo_config, tiny_model_dir, tmp_path):
    from trl import DPOConfig

    from probe_dpo.cli import main

    rc = main(["train", "method=dpo", f"model={tiny_model_dir}", f"data.pairs={_pairs(tmp_path)}",
               f"out={tmp_path / 'out'}", "distributed.use_gpu=false", "train.lr=2.5e-5"])
    assert rc == 0
    (args,) = worker_dpo_config
    assert isinstance(args, DPOConfig) and args.learning_rate == 2.5e-5


@pytest.mark.parametrize("overrides, lr", [
    (["dpo_train.lr=2.5e-5"], 2.5e-5),  # the experiment's setting of every DPO arm
    (["dpo_train.lr=2.5e-5", "arm_settings={classifier-dpo: {train.lr: 3.5e-5}}"], 3.5e-5),  # the arm's own wins
])
def test_an_arms_lr_on_the_command_line_reaches_the_workers_dpo_config(worker_dpo_config, tiny_model_dir, tmp_path,
                                                                        overrides, lr):
    from trl import DPOConfig

    from probe_dpo.training import train

    testbed = tmp_path / "testbed"  # the testbed's summary is all a replayed-pairs arm reads of it
    testbed.mkdir()
    (testbed / "testbed.json").write_text("{}")
    pairs = _pairs(tmp_path)
    cfg = load_config(ExperimentConfig, None, ["distributed.use_gpu=false", *overrides])
    shared = SharedInputs(run=str(tmp_path / "run"), testbed=str(testbed), base_model=str(tiny_model_dir),
                          probes={}, pairs={"classifier": pairs}, control_sft="")
    experiment, shared_there = _pickled(cfg), _pickled(shared)  # what the Tune trial gets
    assert (experiment, shared_there) == (cfg, shared)
    tcfg = ARMS["classifier-dpo"].train_config(experiment, shared_there, "classifier-dpo-s0", 0)
    train(tcfg)
    (args,) = worker_dpo_config
    assert isinstance(args, DPOConfig) and args.learning_rate == lr


def test_trial_keys_are_the_ones_the_dict_built_configs_gave():
    """A trial's key is made of its training settings: these digests are the ones the code before
    ``Arm.train_settings`` gave for the same experiment, so a finished run's trials are reused."""
    from probe_dpo.data import json_digest
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.experiment.trials import trial_key_fields

    cfg = load_config(ExperimentConfig, bundled_config("demo"), [
        "dpo_train.lr=2.5e-5", "arm_settings={probe-dpo-single: {train.lr: 3.0e-5}}", "tracking.report_to=[tensorboard]"])
    shared = SharedInputs(run="/runs/x", testbed="/runs/x/testbed", base_model="/runs/x/testbed/model",
                          probes={"single": "/runs/x/probes/single", "ensemble": "/runs/x/probes/ensemble"},
                          pairs={s: f"/runs/x/shared/pairs-{s}.jsonl" for s in ("single", "ensemble", "classifier")},
                          control_sft="/runs/x/shared/control-sft.jsonl")
    before = {"probe-dpo-single": "7edd5ab9f6e2", "probe-dpo-onpolicy": "2ceb5362683f", "sft": "618d4b8c5fab",
              "probe-grpo-frozen": "cb99a56d5a27", "obfuscation-control": "b691efde02fd"}
    now = {arm: json_digest(trial_key_fields(ARMS[arm].train_settings(cfg, shared, f"{arm}-s1", 1)))[:12]
           for arm in before}
    assert now == before


def test_a_train_job_reaches_the_worker_unchanged(tiny_model_dir):
    from probe_dpo.training import TrainConfig
    from probe_dpo.training.loop import TrainJob

    cfg = load_config(TrainConfig, None, ["method=dpo", "train.lr=2.5e-5", "trl.logging_steps=3"])
    job = TrainJob(cfg=cfg, kind="dpo", data="d.jsonl", model=str(tiny_model_dir), reference=str(tiny_model_dir),
                   policy="p", round=0, config_hash="h", generation={"max_new_tokens": 20}, env={"HF_HOME": "x"})
    assert _pickled(job) == job and _pickled(job).cfg.trl == {"logging_steps": 3}


def test_the_evaluation_context_is_one_typed_object_with_the_keys_it_had(tmp_path):
    """``EvalContext`` reaches a trial and a Ray task as it is (pickled); ``shared/context.json`` gets
    the same fields the dict form had, and the base evaluation's key is the digest the dict form gave
    (computed with the code before the class, for the demo's config), so finished runs are reused."""
    import dataclasses
    import json

    from probe_dpo.data import json_digest
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.experiment.evaluate import EvalContext, eval_context

    testbed = tmp_path / "testbed"
    testbed.mkdir()
    (testbed / "testbed.json").write_text(json.dumps({"config": {"generation": {"max_new_tokens": 20,
                                                                                "dtype": "auto"}}}))
    cfg = load_config(ExperimentConfig, bundled_config("demo"), ["distributed.use_gpu=false"])
    probes = {"ensemble": "/r/probes/ensemble", "best_layer": 18, "ensemble_layers": [18, 2, 8, 10],
              "best_probe": "train-L18", "held_out": ["heldout-L4", "heldout-data-L18"]}
    ctx = eval_context(cfg, "/r", {"uri": str(testbed), "model": "/r/model", "info": {}}, probes)
    assert isinstance(ctx, EvalContext) and _pickled(ctx) == ctx
    assert ctx.eval is cfg.eval and ctx.retrain_layers == (2, 8, 10, 18) and ctx.threshold == 0.5
    as_json = json.loads(json.dumps(ctx.to_dict()))
    assert set(as_json) == {"run", "testbed", "base_model", "probes", "retrain_layers", "best_probe", "best_layer",
                            "held_out", "generation", "eval", "threads", "use_gpu", "accelerator_type", "behaviour",
                            "threshold"}
    assert as_json["eval"]["heldout_prompts"] == 200 and as_json["generation"]["max_new_tokens"] == 20
    assert json_digest([probes["ensemble"], "c" * 64, *ctx.key()])[:12] == "b8a64320e8c6"
    replicate = dataclasses.replace(ctx, eval=dataclasses.replace(ctx.eval, seed=ctx.eval.seed + 1), threads=None)
    assert (replicate.eval.seed, ctx.eval.seed, replicate.threads) == (1235, 1234, None)
