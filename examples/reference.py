"""Regenerate the committed reference run of `make demo` (``examples/demo/``).

    python examples/reference.py                 # run (or resume) the demo in runs/demo, then bundle it
    python examples/reference.py --skip-run      # bundle an existing run folder as it is
    python examples/reference.py --check         # does README.md's table match the committed bundle?
    python examples/reference.py --skip-run --run runs/demo-grpo --bundle examples/demo-grpo
                                                 # bundle another run (no README table)
    python examples/reference.py --skip-run --run runs/attribution-lean --bundle examples/attribution-lean \
        --declared attribution-lean              # bundle an attribution study against its declared config

Why: every scientific figure the README states must come from a file a clone has. The run folder
(``runs/demo``) is git-ignored (it holds model weights); this script copies its small, readable
part (results, report, figures, the config, the analysis plan declared before the first trial
and its hash, the stage timings) into ``examples/demo/`` with the commit it was bundled at and
the package versions, and writes the README's reference-run table from that ``results.json``.
``tests/test_examples.py`` checks the README's table against the committed bundle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "examples" / "demo"
README = ROOT / "README.md"
START, END = "<!-- example-table:start -->", "<!-- example-table:end -->"
FILES = ["results.json", "report.md", "report.html", "analysis-plan.json", "config.yaml", "shared/timings.json"]
PACKAGES = ["torch", "transformers", "trl", "ray", "deepspeed", "peft", "accelerate", "datasets", "numpy", "scipy"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def readme_table(results: dict) -> str:
    """The README's table of the reference run: every arm's label, the coordinate that decided it,
    and the rate changes under every judge with the between-seed spread, from ``results.json``."""
    judges = list(results["base"]["toxicity"])
    in_loop = set(results["analysis"]["judges"]["in_loop"])
    head = ["arm", "seeds", "outcome", "decided by"] + [
        f"toxic rate, {j}{' (in the loop)' if j in in_loop else ''}: change [95% CI] (each seed)" for j in judges]
    rows = [head, ["---"] * len(head)]
    for arm, s in results["arms"].items():
        verdict = s.get("outcome") or {}
        decided = verdict.get("decided_by") or {}
        open_ = [c.removeprefix("toxicity:") for c in verdict.get("not_excluded") or []]
        label = f"**{verdict.get('label', 'exploratory')}**" + (f" (a fall not excluded: {', '.join(open_)})"
                                                                 if open_ else "")
        cells = [arm, str(s["seeds"]), label, str(decided.get("coordinate"))]
        for j in judges:
            t = s["toxicity"][j]
            each = ", ".join(_pct(x) for x in t.get("per_seed") or [])
            cells.append(f"{_pct(t['change'])} [{_pct(t['ci_low'])}, {_pct(t['ci_high'])}] ({each})")
        rows.append(cells)
    base = results["base"]["toxicity"]
    a = results["analysis"]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Base model toxic rate: " + ", ".join(f"{j} {base[j]['rate']:.3f}" for j in judges)
              + f". Plan sha256 `{a['sha256'][:16]}`; family of {a['family_size']} tests, alpha {a['alpha']}; "
              f"seed labels agreeing with the pooled label: {a['replication'].get('agree', '-')} of "
              f"{a['replication'].get('of', '-')}. Source: [`examples/demo/results.json`](examples/demo/results.json), "
              "report: [`examples/demo/report.md`](examples/demo/report.md)."]
    return "\n".join(lines)


def readme_with_table(readme: str, table: str) -> str:
    """README text with the block between the markers replaced by ``table``."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def screenshot(page: Path, png: Path) -> None:
    """The top of the report as a person sees it (headless Chromium, Debian's package), for the README."""
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium: the report's screenshot is not updated")
        return
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--no-first-run", "--disable-background-networking", f"--user-data-dir={profile}",
                        "--window-size=1280,1600", "--virtual-time-budget=10000", f"--screenshot={png}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)


