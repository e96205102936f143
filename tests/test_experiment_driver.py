"""The toxicity experiment's config and command errors; ``tiny_config`` sizes it for tests.

The experiment itself runs end to end in tests/test_ray_jobs.py, submitted as a Ray job to a
real local Ray head, with its driver killed mid-run and the job resubmitted.
"""

from __future__ import annotations

import json

import yaml

from probe_dpo.cli import main
from probe_dpo.config import load_config
from probe_dpo.workflows import bundled_config
from probe_dpo.workflows.experiment.arms import ARMS
from probe_dpo.workflows.experiment.config import ExperimentConfig


def tiny_config(model: str, storage_uri: str, arms: list[str]) -> dict:
    """The experiment on the tiny random model: seconds per arm, every code path."""
    return {
        "name": "tiny", "storage": storage_uri,
        "testbed": {"model": model, "label_on": "prompt+completion", "prompts": {"heldout": 16, "max_train": 40},
                    "generation": {"max_new_tokens": 6},
                    "probe_data": {"samples_per_toxic_prompt": 3, "benign_share": 0.2},
                    "evaluation": {"heldout_samples_per_prompt": 2, "bootstrap": 100, "perplexity_passages": 3,
                                   "perplexity_tokens": 32}},
        "arms": arms, "probes": {"ensemble_size": 2, "batch_size": 16}, "pairs": {"min_margin": 0.0},
        "sft_rows": 8, "dpo_train": {"max_steps": 2, "batch_size": 2, "max_length": 48},
        "sft_train": {"max_steps": 2, "batch_size": 2, "max_length": 48},
        "eval": {"heldout_prompts": 8, "samples_per_prompt": 2, "perplexity_passages": 2, "perplexity_tokens": 32,
                 "probe_train_rows": 60, "probe_val_rows": 30, "bootstrap": 100},
    }


def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"arms": ["probe-dpo-single", "magic-dpo"]}))
    assert main(["experiment", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown arm(s) ['magic-dpo']" in err
    assert main(["experiment", "--config", str(bad), "seedz=[1]"]) == 2
    assert "did you mean seeds?" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"  # an arm's training key is checked before any compute
    typo.write_text(yaml.safe_dump({"arms": ["sft"], "arm_settings": {"sft": {"train.lrr": 1e-4}}}))
    assert main(["experiment", "--config", str(typo), f"storage={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "arm sft: training key 'train.lrr'" in err and "did you mean train.lr?" in err
    assert not (tmp_path / "run").exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "not an experiment run folder" in capsys.readouterr().err
    cfg = load_config(ExperimentConfig)  # the defaults are valid and name every arm
    assert cfg.arms == list(ARMS) and len(ARMS) == 15  # 11 SFT/DPO arms, 4 GRPO arms
    for name in ("toxicity.yaml", "demo.yaml"):
        load_config(ExperimentConfig, bundled_config(name))


def test_a_rebuilt_testbed_replaces_the_published_data(s3_bucket, tmp_path):
    """A remote run republishes every data file when the local testbed's content hash changed:
    a file left from an older testbed would otherwise be read by the trials."""
    import dataclasses
    import json

    from probe_dpo import storage
    from probe_dpo.workflows.experiment.stages import prepare_testbed

    local = tmp_path / "testbed"
    (local / "model").mkdir(parents=True)
    (local / "data").mkdir()
    (local / "model" / "config.json").write_text("{}")

    def build(content: str, digest: str) -> None:
        (local / "data" / "prompts.jsonl").write_text(content)
        (local / "testbed.json").write_text(json.dumps({"content_hash": digest, "files": {}}))

    cfg = dataclasses.replace(load_config(ExperimentConfig), testbed_dir=str(local))
    run = f"{s3_bucket}/run"
    build('{"prompt": "old"}\n', "a" * 64)
    prepare_testbed(cfg, run)
    build('{"prompt": "new"}\n', "b" * 64)
    tb = prepare_testbed(cfg, run)
    assert storage.read_text(storage.join(tb["uri"], "data", "prompts.jsonl")) == '{"prompt": "new"}\n'
    assert storage.read_json(storage.join(tb["uri"], "testbed.json"))["content_hash"] == "b" * 64


def test_on_a_joined_cluster_the_driver_runs_no_model_forward(ray_cluster, tiny_model_dir, tmp_path):
    """Joined to a cluster (here the session's Ray, which the experiment did not start), the
    driver only orchestrates: the testbed build, probe extraction and fitting, training and
    evaluation run in Ray workers with declared resources. A process-wide forward hook counts
    every module forward of this process, the driver's."""
    import torch

    from probe_dpo.config import from_dict
    from probe_dpo.workflows.experiment.driver import run

    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, _: calls.append(type(m).__name__))
    try:
        torch.nn.Linear(2, 2)(torch.zeros(1, 2))  # the control: a forward here is counted
        assert calls == ["Linear"]
        calls.clear()
        raw = tiny_config(str(tiny_model_dir), str(tmp_path / "run"), ["sft"])
        raw["distributed"] = {"workers": 1}
        out = run(from_dict(ExperimentConfig, raw, "test config"))
    finally:
        handle.remove()
    assert calls == []
    assert [r["arm"] for r in out["rows"]] == ["sft"] and out["rows"][0]["perplexity"] > 1
    ctx = json.loads((tmp_path / "run" / "shared" / "context.json").read_text())
    assert ctx["use_gpu"] is (torch.cuda.is_available())  # "auto", resolved once, as the bool that ran
