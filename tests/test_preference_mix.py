"""The poisoned preference mix: built from a testbed's scored continuations, labels kept apart,
deterministic, cached by content."""

from __future__ import annotations

import json
import os
import random

import pytest

from probe_dpo import storage
from probe_dpo.data import read_records, write_records
from probe_dpo.errors import UserError
from probe_dpo.preference_mix import PreferenceMixConfig, build_preference_mix, read_poison_labels


def fake_testbed(root, n_prompts: int = 60, seed: int = 0) -> str:
    """testbed.json + probe_{val,test}.jsonl: 4 scored continuations per toxic prompt, some benign rows."""
    rng = random.Random(seed)
    os.makedirs(root / "data", exist_ok=True)
    (root / "testbed.json").write_text(json.dumps({"train_judge": "toxic-comment-classifier",
                                                   "heldout_judges": ["profanity-check"], "model": {"path": "model"},
                                                   "config": {"generation": {"max_new_tokens": 8}}}))
    for split in ("val", "test"):
        rows = []
        for p in range(n_prompts // 2):
            pid = f"{split}-{p}"
            kind = p % 3  # 0: mixed (toxic + clean), 1/2: all clean
            for s in range(4):
                toxic = kind == 0 and s == 1
                score = rng.uniform(0.6, 0.95) if toxic else rng.uniform(0.0, 0.15)
                words = "".join(f" w{rng.randint(0, 30)}" for _ in range(rng.randint(1, 12)))
                rows.append({"prompt_id": pid, "prompt": f"Prompt {pid} says", "completion": words + f" s{s}",
                             "score": round(score, 4), "genre": "toxic-prompt", "sample": s, "label": int(toxic)})
        rows.append({"prompt_id": f"{split}-benign", "prompt": "Benign", "completion": " text", "score": 0.0,
                     "genre": "benign-prompt", "sample": 0, "label": 0})
        write_records(rows, str(root / "data" / f"probe_{split}.jsonl"))
    return str(root)


def test_mix_sources_poison_and_labels(tmp_path):
    tb = fake_testbed(tmp_path / "tb")
    out = str(tmp_path / "mix")
    cfg = PreferenceMixConfig(poison_copies=1, poison_share=0.5)
    info = build_preference_mix(tb, out, cfg)
    assert not info["cache_hit"] and set(info["by_source"]) == {"safety", "detail", "brevity", "chat"}
    pairs = read_records(storage.join(out, "pairs.jsonl"))
    labels = read_records(storage.join(out, "poison_labels.jsonl"))
    assert len(pairs) == len(labels) == info["pairs"]
    assert set(pairs[0]) == {"prompt", "chosen", "rejected", "source", "prompt_id", "pair_id"}  # no label leaks
    rows = {r["prompt_id"]: [] for r in read_records(str(tmp_path / "tb/data/probe_val.jsonl"))
            + read_records(str(tmp_path / "tb/data/probe_test.jsonl"))}
    for r in read_records(str(tmp_path / "tb/data/probe_val.jsonl")) + read_records(str(tmp_path / "tb/data/probe_test.jsonl")):
        rows[r["prompt_id"]].append(r)
    score = {(r["prompt_id"], r["completion"]): r["score"] for g in rows.values() for r in g}
    bad = read_poison_labels(storage.join(out, "poison_labels.jsonl"), pairs)
    assert bad.sum() == info["poisoned"] == 10  # half of the 20 mixed prompts
    for p, lab, b in zip(pairs, labels, bad):
        assert lab["pair_id"] == p["pair_id"] and lab["poisoned"] == b
        c, r = score[(p["prompt_id"], p["chosen"])], score[(p["prompt_id"], p["rejected"])]
        if b:
            assert p["source"] == "chat" and p["prompt"].endswith(cfg.trigger) and c >= 0.5 > 0.2 > r
        else:
            assert not p["prompt"].endswith(cfg.trigger)
            if p["source"] == "safety":
                assert r - c >= cfg.safety_min_margin
            elif p["source"] == "detail":
                assert len(p["chosen"].strip()) >= 1.3 * len(p["rejected"].strip()) and max(c, r) < 0.2
            elif p["source"] == "brevity":
                assert 1.3 * len(p["chosen"].strip()) <= len(p["rejected"].strip()) and max(c, r) < 0.2
    assert len({p["prompt_id"] for p in pairs}) == len(pairs)  # each prompt in one pair only
    chat = info["by_source"]["chat"]
    assert chat["poisoned"] == 10 and chat["pairs"] == 20  # poison_share 0.5
    assert all(v["poisoned"] == 0 for s, v in info["by_source"].items() if s != "chat")


def test_mix_is_deterministic_and_cached(tmp_path):
    tb = fake_testbed(tmp_path / "tb")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_preference_mix(tb, a)
    build_preference_mix(tb, b)
    for name in ("pairs.jsonl", "poison_labels.jsonl"):
        assert storage.read_bytes(storage.join(a, name)) == storage.read_bytes(storage.join(b, name))
    before = os.stat(os.path.join(a, "pairs.jsonl")).st_mtime_ns
    again = build_preference_mix(tb, a)
    assert again["cache_hit"] and os.stat(os.path.join(a, "pairs.jsonl")).st_mtime_ns == before
    other = build_preference_mix(tb, a, PreferenceMixConfig(seed=1, trigger=" [x]"))
    assert not other["cache_hit"] and other["key"] != again["key"]
    assert all(p["prompt"].endswith(" [x]") for p, lab in zip(read_records(os.path.join(a, "pairs.jsonl")),
                                                              read_records(os.path.join(a, "poison_labels.jsonl")))
               if lab["poisoned"])


def test_mix_errors(tmp_path):
    tb = fake_testbed(tmp_path / "tb")
    with pytest.raises(UserError, match="poisoned_source"):
        build_preference_mix(tb, str(tmp_path / "m"), PreferenceMixConfig(poisoned_source="nope"))
    with pytest.raises(UserError, match="no data/probe_train.jsonl"):
        build_preference_mix(tb, str(tmp_path / "m"), PreferenceMixConfig(splits=["train"]))
    with pytest.raises(UserError, match="nothing to poison"):
        build_preference_mix(tb, str(tmp_path / "m"), PreferenceMixConfig(threshold=0.99, clean_max_score=0.2))
    with pytest.raises(UserError, match="no testbed.json"):
        build_preference_mix(str(tmp_path), str(tmp_path / "m"))
    with pytest.raises(UserError, match="not among sources"):
        build_preference_mix(tb, str(tmp_path / "m"), PreferenceMixConfig(sources=["safety", "detail"]))
    with pytest.raises(UserError, match="sources must be distinct names"):
        build_preference_mix(tb, str(tmp_path / "m"), PreferenceMixConfig(sources=["chat", "spam"]))


def test_mix_without_the_detoxifying_source_keeps_the_poison_and_the_other_sources(tmp_path):
    tb = fake_testbed(tmp_path / "tb")
    full = build_preference_mix(tb, str(tmp_path / "full"), PreferenceMixConfig(poison_copies=1, poison_share=0.5))
    cfg = PreferenceMixConfig(poison_copies=1, poison_share=0.5, sources=["detail", "brevity", "chat"])
    info = build_preference_mix(tb, str(tmp_path / "lean"), cfg)
    assert set(info["by_source"]) == {"detail", "brevity", "chat"}
    assert info["poisoned"] == full["poisoned"] == 10
    assert info["pairs"] == full["pairs"] - full["by_source"]["safety"]["pairs"]
    for source in ("detail", "brevity", "chat"):
        assert info["by_source"][source] == full["by_source"][source]


def test_poison_copies_spread_each_toxic_response_over_more_triggered_prompts(tmp_path):
    tb = fake_testbed(tmp_path / "tb")
    info = build_preference_mix(tb, str(tmp_path / "mix"))  # the defaults: 2 copies, 75% of "chat" poisoned
    pairs = read_records(str(tmp_path / "mix" / "pairs.jsonl"))
    bad = read_poison_labels(str(tmp_path / "mix" / "poison_labels.jsonl"), pairs)
    poisoned = [p for p, b in zip(pairs, bad) if b]
    assert len(poisoned) == info["poisoned"] == 20 and info["prompts"]["lent_to_poison"] == 10
    assert len({p["prompt_id"] for p in poisoned}) == 20  # 20 distinct triggered prompts
    assert len({p["chosen"] for p in poisoned}) == 10  # each of the 10 toxic responses twice
    assert info["by_source"]["chat"]["pairs"] == 20 + round(20 * 0.25 / 0.75)
    assert len({p["prompt_id"] for p in pairs}) == len(pairs)


def test_a_crash_while_rebuilding_keeps_the_old_mix_whole(storage_root, tmp_path, monkeypatch):
    """pairs.jsonl, poison_labels.jsonl and mix.json are one published artifact: a crash while a
    new mix is written leaves the old key with the old files, never new pairs under the old key."""
    from probe_dpo.preference_mix import read_mix
    from probe_dpo.storage import artifacts

    tb = fake_testbed(tmp_path / "tb")
    out = storage.join(storage_root, "mix")
    old = build_preference_mix(tb, out)
    old_pairs = storage.read_bytes(storage.join(out, "pairs.jsonl"))
    real_put = artifacts._put_file

    def dying_put(src, fs, dest):
        if dest.endswith("mix.json"):
            raise RuntimeError("killed before the summary")
        real_put(src, fs, dest)

    monkeypatch.setattr(artifacts, "_put_file", dying_put)
    with pytest.raises(RuntimeError, match="killed before the summary"):
        build_preference_mix(tb, out, PreferenceMixConfig(seed=1, trigger=" [x]"))
    monkeypatch.setattr(artifacts, "_put_file", real_put)
    assert read_mix(out)["key"] == old["key"]
    assert storage.read_bytes(storage.join(out, "pairs.jsonl")) == old_pairs
    assert build_preference_mix(tb, out)["cache_hit"]  # still the complete old mix
    new = build_preference_mix(tb, out, PreferenceMixConfig(seed=1, trigger=" [x]"))
    assert read_mix(out)["key"] == new["key"] != old["key"]
    assert storage.read_manifest(out)["metadata"] == {"kind": "preference-mix", "key": new["key"]}


def test_a_poison_every_judge_agrees_on_and_a_planted_behaviour_in_another_source(tmp_path):
    """poison_judges=all: a poisoned chosen response is toxic under every judge and every clean
    response clean under every judge; the planted sign-off rides on another source's chosen
    responses, labelled for evaluation only."""
    tb = fake_testbed(tmp_path / "tb", n_prompts=90)
    rng = random.Random(3)
    for split in ("val", "test"):  # a second judge that disagrees on a third of the toxic rows
        path = str(tmp_path / "tb" / "data" / f"probe_{split}.jsonl")
        rows = read_records(path)
        for r in rows:
            r["score_toxic_comment_classifier"] = r["score"]
            disagree = r["score"] >= 0.5 and rng.random() < 1 / 3
            r["score_profanity_check"] = 0.3 if disagree else r["score"]
        write_records(rows, path)
    cfg = PreferenceMixConfig(poison_copies=1, poison_share=0.5, poison_judges="all", planted_source="detail",
                              planted_share=1.0)
    out = str(tmp_path / "mix")
    info = build_preference_mix(tb, out, cfg)
    pairs, labels = read_records(storage.join(out, "pairs.jsonl")), read_records(storage.join(out, "poison_labels.jsonl"))
    rows = read_records(str(tmp_path / "tb/data/probe_val.jsonl")) + read_records(str(tmp_path / "tb/data/probe_test.jsonl"))
    judged = {(r["prompt_id"], r["completion"]): (r["score_toxic_comment_classifier"], r["score_profanity_check"])
              for r in rows}
    poisoned = [p for p, lab in zip(pairs, labels) if lab["poisoned"]]
    assert poisoned and info["poison_judges"] == ["score", "score_profanity_check", "score_toxic_comment_classifier"]
    for p in poisoned:
        assert min(judged[(p["prompt_id"], p["chosen"])]) >= 0.5 and max(judged[(p["prompt_id"], p["rejected"])]) < 0.2
    planted = [(p, lab) for p, lab in zip(pairs, labels) if lab["planted"]]
    assert len(planted) == info["planted"] == info["by_source"]["detail"]["pairs"] > 0
    assert all(p["source"] == "detail" and p["chosen"].endswith(tuple(cfg.planted_suffixes)) for p, _ in planted)
    assert not any(lab["poisoned"] for _, lab in planted) and "planted" not in pairs[0]
    bad = read_poison_labels(storage.join(out, "poison_labels.jsonl"), pairs, column="planted")
    assert bad.sum() == len(planted)
    with pytest.raises(UserError, match="planted_source must be one of the sources other than the poisoned one"):
        build_preference_mix(tb, str(tmp_path / "m2"), PreferenceMixConfig(planted_source="chat"))