def bundle(run: Path, dest: Path = BUNDLE) -> dict:
    """Copy the run's readable part into ``dest`` (``examples/demo``) with its provenance."""
    from importlib.metadata import version

    from probe_dpo.workflows.experiment.results import write_results

    write_results(str(run))  # the report and results.json from storage, with this commit's analysis code
    if dest.exists():
        shutil.rmtree(dest)
    for rel in FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / rel, dest / rel)
    shutil.copytree(run / "figures", dest / "figures")
    screenshot(dest / "report.html", dest / "report.png")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "probe_dpo"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    provenance = {"bundled_at_commit": commit, "library_changed_since_commit": dirty,
                  "python": sys.version.split()[0], "packages": {p: version(p) for p in PACKAGES},
                  "plan_sha256": json.loads((run / "analysis-plan.json").read_text())["sha256"]}
    (dest / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


STUDY_FILES = ["results.json", "report.md", "report.html", "sources.json", "audit.json"]
PATH_KEYS = ("testbed", "probes", "out", "model", "pairs", "poison_labels", "behaviour_data")
"""The attribution study's keys a command line gives (where things are), not what the study does."""


def undeclared(declared: str, ran: dict) -> list[str]:
    """The settings where the study in ``ran`` (its results' config) differs from the bundled
    config ``declared`` (e.g. attribution-lean, committed before the run), paths aside."""
    from probe_dpo.config import load_config, to_dict
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.attribution_study.config import AttributionConfig

    def flat(d: dict, prefix: str = "") -> dict:
        return {k: v for key, value in d.items() if key not in PATH_KEYS or prefix
                for k, v in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}).items()}

    want, got = flat(to_dict(load_config(AttributionConfig, bundled_config(declared), []))), flat(ran)
    return sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))


def bundle_study(run: Path, dest: Path, declared: str) -> dict:
    """Copy an attribution study's readable part (results, report, figures, sources, audit; not
    the pairs or the scores: those hold the packages' texts) into ``dest`` with its provenance and
    the check that it ran the declared config."""
    from importlib.metadata import version

    from probe_dpo.workflows import bundled_config

    results = json.loads((run / "results.json").read_text())
    differs = undeclared(declared, results["config"])
    if differs:
        raise SystemExit(f"{run}: the study's config differs from the declared {declared} in {', '.join(differs)}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in STUDY_FILES:
        shutil.copy2(run / rel, dest / rel)
    shutil.copytree(run / "figures", dest / "figures")
    git = ["git", "-C", str(ROOT)]
    source = Path(bundled_config(declared)).resolve().relative_to(ROOT).as_posix()
    declared_at = subprocess.run([*git, "log", "--diff-filter=A", "--format=%H", "-1", "--", source],
                                 capture_output=True, text=True).stdout.strip()
    provenance = {"bundled_at_commit": subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True,
                                                      text=True).stdout.strip(),
                  "declared_config": source, "declared_at_commit": declared_at,
                  "python": sys.version.split()[0], "packages": {p: version(p) for p in PACKAGES}}
    (dest / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="the demo's run folder")
    parser.add_argument("--skip-run", action="store_true", help="bundle the run folder as it is")
    parser.add_argument("--check", action="store_true", help="only check README.md against the bundle")
    parser.add_argument("--bundle", default=str(BUNDLE), help="where to bundle it (README's table: examples/demo only)")
    parser.add_argument("--declared", help="the run is an attribution study of this bundled config: bundle it")
    args = parser.parse_args(argv)
    dest = Path(args.bundle).resolve()
    if args.declared:
        bundle_study(Path(args.run), dest, args.declared)
        print(f"bundled the {args.declared} study {args.run} into {dest}")
        return 0
    if not args.check:
        if not args.skip_run:
            subprocess.run([sys.executable, "-m", "probe_dpo.cli", "demo", "--storage", args.run], check=True)
        bundle(Path(args.run), dest)
        if dest != BUNDLE:
            print(f"bundled {args.run} into {dest}")
            return 0
    table = readme_table(json.loads((BUNDLE / "results.json").read_text()))
    text = README.read_text()
    if args.check:
        ok = readme_with_table(text, table) == text
        print("README.md matches examples/demo/results.json" if ok else "README.md differs from the bundle")
        return 0 if ok else 1
    README.write_text(readme_with_table(text, table))
    print(f"bundled {args.run} into {BUNDLE.relative_to(ROOT)} and wrote README.md's table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
