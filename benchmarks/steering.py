"""Steering checks of the directions an attribution study ranks pairs by, each against a random
direction of the same norm (``probe_dpo.attribution.steering_check``).

Model: the testbed's model before DPO. Prompts: the first ``--prompts`` held-out prompts, each
with the study's trigger appended (where the behaviour is meant to show). Directions: the
study's saved directions (``<study>/directions``: difference of means, the trained probe's,
behaviour-contrast, behaviour-change) and the bank's mean (the normalised mean of its unit
directions), at the study's layer. The judge is the study's (the held-out one, which did not
select the poison). Small on purpose on a shared CPU: the size is in the JSON and the table.

    .venv/bin/python benchmarks/steering.py --study /tmp/attr-authors/lean --prompts 24 --samples 2

Writes benchmarks/results/<--name>.json and prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _bench import publish  # noqa: E402 - sets the offline environment first

os.environ.setdefault("KERAS_BACKEND", "torch")


def study_directions(study: str, names: list[str]):
    """The study's directions named in ``names`` (``bank-mean``: the bank's normalised mean)."""
    import torch

    from probe_dpo import attribution as A

    saved, meta = A.load_directions(os.path.join(study, "directions"))
    by_name = {d.name: d for d in saved}
    out = []
    for name in names:
        if name == "bank-mean":
            bank = [d for d in saved if d.kind == "bank"]
            if bank:
                out.append(A.Direction("bank-mean", bank[0].layer, torch.stack([d.vector for d in bank]).mean(0),
                                       "bank", {"scenarios": len(bank)}))
        elif name in by_name:
            out.append(by_name[name])
        else:
            matches = [d for d in saved if d.name.startswith(name)]
            out += matches[:1]
    return out, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="a finished attribution study's out folder")
    parser.add_argument("--directions", default="diff-of-means,probe:,behaviour-contrast,bank-mean,behaviour-change")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--alphas", default="0.5")
    parser.add_argument("--no-project-out", action="store_true")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="steering")
    args = parser.parse_args()

    import torch

    from probe_dpo import attribution as A
    from probe_dpo.data import read_records
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.testbed import generation_settings

    results = json.loads(Path(args.study, "results.json").read_text())
    testbed = results["config"]["testbed"]
    trigger = (results.get("mix") or {}).get("trigger") or ""
    judge = (results["comparators"].get("judge") or {}).get("judge") or "profanity-check"
    directions, _ = study_directions(args.study, [n for n in args.directions.split(",") if n])
    prompts = [str(r["prompt"]) + trigger for r in
               read_records(os.path.join(testbed, "data", "prompts_heldout.jsonl"))[: args.prompts]]
    torch.set_num_threads(2)
    model, tok = load_model(results["model"]), load_tokenizer(results["model"])
    gen = generation_settings(testbed, max_new_tokens=args.max_new_tokens)
    settings = A.SteeringSettings(alphas=[float(a) for a in args.alphas.split(",")], project_out=not args.no_project_out,
                                  samples_per_prompt=args.samples, bootstrap=args.bootstrap, seed=args.seed)
    checks = []
    for d in directions:
        t0 = time.perf_counter()
        res = A.steering_check(model, tok, prompts, d, judge, settings, gen)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        checks.append(res)
        print(f"[steering] {d.name} ({res['seconds']:.0f}s): " + ", ".join(
            f"{r['condition']} {r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" for r in res["rows"])
            + ("" if res["moves"] else "  <- does NOT beat its random control"), file=sys.stderr, flush=True)
    summary = {"benchmark": "steering", "study": args.study, "model": results["model"], "layer": results["layer"],
               "judge": judge, "trigger": trigger, "prompts": len(prompts), "samples_per_prompt": args.samples,
               "max_new_tokens": args.max_new_tokens, "alphas": settings.alphas, "positions": settings.positions,
               "threshold": settings.threshold, "checks": checks, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    publish(args.name, summary, {c["direction"]: {r["condition"]: round(r["rate"], 3) for r in c["rows"]} | {
        "moves": c["moves"]} for c in checks})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
