"""Help that tells the truth: every example override in every command's ``--help`` is a key of
that command's config (and parses), every example command line parses, ``experiment --config``
lists the bundled configs, and ``config show`` shows what each command runs by default.
No Ray, no model."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
import yaml

from probe_dpo import cli
from probe_dpo.config import load_config, show, to_dict
from probe_dpo.workflows import BUNDLED, bundled_config, bundled_configs

OVERRIDE = re.compile(r"(?<![\w./-])([a-z_][\w-]*(?:\.[\w-]+)*)=(\S+)")
EXAMPLE = re.compile(r"Example: (probe-dpo .*)$", re.M)


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def _parser(*path: str) -> argparse.ArgumentParser:
    return dict(_parsers(cli.build_parser()))[path]


def _kind_and_config(path: tuple[str, ...], argv: list[str] | None = None) -> tuple[str, str | None] | None:
    """The config kind a command (or an example command line) reads, and the file it reads by default."""
    if path == ("demo",):
        return "experiment", "demo"
    if path == ("config", "show"):
        kind = "experiment"
        if argv and "--for" in argv:
            kind = argv[argv.index("--for") + 1]
        return kind, cli.default_config(kind)
    for kind, command in cli.CONFIG_COMMANDS.items():
        if command == path:
            return kind, cli.default_config(kind)
    return None


def _overrides(text: str) -> list[str]:
    out = []
    for key, value in OVERRIDE.findall(text):
        value = value.rstrip(".,;")
        if value.count(")") > value.count("("):
            value = value.rstrip(")")
        out.append(f"{key}={value}")
    return out


def _check(kind: str, config: str | None, override: str, where: str) -> None:
    cls = cli._config_class(kind)
    path = bundled_config(config) if kind in ("experiment", "attribute") else config
    try:
        load_config(cls, path, [override])
    except Exception as exc:  # noqa: BLE001 - the message names the bad example
        pytest.fail(f"{where}: the example override {override!r} does not parse as a {kind} key: {exc}")


def test_every_help_example_parses_against_its_command(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: examples stay whole, one per line
    checked = 0
    for path, parser in _parsers(cli.build_parser()):
        text = parser.format_help()
        where = "probe-dpo " + " ".join(path) + " --help"
        examples = EXAMPLE.findall(text)
        for example in examples:  # a whole command line: argparse takes it, its overrides parse
            argv = shlex.split(example.rstrip("."))[1:]
            try:
                args = cli.build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{where}: the example command {example!r} does not parse")
            target = _kind_and_config(tuple(a for a in argv[:2] if not a.startswith("-") and "=" not in a), argv)
            for override in _overrides(example):
                assert target is not None, f"{where}: {override!r} in an example of a command without a config"
                _check(*target, override, where)
                checked += 1
            assert args.handler
        rest = EXAMPLE.sub("", text)
        for override in _overrides(rest):  # e.g. "dotted overrides ..., e.g. train.lr=1e-5"
            target = _kind_and_config(path)
            assert target is not None, f"{where}: example override {override!r} of a command without a config"
            _check(*target, override, where)
            checked += 1
    assert checked >= 8  # the check reads the help at all


def test_train_example_points_at_a_probe_set(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")
    (example,) = EXAMPLE.findall(_parser("train").format_help())
    probes = dict(o.split("=", 1) for o in _overrides(example))["probes"]
    assert probes.endswith(("/single", "/ensemble"))  # the views the experiment saves, not their parent


def test_experiment_config_help_lists_the_bundled_configs(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")
    text = _parser("experiment").format_help()
    experiment_configs = bundled_configs("experiment")
    assert {"toxicity", "demo", "sentiment"} <= set(experiment_configs) <= set(BUNDLED)
    line = next(line for line in text.splitlines() if "--config" in line and "bundled" in line)
    for name in experiment_configs:
        assert name in line
    assert "toxicity (default)" in line and "attribution" not in line


def test_config_show_shows_what_each_command_runs(capsys):
    from probe_dpo.workflows.experiment.config import ExperimentConfig

    assert cli.main(["config", "show"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    runs = load_config(ExperimentConfig, BUNDLED["toxicity"])  # what `probe-dpo experiment` loads
    assert shown == yaml.safe_load(show(runs))
    assert shown["eval"]["heldout_prompts"] == to_dict(runs)["eval"]["heldout_prompts"] \
        != to_dict(ExperimentConfig())["eval"]["heldout_prompts"]
    assert cli.main(["config", "show", "--for", "experiment", "--config", "demo"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(show(load_config(ExperimentConfig,
                                                                                      BUNDLED["demo"])))
    for kind in ("train", "testbed", "probes"):  # these read no file by default: the declared defaults
        assert cli.default_config(kind) is None
        assert cli.main(["config", "show", "--for", kind]) == 0
        assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(show(cli._config_class(kind)()))
