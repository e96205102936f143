"""The toxicity experiment's config and command errors; ``tiny_config`` sizes it for tests.

The experiment itself runs end to end in tests/test_ray_jobs.py, submitted as a Ray job to a
real local Ray head, with its driver killed mid-run and the job resubmitted.
"""

from __future__ import annotations

import yaml

from probe_dpo.cli import main
from probe_dpo.config import load_config
from probe_dpo.workflows import bundled_config
from probe_dpo.workflows.toxicity import ARMS, ExperimentConfig


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
    assert main(["report", str(tmp_path)]) == 2
    assert "not an experiment run folder" in capsys.readouterr().err
    cfg = load_config(ExperimentConfig)  # the defaults are valid and name every arm
    assert cfg.arms == list(ARMS) and len(ARMS) == 11
    for name in ("toxicity.yaml", "demo.yaml"):
        load_config(ExperimentConfig, bundled_config(name))
