"""Regenerate the committed reference run of `make demo` (``examples/demo/``).

    python examples/reference.py                 # run (or resume) the demo in runs/demo, then bundle it
    python examples/reference.py --skip-run      # bundle an existing run folder as it is
    python examples/reference.py --check         # does README.md's table match the committed bundle?
    python examples/reference.py --skip-run --run runs/demo-grpo --bundle examples/demo-grpo
                                                 # bundle another run (no README table)
    python examples/reference.py --skip-run --run runs/map --bundle examples/map
                                                 # the map, and README's map table (between its markers)
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "examples" / "demo"
README = ROOT / "README.md"
START, END = "<!-- example-table:start -->", "<!-- example-table:end -->"
MAP_BUNDLE = ROOT / "examples" / "map"
STUDY_BUNDLE = ROOT / "examples" / "attribution-lean"
FILES = ["results.json", "report.md", "report.html", "analysis-plan.json", "config.yaml", "shared/timings.json"]
PACKAGES = ["torch", "transformers", "trl", "ray", "deepspeed", "peft", "accelerate", "datasets", "numpy", "scipy"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the head, its rule, a line per row (every README table here)."""
    return ["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]]


def readme_table(results: dict) -> str:
    """The README's table of the reference run: every arm's label, the coordinate that decided it,
    and the rate changes under every judge with the between-seed spread, from ``results.json``."""
    judges = list(results["base"]["toxicity"])
    in_loop = set(results["analysis"]["judges"]["in_loop"])
    head = ["arm", "seeds", "outcome", "decided by"] + [
        f"toxic rate, {j}{' (in the loop)' if j in in_loop else ''}: change [95% CI] (each seed)" for j in judges]
    rows = []
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
    lines = markdown_table(head, rows)
    lines += ["", "Base model toxic rate: " + ", ".join(f"{j} {base[j]['rate']:.3f}" for j in judges)
              + f". Plan sha256 `{a['sha256'][:16]}`; family of {a['family_size']} tests, alpha {a['alpha']}; "
              f"seed labels agreeing with the pooled label: {a['replication'].get('agree', '-')} of "
              f"{a['replication'].get('of', '-')}. Source: [`examples/demo/results.json`](examples/demo/results.json), "
              "report: [`examples/demo/report.md`](examples/demo/report.md)."]
    return "\n".join(lines)


def map_table(results: dict, source: str) -> str:
    """The README's table of a map (``results.json``'s ``map``, 1 or 2 axes): a row per value of
    the first axis, a column per value of the second; each cell its label (* refined), the train
    probe's TPR change on fixed texts, and the step the early warning first fired at per seed."""
    m = results["map"]
    first, second = (m["axes"] + [None])[:2]

    def values(axis: str | None) -> list:
        seen = list(dict.fromkeys(c["point"][axis] for c in m["cells"])) if axis else [None]
        return sorted(seen) if all(isinstance(v, (int, float)) for v in seen) else seen

    def text(cell: dict | None) -> str:
        if cell is None:
            return "-"
        tpr = cell["tpr_change"].get("train")
        steps = "/".join("-" if s is None else str(s) for s in cell["early_warning_step"])
        return (f"{cell['label']}{'*' if cell['stage'] == 'refined' else ''}"
                + ("" if tpr is None else f", TPR {tpr:+.2f}") + (f", warned at {steps}" if steps else ""))

    at = {(c["point"][first], c["point"].get(second) if second else None): c for c in m["cells"]}
    cols = values(second)
    head = [f"{first} \\ {second}", *map(str, cols)] if second else [first, "cell"]
    lines = markdown_table(head, [[str(v), *[text(at.get((v, c))) for c in cols]] for v in values(first)])
    point = {c["arm"]: c["point"] for c in m["cells"]}

    def boundary(b: dict) -> str:
        lo, hi = (point[a] for a in b["between"])
        rest = ", ".join(f"{k}={v}" for k, v in lo.items() if k != b["axis"])
        return (f"{b['axis']} {lo[b['axis']]} ({b['labels'][0]}) to {hi[b['axis']]} ({b['labels'][1]})"
                + (f" at {rest}" if rest else ""))

    w = m["early_warning"]
    rate = "-" if w["false_alarm_rate"] is None else f"{w['false_alarm_rate']:.2f}"
    lines += ["", f"Family {m['family']}; * refined after the coarse grid. Early warning over the {w['seeds_on']} "
              f"seeds where it ran: fired in {w['hits']} of {w['hits'] + w['misses']} obfuscated seeds, false alarms "
              f"in {w['false_alarms']} of {w['false_alarms'] + w['quiet']} removed or blatant seeds (rate {rate}). "
              f"Boundaries: {'; '.join(map(boundary, m['boundaries'])) or 'none'}. "
              f"Source: [`{source}`]({source})."]
    return "\n".join(lines)


def study_table(results: dict, source: str) -> str:
    """The README's table of an attribution study with retraining: for each retrained ranking and
    budget, its recall of the bad pairs, what the filter removed, the primary judge's toxic rate
    after DPO on what is left, its reduction vs DPO on the raw set and its difference from the
    random filter at the same budget (Holm), and the task accuracy."""
    retrain, judge = results["retrain"], results["retrain"]["judges"][0]
    arms, k = retrain["arms"], results["k"]

    def ci(x: dict, key: str, lo: str = "ci_low", hi: str = "ci_high", pct: bool = False) -> str:
        f = (lambda v: f"{100 * v:+.0f}%") if pct else (lambda v: f"{v:.3f}")
        return f"{f(x[key])} [{f(x[lo])}, {f(x[hi])}]"

    head = ["ranking", f"recall@{k} [95% CI]", "filter", "removed (poisoned)", f"toxic rate, {judge}",
            "reduction vs raw DPO", "rate minus random's, Holm p", "BoolQ accuracy"]
    rows = []
    for name, arm in arms.items():
        if "budget" not in arm:
            continue
        m, vs = arm["ranking"], arm.get("vs_random")
        recall = results["recall"].get(m)
        lo, hi = results["recall_ci"].get(m, [None, None])
        cap = arm.get("capability")
        rows.append([
            f"probe ({results.get('direction')})" if m == "probe" else m, "-" if recall is None else f"{recall:.3f} [{lo:.3f}, {hi:.3f}]", f"top {100 * arm['budget']:g}%",
            f"{arm['k']} ({arm.get('bad_affected', '-')})", ci(arm["rates"][judge], "rate"),
            ci(arm["reduction"][judge], "reduction", pct=True),
            "control" if vs is None else f"{ci(vs[judge], 'delta', 'delta_ci_low', 'delta_ci_high')}, "
                                         f"{vs[judge]['p_holm']:.3f}",
            "-" if not cap else ci(cap, "accuracy")])
    lines = markdown_table(head, rows)
    base, raw = arms["base"]["rates"][judge], arms["raw"]["rates"][judge]
    chance = results["recall"].get("chance")
    lines += ["", f"Toxic rate under {judge}: base model {ci(base, 'rate')}, DPO on the raw set {ci(raw, 'rate')}; "
              f"a random ranking's expected recall@{k} {'-' if chance is None else f'{chance:.3f}'}. One training seed per arm; 95% intervals by a "
              f"paired bootstrap over prompts. Source: [`{source}`]({source})."]
    return "\n".join(lines)


def readme_with_table(readme: str, table: str, start: str = START, end: str = END) -> str:
    """README text with the block between the markers replaced by ``table``."""
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


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


STUDY_FILES = ["results.json", "sources.json", "audit.json", "directions/directions.json"]
TEXTS = ("prompt", "chosen", "rejected", "completion", "text", "prompts", "examples", "top_pairs")
"""Keys whose values are the testbed's texts (prompts and responses read from packages): withheld."""


def without_texts(value: Any) -> Any:
    """``value`` (parsed JSON) with every text of the testbed's data withheld: a clone reads the
    numbers, and the texts stay in the packages they come from."""
    if isinstance(value, dict):
        return {k: (f"(withheld: {len(v) if isinstance(v, list) else 1} from the testbed's data)" if k in TEXTS
                    else without_texts(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [without_texts(v) for v in value]
    return value


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
    """Copy an attribution study's numbers (results, sources, audit, the directions' metadata,
    every text of the testbed's data withheld; its figures) into ``dest`` with its provenance and
    the check that it ran the declared config. Not its report, the pairs or the scores: they
    quote the packages' texts (cluster examples), which stay in the packages."""
    from importlib.metadata import version

    from probe_dpo.workflows import bundled_config

    results = json.loads((run / "results.json").read_text())
    differs = undeclared(declared, results["config"])
    if differs:
        raise SystemExit(f"{run}: the study's config differs from the declared {declared} in {', '.join(differs)}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in STUDY_FILES:  # directions.json: each direction's provenance (the bank's scenarios), no tensor
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        parsed = results if rel == "results.json" else json.loads((run / rel).read_text())
        data = without_texts(parsed)
        if rel == "results.json":  # its config holds paths, no text
            data["config"] = results["config"]
        (dest / rel).write_text(json.dumps(data, indent=1) + "\n")
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
    elif not args.check:
        if not args.skip_run:
            subprocess.run([sys.executable, "-m", "probe_dpo.cli", "demo", "--storage", args.run], check=True)
        bundle(Path(args.run), dest)
    if not args.check and dest not in (BUNDLE, MAP_BUNDLE, STUDY_BUNDLE):
        print(f"bundled {args.run} into {dest}")
        return 0
    wanted = readme_tables(README.read_text())
    if args.check:
        ok = wanted == README.read_text()
        print("README.md matches the bundles" if ok else "README.md differs from the bundles")
        return 0 if ok else 1
    README.write_text(wanted)
    print(f"bundled {args.run} into {dest.relative_to(ROOT)} and wrote README.md's tables")
    return 0


def readme_tables(readme: str) -> str:
    """README text with every bundled run's table written between its markers: the demo's, and
    the map's and the attribution study's once they are bundled."""
    def results(bundle: Path) -> dict:
        return json.loads((bundle / "results.json").read_text())

    text = readme_with_table(readme, readme_table(results(BUNDLE)))
    if MAP_BUNDLE.exists():
        text = readme_with_table(text, map_table(results(MAP_BUNDLE), "examples/map/results.json"),
                                 "<!-- map-table:start -->", "<!-- map-table:end -->")
    if STUDY_BUNDLE.exists():
        text = readme_with_table(text, study_table(results(STUDY_BUNDLE), "examples/attribution-lean/results.json"),
                                 "<!-- attribution-table:start -->", "<!-- attribution-table:end -->")
    return text


if __name__ == "__main__":
    sys.exit(main())
