"""Typed configs: YAML + dotted overrides, and one clear line for every kind of bad key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from probe_dpo.config import bounded, dump_yaml, load_config
from probe_dpo.errors import UserError


@dataclasses.dataclass
class Optim:
    lr: float = bounded(1e-5, gt=0)
    steps: int = bounded(10, ge=1)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclasses.dataclass
class Experiment:
    name: str = "demo"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    layers: tuple[int, ...] = (6, 12)
    penalty: float | None = None
    use_lora: bool = False
    train: Optim = dataclasses.field(default_factory=Optim)


def test_defaults_without_file():
    cfg = load_config(Experiment)
    assert cfg == Experiment()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: tox\nseeds: [1, 2]\ntrain:\n  lr: 3.0e-4\n  steps: 5\n")
    cfg = load_config(Experiment, path, ["train.lr=1e-5", "use_lora=true", "layers=[3, 9]", "penalty=0.5"])
    assert cfg.name == "tox"
    assert cfg.seeds == [1, 2]
    assert cfg.train.lr == pytest.approx(1e-5)  # YAML 1.1 reads "1e-5" as a string: coerced
    assert cfg.train.steps == 5
    assert cfg.use_lora is True
    assert cfg.layers == (3, 9)
    assert cfg.penalty == 0.5


def test_override_creates_nested_mapping_without_file():
    cfg = load_config(Experiment, None, ["train.schedule=cosine"])
    assert cfg.train.schedule == "cosine"
    assert cfg.train.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("override, message", [
    (["trian.lr=1"], "unknown key trian (did you mean train?)"),
    (["train.lrr=1"], "unknown key train.lrr (did you mean train.lr?)"),
    (["train.steps=many"], "key train.steps must be an integer, got str 'many'"),
    (["train.steps=0"], "key train.steps must be >= 1, got 0"),
    (["train.lr=-1"], "key train.lr must be > 0, got -1.0"),
    (["train.schedule=linear"], "key train.schedule must be one of 'constant', 'cosine', got 'linear'"),
    (["use_lora=yes please"], "key use_lora must be true/false"),
    (["name.first=x"], "name has no sub-keys"),
    (["train.lr"], "expected key=value"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config(Experiment, None, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_file_key_names_file_and_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(Experiment, path)
    assert str(path) in str(err.value)
    assert "unknown key train.learning_rate" in str(err.value)


def test_override_errors_name_the_command_line_not_the_file(tmp_path, capsys):
    """A bad value given as key=value is the command line's, even over a YAML file (a bundled one
    lives in site-packages, where the user did not write it); the file's own errors name the file."""
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 5\n")
    for override, message in ((["train.steps=many"], "key train.steps must be an integer"),
                              (["train.lr=-1"], "key train.lr must be > 0"),
                              (["seeds=[1, x]"], "key seeds[1] must be an integer"),
                              (["train={steps: 0}"], "key train.steps must be >= 1")):
        with pytest.raises(UserError) as err:
            load_config(Experiment, path, ["name=ok", *override])
        assert str(err.value).startswith(f"command line ({override[0]!r}): {message}"), str(err.value)
        assert str(path) not in str(err.value)
    path.write_text("train:\n  steps: none\n")
    with pytest.raises(UserError) as err:
        load_config(Experiment, path, ["train.lr=1e-4"])  # the override is fine: the file is at fault
    assert str(err.value).startswith(f"{path}: key train.steps must be an integer")
    from probe_dpo.cli import main

    assert main(["config", "show", "--for", "experiment", "seeds=abc"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("probe-dpo: error: command line ('seeds=abc'): key seeds must be a list")
    assert "site-packages" not in line and ".yaml" not in line
    assert main(["config", "show", "--for", "experiment", "search.arm=nope"]) == 2  # a cross-field check
    assert "command line ('search.arm=nope'): key search.arm: unknown arm" in capsys.readouterr().err


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        load_config(Experiment, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(Experiment, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(Experiment, listy)


def test_dump_round_trips(tmp_path):
    cfg = load_config(Experiment, None, ["train.steps=7", "seeds=[3]"])
    path = tmp_path / "saved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Experiment, path) == cfg


def test_cli_typo_is_one_line_and_exit_2(tmp_path):
    """The acceptance check: a config typo on the real CLI gives one line, status 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "probe_dpo.cli", "testbed", "build", "--out", str(tmp_path / "tb"),
         "generaton.temperature=0.9"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown key generaton" in lines[0]
    assert "did you mean generation?" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tb").exists()


def test_config_show_describes_every_key_and_round_trips(capsys):
    import dataclasses

    import yaml

    from probe_dpo.cli import CONFIG_KINDS, _config_class, main
    from probe_dpo.config import describe, load_config

    for kind in CONFIG_KINDS:
        cls = _config_class(kind)
        undocumented = [key for key, _, doc, _ in describe(cls()) if not doc]
        assert undocumented == [], (kind, undocumented)
    assert main(["config", "show", "--for", "train", "method=dpo", "train.lr=3e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-05" in out and "# Peak learning rate" in out
    from probe_dpo.training import TrainConfig

    again = load_config(TrainConfig, None, [])
    shown = yaml.safe_load(out)
    assert shown["method"] == "dpo" and shown["train"]["lr"] == 3e-5
    assert set(shown) == {f.name for f in dataclasses.fields(again)}
    assert main(["config", "show", "--config", "demo"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["arms"][-1] == "obfuscation-control"
    assert main(["config", "show", "--for", "train", "trian.lr=1"]) == 2
    assert "did you mean train?" in capsys.readouterr().err
