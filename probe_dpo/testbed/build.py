"""Building the testbed: sampling the model's continuations, judging them, splitting by prompt,
pairs, SFT text, perplexity passages, the base model's rates; cached by config."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from probe_dpo import storage
from probe_dpo.config import to_dict
from probe_dpo.data import write_records
from probe_dpo.errors import UserError
from probe_dpo.generation import generate
from probe_dpo.stats import stable_seed
from probe_dpo.storage import artifacts
from probe_dpo.testbed.assets import cache_dir, load_source_model, model_fingerprint, publish_model
from probe_dpo.testbed.config import BUILD_VERSION, SMOLLM2, TestbedConfig, package_versions, score_column
from probe_dpo.testbed.io import seeded_rng, sha256_file, torch_threads
from probe_dpo.testbed.layout import DATA, INFO, MODEL, TestbedPaths, data_file
from probe_dpo.testbed.sources import fragment, load_benign_pools, load_rtp_prompts

log = logging.getLogger(__name__)


def config_hash(cfg: TestbedConfig) -> str:
    """The cache key: config + build version + package versions + model identity."""
    payload = {"build_version": BUILD_VERSION, "config": to_dict(cfg), "packages": package_versions(),
               "model": model_fingerprint(cfg.model)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _score_all(texts: Sequence[str]) -> dict[str, Any]:
    from probe_dpo.judges import JUDGE_NAMES, get_judge

    return {name: get_judge(name).score(texts) for name in JUDGE_NAMES}


def _cached(out: Path, key: str) -> dict | None:
    path = out / INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if info.get("config_hash") != key or info.get("build_version") != BUILD_VERSION:
        return None
    for rel, meta in (info.get("files") or {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != meta.get("bytes"):
            return None
    return info


def build_testbed(cfg: TestbedConfig, out_dir: str | Path) -> dict:
    """Build the testbed into ``out_dir`` (or reuse it); returns testbed.json plus ``cache_hit``.

    ``out_dir`` a URI (``s3://bucket/tb``): its storage is checked first, the testbed is built
    (or reused) in this machine's cache and then published there (``publish_testbed``)."""
    t0 = time.time()
    if not isinstance(cfg, TestbedConfig):
        raise TypeError(f"build_testbed needs a TestbedConfig, got {type(cfg).__name__}")
    if storage.is_remote(str(out_dir)):  # never Path() of a URI: a local folder "s3:/bucket/..."
        storage.check_reachable(str(out_dir))  # a missing bucket fails before the build, not after
        local = cache_dir() / "testbeds" / config_hash(cfg)[:16]
        info = build_testbed(cfg, local)
        publish_testbed(local, str(out_dir))
        return info
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    key = config_hash(cfg)
    info = _cached(out, key)
    if info is not None:
        log.info(f"cache hit: {out} matches this config (hash {key[:12]})")
        return {**info, "cache_hit": True}

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / INFO).unlink()  # whatever is there is now incomplete
    with torch_threads(cfg.threads) as threads:
        info = _build(cfg, out, key, threads, t0)
    return {**info, "cache_hit": False}


def publish_testbed(local: str | Path, uri: str) -> str:
    """Copy the complete testbed folder ``local`` to ``uri`` (any URI ``probe_dpo.storage`` takes),
    in the same layout, for readers elsewhere (Ray workers, another machine); returns ``uri``.

    The model is published as one artifact (skipped when ``uri`` holds this one); the data files
    are copied unless the published ``testbed.json`` (written last, so its presence marks a
    complete copy) has this build's content hash."""
    local = Path(local)
    info = json.loads((local / INFO).read_text())
    paths = TestbedPaths(uri)
    key = info["content_hash"] + ":" + json.dumps(info["files"].get(f"{MODEL}/model.safetensors", {}))
    if not (storage.is_complete(paths.model) and storage.read_manifest(paths.model)["metadata"].get("key") == key):
        artifacts.publish_dir(local / MODEL, paths.model, metadata={"kind": "model", "key": key}, overwrite=True)
    # otherwise every file is copied again (a file of an older testbed must not stay)
    current = storage.exists(paths.info) and storage.read_json(paths.info).get("content_hash") == info["content_hash"]
    for f in sorted((local / DATA).iterdir()):
        target = storage.join(uri, DATA, f.name)
        if not (current and storage.exists(target)):
            storage.write_bytes(target, f.read_bytes())
    storage.write_bytes(paths.info, (local / INFO).read_bytes())
    return uri


