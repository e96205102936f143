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
