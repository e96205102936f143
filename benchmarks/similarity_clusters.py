"""The test-prompt x pair similarity matrix of a finished attribution study, clustered
(``probe_dpo.attribution.cluster_similarity``), from what the study saved: its vector bank
(``<study>/directions``, kind ``bank``), its pairs and labels (``<study>/mix``) and the model
before DPO, which reads the pairs again in this process. The pairs' bank-max scores are checked
against the study's ``scores.parquet`` first, so the matrix is the one the study ranked by.

    .venv/bin/python benchmarks/similarity_clusters.py --study /tmp/attr-authors/lean --name similarity-lean

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="a finished attribution study's out folder (with a bank)")
    parser.add_argument("--k", type=int, default=None, help="pair clusters (default: by silhouette in [2, 8])")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--name", default="similarity-clusters")
    args = parser.parse_args()

    import numpy as np
    import torch

    from probe_dpo import attribution as A
    from probe_dpo.data import read_records
    from probe_dpo.stats import wilson_ci

    results = json.loads(Path(args.study, "results.json").read_text())
    layer, model = results["layer"], results["model"]
    saved, _ = A.load_directions(os.path.join(args.study, "directions"))
    bank = [d for d in saved if d.kind == "bank"]
    if not bank:
        raise SystemExit(f"{args.study}: no vector bank in its directions (behaviour_contrast.bank)")
    pairs = read_records(os.path.join(args.study, "mix", "pairs.jsonl"))
    labels = {r["pair_id"]: r for r in read_records(os.path.join(args.study, "mix", "poison_labels.jsonl"))}
    bad = np.array([bool(labels[p["pair_id"]]["poisoned"]) for p in pairs])
    planted = np.array([bool(labels[p["pair_id"]]["planted"]) for p in pairs])
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    ex = results["config"]["extraction"]
    diffs = A.pair_features(model, pairs, [layer], in_process=True, batch_size=ex["batch_size"],
                            max_length=ex["max_length"]).diffs(layer)
    read_s = time.perf_counter() - t0
    study_scores = {r["pair_id"]: r for r in read_records(os.path.join(args.study, "scores.parquet"))}
    check = np.abs(A.bank_scores(diffs, bank, "max") - [study_scores[p["pair_id"]]["score_bank_max"]
                                                        for p in pairs]).max()
    if check > 1e-3:
        raise SystemExit(f"the pairs read here differ from the study's (bank-max scores differ by {check:.4f})")
    testbed = results["config"]["testbed"]
    train_prompts = read_records(os.path.join(testbed, "data", "prompts_train.jsonl"))
    names = [f"{b.name}: {str(train_prompts[b.meta['scenario']]['prompt'])[:80]}" for b in bank]
    matrix = A.similarity_matrix(diffs, bank)
    cl = A.cluster_similarity(matrix, pairs, prompt_names=names, k=args.k, seed=args.seed, examples=args.examples)
    for c in cl["clusters"]:
        members = cl["labels"] == c["cluster"]
        c["bad"], c["planted"] = int((members & bad).sum()), int((members & planted).sum())
    def match(labelled):  # the best cluster, with Wilson intervals and what a random cluster's precision is
        m = A.best_cluster_match(cl["labels"], labelled)
        hits = round(m["precision"] * m["size"])
        return {**m, "precision_ci": list(wilson_ci(hits, m["size"])),
                "recall_ci": list(wilson_ci(hits, m["behaviour_pairs"])), "base_rate": float(labelled.mean())}

    summary = {
        "benchmark": "similarity-clusters", "exploratory": "one seed, one study, settings fixed before the run "
        "(defaults: k by silhouette in [2, 8]); the bank holds only the scenarios the contrast's filter kept",
        "study": args.study, "model": model, "layer": layer, "pairs": len(pairs), "poisoned": int(bad.sum()),
        "planted": int(planted.sum()), "bank": [b.name for b in bank], "prompts": names,
        "matrix_mean": float(matrix.mean()), "bank_max_check": float(check), "read_seconds": round(read_s, 1),
        "k": cl["k"], "silhouette": cl["silhouette"], "prompt_k": cl["prompt_k"], "block": cl["block"],
        "poison_match": match(bad), "planted_match": match(planted),
        "clusters": cl["clusters"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    publish(args.name, summary, {"k": cl["k"], "poison_match": summary["poison_match"],
                                 "planted_match": summary["planted_match"],
                                 "clusters": [{k: c[k] for k in ("cluster", "size", "alignment", "sources", "bad", "planted")}
                                              for c in cl["clusters"]]})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
