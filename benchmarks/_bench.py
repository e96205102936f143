"""What every benchmark script shares: the offline environment and where results go.

Imported before torch, transformers or Ray, so the variables are set before those read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                     ("RAY_AUTH_MODE", "disabled")):
    os.environ.setdefault(_key, _value)


def publish(name: str, result: dict, summary: dict) -> None:
    """Write ``results/<name>.json`` and print the ``RESULT {json}`` line (the last line)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("RESULT " + json.dumps(summary))
