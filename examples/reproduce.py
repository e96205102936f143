"""Does this checkout reproduce the committed reference run bit for bit? (the project's reproduction check)

    python examples/reproduce.py                   # run the check into runs/reproduce, compare, write JSON
    python examples/reproduce.py --skip-run        # compare an existing runs/reproduce

Why: a refactor that moves how settings reach the workers (issue 32's typed objects, the arms'
module) must change no behaviour, and only a rerun shows that. This runs the demo's config
(``probe_dpo/workflows/demo.yaml``) for its first arm and seed alone (probe-dpo-single, seed 0;
no base replicate) on the reference run's testbed, from scratch: probes refitted, pairs ranked
again, the base model evaluated, the arm trained on Ray Train + DeepSpeed and evaluated. Then it
compares, number by number, the base model's summary and the trial's row of ``results.json`` with
the committed bundle (``examples/demo/results.json``): every value the reference has must be
equal here (floats exactly), except wall-clock times; keys the reference lacks (fields added
since it ran) are listed apart. The outcome goes to ``benchmarks/results/reproduction.json``.

The testbed is the reference run's own (``runs/demo/testbed``, git-ignored: weights); without it
the demo's testbed is built first (deterministic by content hash, about 20 minutes more).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "examples" / "demo" / "results.json"
OUT = ROOT / "benchmarks" / "results" / "reproduction.json"
TRIAL = "probe-dpo-single-s0"
CLOCK = ("seconds", "train_seconds", "eval_seconds", "timings")
RUN_COMMIT = "reproduced-at-commit.txt"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def differences(a, b, path: str = "") -> list[str]:
    """Every place two JSON values differ (floats compared exactly; NaN equals NaN), clock keys skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {'the reference' if k in a else 'this run'}" for k in sorted(set(a) ^ set(b))
               if not k.endswith(CLOCK)]
        return out + [d for k in sorted(set(a) & set(b)) if not k.endswith(CLOCK)
                      for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items in the reference, {len(b)} here"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} in the reference, {b!r} here"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "reproduce"), help="run folder of the check")
    parser.add_argument("--testbed", default=str(ROOT / "runs" / "demo" / "testbed"),
                        help="the reference run's testbed (built first when missing)")
    parser.add_argument("--skip-run", action="store_true", help="compare an existing run folder")
    args = parser.parse_args()
    if not args.skip_run:
        overrides = ["arms=[probe-dpo-single]", "seeds=[0]", "analysis.base_replicate=false",
                     f"storage={args.run}", "concurrent_trials=1"]
        if Path(args.testbed, "testbed.json").exists():
            overrides.append(f"testbed_dir={args.testbed}")
        Path(args.run).mkdir(parents=True, exist_ok=True)
        Path(args.run, RUN_COMMIT).write_text(_commit() + "\n")  # the code the rerun ran (the comparer may be newer)
        subprocess.run([sys.executable, "-m", "probe_dpo.cli", "experiment", "--config", "demo", *overrides],
                       check=True)
    ref, now = json.loads(REFERENCE.read_text()), json.loads(Path(args.run, "results.json").read_text())
    # a row's outcome label is the analysis of its whole run (4 arms there, 1 here): not a measurement
    row_ref = {k: v for k, v in next(r for r in ref["rows"] if r["trial"] == TRIAL).items() if k != "outcome"}
    row_now = {k: v for k, v in next(r for r in now["rows"] if r["trial"] == TRIAL).items() if k != "outcome"}
    found = {"base": differences(ref["base"], now["base"]), TRIAL: differences(row_ref, row_now)}
    # a key the reference lacks is a field added since it ran (reported, not a changed behaviour)
    added = {k: [d for d in v if d.endswith("only in this run")] for k, v in found.items()}
    found = {k: [d for d in v if not d.endswith("only in this run")] for k, v in found.items()}
    ran = Path(args.run, RUN_COMMIT)
    out = {"what": "the demo's base evaluation and its first trial rerun from scratch on the reference testbed, "
                   "compared with examples/demo/results.json value by value (floats exactly; times skipped)",
           "run_at_commit": ran.read_text().strip() if ran.exists() else None, "compared_at_commit": _commit(),
           "reference_bundled_at": json.loads((REFERENCE.parent / "provenance.json").read_text())
           .get("bundled_at_commit"),
           "compared": {k: {"values_differing_or_missing": len(v), "first": v[:20], "added_since": added[k]}
                        for k, v in found.items()},
           "identical": not any(found.values())}
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if out["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