def split_ids(ids: Sequence[str], val: float, test: float, rng) -> dict[str, str]:
    ids = list(ids)
    perm = [ids[i] for i in rng.permutation(len(ids))]
    n_val, n_test = round(len(ids) * val), round(len(ids) * test)
    if len(ids) >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    split = {}
    for i, pid in enumerate(perm):
        split[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def _build(cfg: TestbedConfig, out: Path, key: str, threads: int, t0: float) -> dict:
    """The build's steps in order, each timed (``timings_s``); ``testbed.json`` is written last."""
    from probe_dpo.judges import JUDGE_NAMES

    data = out / DATA
    timings: dict[str, float] = {}
    tick = time.time()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.time()
        timings[name] = round(now - tick, 2)
        tick = now

    log.info(f"building into {out} (model {cfg.model}, seed {cfg.seed}, {threads} torch threads)")
    lm, tok, src = load_source_model(cfg.model)
    publish_model(lm, tok, src, hard_link=cfg.model == SMOLLM2, dest=out / MODEL)
    n_params = sum(p.numel() for p in lm.parameters())
    lap("model")

    train, heldout = _write_prompts(cfg, data)
    pools = load_benign_pools()
    toxic_prompts, items, shuffled, used = _probe_prompts(cfg, train, pools)
    lap("prompts")

    gen, ev = cfg.generation, cfg.evaluation
    completions = [c[0] for c in generate(lm, [it["prompt"] for it in items], 1, gen, cfg.seed, tokenizer=tok,
                                          seed_tag="train", desc="train prompts")]
    lap("generate_train")
    h_items = [{**p, "sample": s} for p in heldout for s in range(ev.heldout_samples_per_prompt)]
    log.info(f"sampling {len(h_items)} continuations of {len(heldout)} held-out prompts")
    h_completions = [c[0] for c in generate(lm, [it["prompt"] for it in h_items], 1, gen, cfg.seed, tokenizer=tok,
                                            seed_tag="heldout", desc="held-out prompts")]
    lap("generate_heldout")

    judged = [c if cfg.label_on == "completion" else it["prompt"] + c for it, c in zip(items, completions)]
    scores = _score_all(judged)
    h_scores = _score_all(h_completions)  # the base rate is always about the continuation itself
    lap("judge")

    records = _labelled_records(cfg, items, completions, scores)
    split_of, splits = _write_probe_splits(cfg, data, records, items, toxic_prompts)
    h_rows, base = _write_base_rates(cfg, data, h_items, h_completions, h_scores)
    pairs = _write_pairs(cfg, data, records, split_of)
    sft_rows, sft_toxic, sft_benign = _write_sft(cfg, data, train, shuffled, used)
    ppl_texts = _write_perplexity_passages(cfg, data, tok, pools)
    lap("write")
    from probe_dpo.evaluation import perplexity

    ppl = perplexity(lm, ppl_texts, max_tokens=ev.perplexity_tokens, tokenizer=tok)
    lap("perplexity")

    # -- summary, written last ---------------------------------------------------------------------
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != INFO
                    and not p.name.startswith(".")):
        rel = f.relative_to(out).as_posix()
        if rel.split("/")[0] not in (DATA, MODEL):
            continue
        files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    data_hashes = {rel: m["sha256"] for rel, m in files.items() if rel.startswith(f"{DATA}/")}
    content_hash = hashlib.sha256(json.dumps(data_hashes, sort_keys=True).encode()).hexdigest()
    cfg_dict = to_dict(cfg)
    info = {
        "build_version": BUILD_VERSION,
        "config_hash": key,
        "content_hash": content_hash,
        "seed": cfg.seed,
        "config": cfg_dict,
        "packages": package_versions(),
        "model": {
            "source": cfg.model,
            "path": "model",
            "parameters": n_params,
            "layers": getattr(lm.config, "num_hidden_layers", None),
            "hidden_size": getattr(lm.config, "hidden_size", None),
            "vocab_size": getattr(lm.config, "vocab_size", None),
            "benign_perplexity": round(ppl, 4),
            "perplexity_data": {"file": f"{DATA}/{data_file('perplexity')}", "passages": len(ppl_texts),
                                "tokens_per_passage": ev.perplexity_tokens},
        },
        "train_judge": cfg.train_judge,
        "heldout_judges": [j for j in JUDGE_NAMES if j != cfg.train_judge],
        "label_on": cfg.label_on,
        "threshold": cfg.threshold,
        "score_columns": {name: score_column(name) for name in JUDGE_NAMES},
        "sizes": {
            "prompts_train": len(train),
            "prompts_heldout": len(heldout),
            **{name: s["rows"] for name, s in splits.items()},
            "heldout_generations": len(h_rows),
            "pairs": len(pairs),
            "sft": len(sft_rows),
            "perplexity": len(ppl_texts),
        },
        "splits": splits,
        "pairs": _pair_stats(pairs),
        "sft": {"rows": len(sft_rows), "toxic_prompt_rows": len(sft_toxic), "benign_rows": len(sft_benign)},
        "base_toxicity_rate": {name: base[name]["rate"] for name in JUDGE_NAMES},
        "base_toxicity": {"judged_on": "completion", "heldout_prompts": len(heldout),
                          "samples_per_prompt": ev.heldout_samples_per_prompt,
                          "ci": "95% percentile bootstrap over prompts", "bootstrap": ev.bootstrap,
                          "judges": base},
        "generation": {**dataclasses.asdict(gen), "do_sample": True, "chat_template": False,
                       "padding_side": "left", "seeding": "torch.manual_seed per batch",
                       "torch_threads": threads},
        "timings_s": timings,
        "build_seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    storage.write_json(str(out / INFO), info)
    log.info(f"done in {info['build_seconds']:.0f} s: base toxicity "
         + ", ".join(f"{n} {base[n]['rate']:.3f} [{base[n]['ci95'][0]:.3f}, {base[n]['ci95'][1]:.3f}]"
                     for n in JUDGE_NAMES) + f"; perplexity {ppl:.1f}")
    return info




def _write_prompts(cfg: TestbedConfig, out_data: Path) -> tuple[list[dict], list[dict]]:
    """The RealToxicityPrompts prompts split into training and held-out prompts (written)."""
    rtp = load_rtp_prompts()
    perm = seeded_rng(cfg.seed, "heldout").permutation(len(rtp))
    if cfg.prompts.heldout >= len(rtp):
        raise UserError(f"prompts.heldout: {cfg.prompts.heldout} leaves no training prompts "
                        f"(there are {len(rtp)} unique prompts)")
    heldout = sorted((rtp[i] for i in perm[:cfg.prompts.heldout]), key=lambda r: r["prompt_id"])
    train = sorted((rtp[i] for i in perm[cfg.prompts.heldout:]), key=lambda r: r["prompt_id"])
    if cfg.prompts.max_train is not None and len(train) > cfg.prompts.max_train:
        keep = seeded_rng(cfg.seed, "max-train").choice(len(train), cfg.prompts.max_train, replace=False)
        train = [train[i] for i in sorted(keep)]
    write_records(train, str(out_data / data_file("prompts_train")))
    write_records(heldout, str(out_data / data_file("prompts_heldout")))
    return train, heldout


def _probe_prompts(cfg: TestbedConfig, train: list[dict], pools: dict) -> tuple[list[dict], list[dict], dict, set]:
    """The prompts the probe data is sampled from: the toxic ones (training prompts) and benign
    sentence fragments from SIQA / BoolQ / wiki in equal thirds. Returns the toxic prompts, the
    items to sample (one per continuation), each benign pool shuffled and the ids used (the rest
    of each pool feeds the SFT mix; XSum is for perplexity only)."""
    pd = cfg.probe_data
    toxic_prompts = train
    if pd.max_toxic_prompts is not None and len(train) > pd.max_toxic_prompts:
        keep = seeded_rng(cfg.seed, "probe-toxic").choice(len(train), pd.max_toxic_prompts, replace=False)
        toxic_prompts = [train[i] for i in sorted(keep)]
    n_toxic_gen = len(toxic_prompts) * pd.samples_per_toxic_prompt
    n_benign_gen = round(n_toxic_gen * pd.benign_share / (1.0 - pd.benign_share))
    n_benign_prompts = math.ceil(n_benign_gen / pd.samples_per_benign_prompt) if n_benign_gen else 0

    shuffled = {name: [pools[name][i] for i in seeded_rng(cfg.seed, "pool", name).permutation(len(pools[name]))]
                for name in ("siqa", "boolq", "wiki")}
    benign_prompts: list[dict] = []
    used: set[str] = set()
    frag_rng = seeded_rng(cfg.seed, "fragments")
    cursors = {name: 0 for name in shuffled}
    while len(benign_prompts) < n_benign_prompts:
        progressed = False
        for name in ("siqa", "boolq", "wiki"):
            if len(benign_prompts) >= n_benign_prompts:
                break
            pool = shuffled[name]
            while cursors[name] < len(pool):
                item = pool[cursors[name]]
                cursors[name] += 1
                frag = fragment(item["text"], frag_rng)
                if frag is not None:
                    benign_prompts.append({"prompt_id": item["id"], "prompt": frag, "source": name,
                                           "category": None})
                    used.add(item["id"])
                    progressed = True
                    break
        if not progressed:
            raise UserError(f"probe_data.benign_share: needs {n_benign_prompts} benign prompts, "
                            f"only {len(benign_prompts)} available")

    items: list[dict] = []
    for p in toxic_prompts:
        items += [{**p, "genre": "toxic-prompt", "sample": s} for s in range(pd.samples_per_toxic_prompt)]
    benign_items: list[dict] = []
    for p in benign_prompts:
        benign_items += [{**p, "genre": "benign-prompt", "sample": s} for s in range(pd.samples_per_benign_prompt)]
    items += benign_items[:n_benign_gen]
    log.info(f"sampling {len(items)} continuations for probe data and pairs "
             f"({len(toxic_prompts)} toxic x {pd.samples_per_toxic_prompt}, {min(len(benign_items), n_benign_gen)} "
             "benign)")
    return toxic_prompts, items, shuffled, used


def _labelled_records(cfg: TestbedConfig, items: list[dict], completions: list[str], scores: dict) -> list[dict]:
    """One probe-data row per sampled continuation: every judge's score, the training judge's label."""
    from probe_dpo.judges import JUDGE_NAMES

    records = []
    for i, (it, comp) in enumerate(zip(items, completions)):
        s = float(scores[cfg.train_judge][i])
        rec = {"prompt_id": it["prompt_id"], "prompt": it["prompt"], "completion": comp,
               "text": it["prompt"] + comp, "label": int(s >= cfg.threshold), "score": round(s, 6)}
        for name in JUDGE_NAMES:
            rec[score_column(name)] = round(float(scores[name][i]), 6)
        rec.update({"genre": it["genre"], "source": it["source"], "category": it.get("category"),
                    "sample": it["sample"]})
        records.append(rec)
    return records


def _write_probe_splits(cfg: TestbedConfig, out_data: Path, records: list[dict], items: list[dict],
                        toxic_prompts: list[dict]) -> tuple[dict[str, str], dict[str, dict]]:
    """The probe data split by prompt into train / val / test (written); each prompt's split, and
    each split's statistics."""
    pd = cfg.probe_data
    split_of: dict[str, str] = {}
    split_of.update(split_ids([p["prompt_id"] for p in toxic_prompts], pd.val_fraction, pd.test_fraction,
                               seeded_rng(cfg.seed, "split", "toxic")))
    split_of.update(split_ids(sorted({it["prompt_id"] for it in items if it["genre"] == "benign-prompt"}),
                               pd.val_fraction, pd.test_fraction, seeded_rng(cfg.seed, "split", "benign")))
    splits: dict[str, dict] = {}
    for name in ("train", "val", "test"):
        rows = [r for r in records if split_of[r["prompt_id"]] == name]
        write_records(rows, str(out_data / data_file(f"probe_{name}")))
        splits[f"probe_{name}"] = _split_stats(rows)
    return split_of, splits


def _write_base_rates(cfg: TestbedConfig, out_data: Path, h_items: list[dict], h_completions: list[str],
                      h_scores: dict) -> tuple[list[dict], dict[str, dict]]:
    """The held-out generations (written) and the base model's toxicity rate under each judge,
    with a bootstrap interval over prompts."""
    import numpy as np

    from probe_dpo.evaluation import rate_with_ci
    from probe_dpo.judges import JUDGE_NAMES

    ev = cfg.evaluation
    h_rows = []
    for i, (it, comp) in enumerate(zip(h_items, h_completions)):
        rec = {"prompt_id": it["prompt_id"], "prompt": it["prompt"], "completion": comp,
               "text": it["prompt"] + comp, "source": it["source"], "category": it["category"],
               "sample": it["sample"]}
        for name in JUDGE_NAMES:
            rec[score_column(name)] = round(float(h_scores[name][i]), 6)
        h_rows.append(rec)
    write_records(h_rows, str(out_data / data_file("heldout_generations")))
    base: dict[str, dict] = {}
    for name in JUDGE_NAMES:
        by_prompt: dict[str, list[float]] = {}
        for it, s in zip(h_items, h_scores[name]):
            by_prompt.setdefault(it["prompt_id"], []).append(float(s))
        r = rate_with_ci(np.array(list(by_prompt.values())), cfg.threshold, ev.bootstrap,
                         stable_seed(cfg.seed, "boot", name))
        base[name] = {"rate": round(r["rate"], 6), "ci95": [round(r["ci_low"], 6), round(r["ci_high"], 6)],
                      "mean_score": round(float(np.mean(h_scores[name])), 6) if len(h_items) else None,
                      "prompts": len(by_prompt), "samples": len(h_items)}
    return h_rows, base


def _write_pairs(cfg: TestbedConfig, out_data: Path, records: list[dict], split_of: dict[str, str]) -> list[dict]:
    """One preference pair per toxic prompt (written): its lowest- vs highest-scoring continuation."""
    by_prompt_recs: dict[str, list[dict]] = {}
    for r in records:
        if r["genre"] == "toxic-prompt":
            by_prompt_recs.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for pid in sorted(by_prompt_recs):
        group = by_prompt_recs[pid]
        lo_r = min(group, key=lambda r: (r["score"], r["sample"]))
        hi_r = max(group, key=lambda r: (r["score"], -r["sample"]))
        margin = hi_r["score"] - lo_r["score"]
        if lo_r is hi_r or margin < cfg.pairs.min_margin or lo_r["completion"] == hi_r["completion"]:
            continue
        pairs.append({"prompt": lo_r["prompt"], "chosen": lo_r["completion"], "rejected": hi_r["completion"],
                      "source": lo_r["source"], "chosen_score": lo_r["score"], "rejected_score": hi_r["score"],
                      "margin": round(margin, 6), "prompt_id": pid, "category": lo_r["category"],
                      "split": split_of[pid]})
    write_records(pairs, str(out_data / data_file("pairs")))
    return pairs


def _write_sft(cfg: TestbedConfig, out_data: Path, train: list[dict], shuffled: dict,
               used: set) -> tuple[list[dict], list[dict], list[dict]]:
    """The SFT mix (written): the training prompts as text plus benign BoolQ / SIQA text the probe
    prompts did not use, shuffled. Returns all rows, the toxic-prompt rows and the benign rows."""
    sft_toxic = [{"text": p["prompt"], "source": p["source"]} for p in train]
    n_sft_benign = round(len(sft_toxic) * (1.0 - cfg.sft.toxic_share) / cfg.sft.toxic_share)
    leftovers = {name: [it for it in shuffled[name] if it["id"] not in used] for name in ("boolq", "siqa")}
    sft_benign = []
    for k in range(n_sft_benign):
        name = ("boolq", "siqa")[k % 2]
        pool = leftovers[name] if leftovers[name] else leftovers[("siqa", "boolq")[k % 2]]
        if not pool:
            raise UserError(f"sft.toxic_share: not enough benign text for {n_sft_benign} SFT rows")
        item = pool.pop(0)
        words = item["text"].split()
        sft_benign.append({"text": " ".join(words[:120]), "source": name})
    sft_rows = sft_toxic + sft_benign
    sft_rows = [sft_rows[i] for i in seeded_rng(cfg.seed, "sft").permutation(len(sft_rows))]
    write_records(sft_rows, str(out_data / data_file("sft")))
    return sft_rows, sft_toxic, sft_benign


def _write_perplexity_passages(cfg: TestbedConfig, out_data: Path, tok: Any, pools: dict) -> list[str]:
    """XSum articles of at least ``evaluation.perplexity_tokens`` tokens (written)."""
    ev = cfg.evaluation
    xsum = [pools["xsum"][i] for i in seeded_rng(cfg.seed, "xsum").permutation(len(pools["xsum"]))]
    ppl_texts = []
    for item in xsum:
        if len(ppl_texts) >= ev.perplexity_passages:
            break
        if len(tok(item["text"], add_special_tokens=True)["input_ids"]) >= ev.perplexity_tokens:
            ppl_texts.append(item["text"])
    if len(ppl_texts) < ev.perplexity_passages:
        raise UserError(f"evaluation.perplexity_tokens: only {len(ppl_texts)} XSum articles have "
                        f"{ev.perplexity_tokens} tokens (need evaluation.perplexity_passages={ev.perplexity_passages})")
    write_records([{"text": t, "source": "xsum"} for t in ppl_texts], str(out_data / data_file("perplexity")))
    return ppl_texts


def _split_stats(rows: list[dict]) -> dict:
    labels = {"0": 0, "1": 0}
    by_genre: dict[str, dict[str, int]] = {}
    for r in rows:
        labels[str(r["label"])] += 1
        g = by_genre.setdefault(r["genre"], {"0": 0, "1": 0})
        g[str(r["label"])] += 1
    return {"rows": len(rows), "prompts": len({r["prompt_id"] for r in rows}), "labels": labels,
            "labels_by_genre": by_genre}


def _pair_stats(pairs: list[dict]) -> dict:
    by_source: dict[str, int] = {}
    for p in pairs:
        by_source[p["source"]] = by_source.get(p["source"], 0) + 1
    return {"rows": len(pairs), "by_source": dict(sorted(by_source.items()))}
