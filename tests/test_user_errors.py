"""Every user error is one line: argparse, bad files, errors raised in Ray tasks, actors, Train
workers and Tune trials (a trial fails once, without retries), degenerate data refused before any
compute, and relative paths resolved against the caller's folder before they reach a worker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probe_dpo.cli import main
from probe_dpo.data import write_records
from probe_dpo.errors import UserError, find_user_error, guarded

BIN = Path(sys.executable).parent


def _one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("probe-dpo: error: ") and needle in err, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["activations", "extract", "--model", "m", "--data", "d", "--out", "o", "--layers", "1", "--batch-size", "abc"],
     "probe-dpo activations extract: error: argument --batch-size: invalid int value: 'abc' "
     "(see 'probe-dpo activations extract --help')"),
    (["probes", "eval", "--model", "m"], "probe-dpo probes eval: error: the following arguments are required: "
                                         "--probes, --data (see 'probe-dpo probes eval --help')"),
    (["nope"], "probe-dpo: error: argument COMMAND: invalid choice: 'nope'"),
])
def test_argument_errors_are_one_line_with_a_help_hint(argv, needle):
    done = subprocess.run([str(BIN / "probe-dpo"), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr
    assert "usage:" not in done.stderr


SEARCH = ["search.arm=probe-dpo-single", "search.num_samples=2"]


@pytest.mark.parametrize("overrides, needle", [
    (["search.space={train.lr: [logunifrom, 1e-6, 1e-4]}"],
     "key search.space.train.lr: unknown sampler 'logunifrom' (did you mean loguniform?)"),
    (["search.space={train.lr: [loguniform, 1e-4, 1e-6]}"], "key search.space.train.lr: loguniform needs lo < hi"),
    (["search.space={train.lr: [loguniform, 0, 1e-4]}"], "loguniform needs positive bounds"),
    (["search.space={dpo.beta: [choice, 0.1]}"], "choice takes one non-empty list of values"),
    (["search.space={train.lrr: [loguniform, 1e-6, 1e-4]}"],
     "search.space.train.lrr (a training key of arm probe-dpo-single): unknown key train.lrr (did you mean train.lr?)"),
    (["search.space={dpo.beta: [grid, [0.1, big]]}"], "key dpo.beta must be a number, got str 'big'"),
    (["search.space={train.lr: [loguniform, 1e-6, 1e-4]}", "search.metric=toxicity.toxic-comment-clasifier.rate"],
     "search.metric 'toxicity.toxic-comment-clasifier.rate': not a result of this run (did you mean "
     "toxicity.toxic-comment-classifier.rate?)"),
    (["search.space={train.lr: [loguniform, 1e-6, 1e-4]}", "search.metric=toxicity.hatesonar.rate",
      "eval.judges=[profanity-check]"], "search.metric 'toxicity.hatesonar.rate': not a result of this run"),
    ([], "search.space: empty"),
    # Tune's own form, its samplers and the algorithm/scheduler/metric/mode combinations
    (["search.space={train.lr: {logunifrom: [1e-6, 1e-4]}}"],
     "key search.space.train.lr: unknown sampler 'logunifrom' (did you mean loguniform?)"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4], uniform: [0, 1]}}"], "one sampler per key"),
    (["search.space={train.max_steps: {randint: [1.5, 4]}}"], "randint takes integer bounds"),
    (["search.space={dpo.beta: {quniform: [0.1, 0.5]}}"], "quniform takes 3 numbers (lo, hi, q)"),
    (["search.space={dpo.beta: {grid_search: [0.1, 0.3]}}", "search.algorithm=optuna"],
     "key search.space.dpo.beta: grid_search is not something Optuna samples: use choice"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.algorithm=tpe"],
     "key search.algorithm must be one of 'random', 'optuna', got 'tpe'"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.algorithm=optunaa"],
     "key search.algorithm must be one of 'random', 'optuna', got 'optunaa' (did you mean optuna?)"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.scheduler=ASHA"],
     "key search.scheduler must be one of 'fifo', 'asha', got 'ASHA' (did you mean asha?)"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.metric=[kl_to_base, perplexity]"],
     "key search.mode: give one min|max per metric (2 metric(s) ['kl_to_base', 'perplexity'], 1 mode(s) ['min'])"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.metric=[kl_to_base, perplexity]",
      "search.mode=[min, max]", "search.scheduler=asha"], "key search.scheduler: asha stops trials on one metric"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.scheduler=asha", "dpo_train.max_steps=10"],
     "search.scheduler=asha: search.metric 'toxicity.toxic-comment-classifier.rate' is measured once, after "
     "training, and ASHA stops trials on what they report while they train: use a training metric"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.scheduler=asha", "search.metric=train.loss"],
     "search.asha.max_t: arm probe-dpo-single trains for train.epochs, not a number of steps"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.scheduler=asha", "search.metric=train.loss",
      "dpo_train.max_steps=10", "search.asha.grace_period=20"], "search.asha.grace_period: 20 steps is past"),
    (["search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.metric=[kl_to_base, train.los]",
      "search.mode=[min, min]"], "search.metric 'train.los': not a result of this run (did you mean train.loss?)"),
    (["search.arm=sft", "search.space={penalty.weight: {uniform: [0, 2]}}"],
     "search.space.penalty.weight (uniform value 2.0): method sft is plain SFT (no probe penalty)"),
    (["search.arm=sft", "search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.metric=train.probe_penalty"],
     "search.metric 'train.probe_penalty': arm sft trains against no probe"),
    (["search.arm=probe-grpo-single", "search.space={train.lr: {loguniform: [1e-6, 1e-4]}}",
      "search.metric=train.probe_penalty"], "search.metric 'train.probe_penalty': arm probe-grpo-single is a GRPO arm"),
])
def test_search_settings_are_refused_before_ray_starts(overrides, needle, tmp_path, monkeypatch, capsys):
    """A typo in search.space or search.metric fails `probe-dpo experiment` at once, not after every arm."""
    import probe_dpo.ray_utils as ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the search settings were not checked first")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    run = tmp_path / "run"
    assert main(["experiment", "--storage", str(run), *SEARCH, *overrides]) == 2
    _one_line(capsys, needle)
    assert not run.exists()  # before the run folder is written


def test_a_valid_search_passes_the_checks(tmp_path):
    from probe_dpo.config import load_config
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.experiment.config import ExperimentConfig
    from probe_dpo.workflows.experiment.trials import check_arm_settings, search_metrics

    cfg = load_config(ExperimentConfig, bundled_config("toxicity"),
                      [*SEARCH, "search.space={train.lr: [loguniform, 1e-6, 1e-4], dpo.beta: [choice, [0.1, 0.3]]}",
                       "search.metric=fixed.held_out.auroc.delta"])
    assert cfg.search.space["train.lr"] == {"loguniform": [1e-6, 1e-4]}  # YAML 1.1's "1e-6" string, as a number
    check_arm_settings(cfg)
    tune_words = load_config(ExperimentConfig, bundled_config("toxicity"), [
        *SEARCH, "search.space={train.lr: {loguniform: [1e-6, 1e-4]}, dpo.beta: {choice: [0.1, 0.3]}}",
        "search.algorithm=optuna", "search.scheduler=asha", "search.metric=train.rewards.margins", "search.mode=max",
        "search.asha={max_t: 40, grace_period: 5, reduction_factor: 3}"])
    assert tune_words.search.space == {"train.lr": {"loguniform": [1e-6, 1e-4]}, "dpo.beta": {"choice": [0.1, 0.3]}}
    check_arm_settings(tune_words)  # ASHA on a DPO arm's training metric; max_t given, its epochs need no max_steps
    several = load_config(ExperimentConfig, bundled_config("toxicity"), [
        *SEARCH, "search.space={train.lr: {loguniform: [1e-6, 1e-4]}}", "search.algorithm=optuna",
        "search.metric=[toxicity.hatesonar.rate, fixed.train.tpr.delta, kl_to_base]", "search.mode=[min, max, min]"])
    check_arm_settings(several)
    assert several.search.metrics == ["toxicity.hatesonar.rate", "fixed.train.tpr.delta", "kl_to_base"]
    metrics = search_metrics(cfg.eval.judges)
    assert {"toxicity.hatesonar.rate", "perplexity", "kl_to_base", "own.train.tpr", "fixed.retrained.auroc"} <= \
        set(metrics) and "atlas" not in metrics


def _pairs(path: Path, rows: list[dict]) -> str:
    write_records(rows, str(path))
    return str(path)


GOOD = [{"prompt": f"Item {i}: tell me about it.", "chosen": f" It is calm {i}.", "rejected": f" Nobody cares {i}."}
        for i in range(8)]


def test_bad_data_and_files_are_refused_before_any_compute(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    common = ["method=dpo", f"model={tiny_model_dir}", f"out={out}"]
    same = _pairs(tmp_path / "same.jsonl", GOOD[:3] + [{**GOOD[3], "rejected": GOOD[3]["chosen"]}])
    assert main(["train", *common, f"data.pairs={same}"]) == 2
    _one_line(capsys, f"{same}: row 4: chosen and rejected are the same text (1 such row(s) of 4)")
    scored = _pairs(tmp_path / "scored.jsonl", [{**r, "chosen_score": 0.1, "rejected_score": 0.9} for r in GOOD[:2]]
                    + [{**GOOD[2], "chosen_score": "low", "rejected_score": 0.9}])
    assert main(["train", *common, f"data.pairs={scored}"]) == 2
    _one_line(capsys, f"{scored}: row 3: column 'chosen_score' must be a finite number, got 'low'")
    assert not out.exists()
    # the same pair file given to attribute is refused before any activation is extracted
    assert main(["attribute", "--pairs", same, "--model", str(tiny_model_dir), "--out", str(out / "attr"),
                 "--in-process"]) == 2
    _one_line(capsys, "chosen and rejected are the same text")
    assert not (out / "attr").exists()
    # a testbed whose testbed.json is damaged, or lacks its content hash
    for name, text, needle in (("broken", '{"model": ', "testbed.json: not valid JSON (line 1"),
                               ("nohash", json.dumps({"model": {"path": "model"}, "files": {}}), "no content_hash")):
        tb = tmp_path / name
        (tb / "data").mkdir(parents=True)
        (tb / "testbed.json").write_text(text)
        if name == "broken":
            assert main(["train", "method=sft", f"testbed={tb}", f"out={out}"]) == 2
            _one_line(capsys, needle)
        assert main(["experiment", "--config", "demo", "--storage", str(out / "run"),
                     f"testbed_dir={tb}"]) == 2
        _one_line(capsys, needle)


def test_user_errors_from_ray_tasks_actors_and_train_workers_are_one_line(ray_cluster, capsys):
    ray = ray_cluster

    @ray.remote
    def task():
        raise UserError("data x.jsonl: row 3: column 'prompt' is empty")

    @ray.remote
    class Actor:
        def run(self):
            raise UserError("layer 99 is out of range: the model has 2 layers")

    assert guarded(lambda: ray.get(task.remote())) == 2
    assert _one_line(capsys, "") == "probe-dpo: error: data x.jsonl: row 3: column 'prompt' is empty"
    assert guarded(lambda: ray.get(Actor.remote().run.remote())) == 2
    assert _one_line(capsys, "") == "probe-dpo: error: layer 99 is out of range: the model has 2 layers"

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        raise UserError("cannot load a model from runs/demo/testbed/model: no such folder")

    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                           run_config=RunConfig(storage_path=str(Path.cwd() / ".pytest-ray-train"), name="user-error"))
    try:
        assert guarded(trainer.fit) == 2
        assert _one_line(capsys, "") == \
            "probe-dpo: error: cannot load a model from runs/demo/testbed/model: no such folder"
    finally:
        shutil.rmtree(Path.cwd() / ".pytest-ray-train", ignore_errors=True)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug and keeps its traceback
        guarded(lambda: 1 / 0)


def test_a_user_error_fails_its_tune_trial_once_without_retries(ray_cluster, tmp_path):
    from ray import tune

    from probe_dpo.ray_utils import USER_ERROR_KEY, fail_once_on_user_error, raise_user_errors

    def trainable(config):
        with open(config["counter"], "a") as f:
            f.write("x")
        if config["kind"] == "user":
            raise UserError("probes runs/p: no probes with role 'train' to train against")
        raise RuntimeError("a bug")

    def fit(kind: str, metric: str | None):
        counter = tmp_path / f"{kind}-{metric}.count"
        tuner = tune.Tuner(
            tune.with_resources(fail_once_on_user_error(trainable, metric=metric), {"cpu": 1}),
            param_space={"kind": kind, "counter": str(counter)},
            tune_config=tune.TuneConfig(metric=metric, mode="max" if metric else None),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name=f"{kind}-{metric}",
                                      failure_config=tune.FailureConfig(max_failures=2), verbose=0))
        return tuner.fit(), counter

    for metric in (None, "toxicity.rate"):  # a search metric: Tune's metric check must still pass
        results, counter = fit("user", metric)
        assert counter.read_text() == "x"  # ran once: no retry
        assert results[0].metrics[USER_ERROR_KEY] == "probes runs/p: no probes with role 'train' to train against"
        with pytest.raises(UserError, match=r"^probes runs/p: no probes with role 'train' to train against$"):
            raise_user_errors(results)
    results, counter = fit("bug", None)  # any other error still fails (and is retried) as before
    assert counter.read_text() == "xxx" and results[0].error is not None
    assert find_user_error(results[0].error) is None
    raise_user_errors(results)  # nothing to re-raise


def test_relative_paths_are_resolved_before_they_reach_train_workers(tiny_model_dir, ray_cluster, tmp_path,
                                                                    monkeypatch, capsys):
    """`probe-dpo train model=runs/demo/testbed/model data.pairs=pairs.jsonl out=runs/x`, as the
    command's help shows it, from the folder those paths are relative to."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "demo" / "testbed" / "model")
    _pairs(tmp_path / "pairs.jsonl", GOOD)
    code = main(["train", "method=dpo", "model=runs/demo/testbed/model", "data.pairs=pairs.jsonl",
                 "out=runs/dpo", "train.max_steps=2", "train.batch_size=2", "train.max_length=32",
                 "distributed.workers=1", "distributed.zero_stage=0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((tmp_path / "runs" / "dpo" / "train.json").read_text())
    assert summary["base_model"] == str(tmp_path / "runs" / "demo" / "testbed" / "model")
    assert summary["policy"] == str(tmp_path / "runs" / "dpo" / "policy")
    assert (tmp_path / "runs" / "dpo" / "policy" / "_MANIFEST.json").is_file()
    assert summary["rounds"][0]["train"]["global_step"] == 2
