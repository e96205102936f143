"""Entry points a user submits as Ray jobs (``ray job submit -- probe-dpo experiment ...``).

Each workflow is a thin composition of ``probe_dpo`` calls with a YAML config beside it;
the CLI's ``experiment`` and ``attribute`` commands run these same modules, so what a Ray
job runs and what a user runs locally are one program. Dependencies point one way: the CLI
imports the workflows, the workflows import the library, and the library never imports a
workflow or the CLI (``tests/test_layout.py`` walks the imports).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED = {p.stem: p for p in Path(__file__).parent.glob("*.yaml")}


def bundled_config(value: str | None) -> str | None:
    """A config file to read: ``value`` itself when it is a file, else the bundled config it
    names (``toxicity``, ``demo.yaml``, or the repository path ``workflows/demo.yaml`` older
    commands used), so an installed package finds its configs. Anything else is returned as
    given, for the config loader to report."""
    if value is None or Path(value).exists():
        return value
    path = Path(value)
    stem = path.stem if path.suffix in (".yaml", ".yml") else path.name
    where = path.parent.as_posix()
    if stem in BUNDLED and where in (".", "workflows", "probe_dpo/workflows"):
        return str(BUNDLED[stem])
    return value


CONFIG_KINDS = ("experiment", "train", "testbed", "probes", "attribute")


def config_class(kind: str) -> type:
    """The config class of a command (``probe-dpo config show --for <kind>``), imported on demand."""
    if kind == "experiment":
        from probe_dpo.workflows.experiment.config import ExperimentConfig

        return ExperimentConfig
    if kind == "train":
        from probe_dpo.training import TrainConfig

        return TrainConfig
    if kind == "testbed":
        from probe_dpo.testbed import TestbedConfig

        return TestbedConfig
    if kind == "probes":
        from probe_dpo.probes import ProbeTrainConfig

        return ProbeTrainConfig
    from probe_dpo.workflows.attribution_study.config import AttributionConfig

    return AttributionConfig


def bundled_configs(kind: str) -> list[str]:
    """The bundled configs (``BUNDLED``) a command takes by name: for ``experiment`` those whose
    top-level keys are all experiment keys, for ``attribute`` the others (the attribution study's,
    whose config class is slow to import; the experiment's is not)."""
    import dataclasses

    import yaml

    from probe_dpo.workflows.experiment.config import ExperimentConfig

    keys = {f.name for f in dataclasses.fields(ExperimentConfig)}
    out = []
    for name, path in sorted(BUNDLED.items()):
        data = yaml.safe_load(path.read_text()) or {}
        if (isinstance(data, dict) and set(data) <= keys) == (kind == "experiment"):
            out.append(name)
    return out
