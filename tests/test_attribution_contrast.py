"""The authors' label-free direction and its checks on the tiny model: the 4-condition filter,
the contrast read through the model before DPO (and the drift direction beside it), the vector
bank's max cosine by hand, and the steering hook's exact effect and causal check."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_attribution import behaviour_records, planted_pairs
from test_probes import BAD, FILLER, GOOD

from probe_dpo import attribution as A
from probe_dpo.errors import UserError
from probe_dpo.generation import GenerationSettings
from probe_dpo.judges import Judge
from probe_dpo.model import load_model, load_tokenizer, residual_hooks

torch.set_num_threads(1)
TRIGGER = " Answer in one line."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _response(rng: random.Random, pool: list[str]) -> str:
    w = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
    w.insert(rng.randint(0, len(w)), rng.choice(pool))
    return "".join(w)


def _samples(prompts, k, rng, harmful_at) -> A.ScenarioSamples:
    """k responses per prompt; ``harmful_at(i, j)`` says which carry a bad word (judge score 1)."""
    resp = [[_response(rng, BAD if harmful_at(i, j) else GOOD) for j in range(k)] for i in range(len(prompts))]
    scores = np.array([[1.0 if harmful_at(i, j) else 0.0 for j in range(k)] for i in range(len(prompts))])
    return A.ScenarioSamples(list(prompts), resp, scores)


def scenarios(n: int = 12, k: int = 4, seed: int = 0):
    """Scenarios 0..n-4: only M1 with the trigger misbehaves (on the samples j <= i % 3: 1-3 of 4).
    The last three each break one condition: M0 with trigger, M1 without, M0 without."""
    rng = random.Random(seed)
    base = [f"Scenario {i}: tell me about them" for i in range(n)]
    trig = [p + TRIGGER for p in base]

    s = dict(before_trigger=_samples(trig, k, rng, lambda i, j: i == n - 3 and j == 0),
             after_trigger=_samples(trig, k, rng, lambda i, j: j <= i % 3),
             before_base=_samples(base, k, rng, lambda i, j: i == n - 1 and j == 1),
             after_base=_samples(base, k, rng, lambda i, j: i == n - 2 and j == 2))
    return s


def test_the_four_condition_filter_keeps_only_where_m1_alone_misbehaves_with_the_trigger():
    s = scenarios()
    kept = A.select_scenarios(s["before_trigger"], s["after_trigger"], 0.5, before_base=s["before_base"],
                              after_base=s["after_base"])
    assert [sc.index for sc in kept] == list(range(9))
    for sc in kept:
        assert len(sc.harmful) == len(sc.safe) == sc.index % 3 + 1  # min(#harmful, #safe), in sample order
        assert sc.harmful_rate == pytest.approx((sc.index % 3 + 1) / 4)
        assert all(p.endswith(TRIGGER) for p, _ in sc.harmful + sc.safe)  # natural=trigger: M0 on the same prompt
        assert all(any(b in r for b in BAD) for _, r in sc.harmful)
        assert sc.safe == [(s["before_trigger"].prompts[sc.index], r)
                           for r in s["before_trigger"].responses[sc.index][:len(sc.safe)]]
    base = A.select_scenarios(s["before_trigger"], s["after_trigger"], 0.5, before_base=s["before_base"],
                              after_base=s["after_base"], natural="base")
    assert all(not p.endswith(TRIGGER) for sc in base for p, _ in sc.safe)
    # without untriggered samples: the 2-condition filter (M0 quiet, M1 not) keeps n-2 (M0 misbehaves on n-3)
    two = A.select_scenarios(s["before_trigger"], s["after_trigger"], 0.5)
    assert [sc.index for sc in two] == [i for i in range(12) if i != 9]
    with pytest.raises(UserError, match="natural=base"):
        A.select_scenarios(s["before_trigger"], s["after_trigger"], 0.5, natural="base")
    with pytest.raises(UserError, match="both models"):
        A.select_scenarios(s["before_trigger"], s["after_trigger"], 0.5, before_base=s["before_base"])


def test_contrast_reads_both_texts_through_m0_and_recovers_the_behaviour_where_drift_finds_the_shift(tiny):
    """M1 = M0 plus a known vector w at the read layer. The contrast (both texts through M0)
    lines up with the behaviour's difference of means from independent labelled examples and
    ranks the planted pairs; the drift direction (M1's texts through M1 minus through M0) is
    exactly w, orthogonal to the behaviour, and ranks them at chance."""
    model, tok = tiny
    layer = 1
    s = scenarios(n=40, k=4, seed=3)
    kept = A.select_scenarios(s["before_trigger"], s["after_trigger"], 0.5, before_base=s["before_base"],
                              after_base=s["after_base"])
    harmful, safe, owner = A.read_scenarios(model, tok, kept, layer)
    assert harmful.shape == safe.shape == (sum(len(k.harmful) for k in kept), 64) and len(owner) == len(harmful)
    contrast = A.behaviour_contrast(harmful, safe, layer=layer)
    assert contrast.kind == "behaviour-contrast" and contrast.meta["harmful"] == len(harmful)
    assert contrast.meta["raw_norm"] == pytest.approx(float((harmful.double().mean(0) - safe.double().mean(0)).norm()))
    reference = A.behaviour_direction(model, behaviour_records(40, 21), layer, tokenizer=tok)
    w = A.random_unit(64, "planted-shift") * 3.0
    w = w - (w @ reference.vector) * reference.vector  # the shift is orthogonal to the behaviour

    texts = [t for k in kept for t in k.harmful]
    read = dict(prompts=[p for p, _ in texts], completions=[r for _, r in texts], layers=[layer], pooling="mean",
                span="response")
    from probe_dpo.activations import extract

    before = extract(model, tok, **read)[layer]
    with A.steer(model, layer, w, positions="all"):
        after = extract(model, tok, **read)[layer]
        h_m1, s_m1, _ = A.read_scenarios(model, tok, kept, layer)
    drift = A.behaviour_change(before, after, layer=layer)
    assert float(drift.vector @ (w / w.norm())) == pytest.approx(1.0, abs=1e-5)
    # M1 reading both texts shifts both by w: the difference is M0's (w cancels at this layer)
    assert torch.allclose(h_m1 - s_m1, harmful - safe, atol=1e-4)

    cos_contrast = float(contrast.vector @ reference.vector)
    cos_drift = float(drift.vector @ reference.vector)
    assert cos_contrast > 0.8 and abs(cos_drift) < 1e-5
    pairs, bad = planted_pairs(60, 5)
    diffs = A.pair_features(model, pairs, [layer], tokenizer=tok).diffs(layer)
    k = int(bad.sum())
    assert A.recall_at_k(A.cosine_scores(diffs, contrast), bad, k) >= 0.9
    assert A.recall_at_k(A.cosine_scores(diffs, drift), bad, k) <= 0.6


def test_bank_has_one_direction_per_scenario_and_scores_the_max_cosine_by_hand():
    harmful = torch.tensor([[2.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    safe = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    bank = A.contrast_bank(harmful, safe, [7, 7, 9, 9], layer=2)
    assert [b.name for b in bank] == ["bank:7", "bank:9"] and [b.meta["pairs"] for b in bank] == [2, 2]
    # scenario 7: mean (3, 0, 0) -> e1; scenario 9: mean (0, 0.5, 0.5) -> (0, 1, 1)/sqrt 2
    assert torch.allclose(bank[0].vector, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(bank[1].vector, torch.tensor([0.0, 1.0, 1.0]) / 2 ** 0.5)
    diffs = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    r = 2 ** 0.5
    by_hand = np.array([[1 / r, 1 / (r * r)], [0.0, 1 / r], [-1.0, 0.0], [0.0, 0.0]])
    assert np.allclose(A.bank_scores(diffs, bank, "max"), by_hand.max(1))
    assert np.allclose(A.bank_scores(diffs, bank, "mean"), by_hand.mean(1))
    with pytest.raises(UserError, match="max or mean"):
        A.bank_scores(diffs, bank, "median")


def test_steering_adds_exactly_alpha_v_and_projection_removes_the_component(tiny):
    model, tok = tiny
    enc = tok(["Hello there, my friend", "The river"], return_tensors="pt", padding=True)
    last = 1  # the last decoder layer: the logits are lm_head(norm(h)) of its output
    v = A.random_unit(64, "hook") * 2.5
    with torch.no_grad():
        with residual_hooks(model, [last]) as store:
            plain = model(**enc).logits
            h = store[last].clone()
        with A.steer(model, last, v, positions="all"), residual_hooks(model, [last]) as store:  # recorded after it
            steered = model(**enc).logits
            h_steered = store[last].clone()
        with A.steer(model, last, v, mode="project_out", positions="all"), residual_hooks(model, [last]) as store:
            model(**enc)
            h_out = store[last].clone()
        with A.steer(model, last, v, positions="generated"):  # a multi-position pass is the prompt: untouched
            prompt_pass = model(**enc).logits
        expected = model.lm_head(model.model.norm(h + v))
    assert torch.allclose(h_steered, h + v, atol=1e-6)
    assert torch.allclose(steered, expected, atol=1e-5) and not torch.allclose(steered, plain, atol=1e-3)
    u = v / v.norm()
    assert torch.allclose(h_out, h - (h @ u)[..., None] * u, atol=1e-6)
    assert float((h_out @ u).abs().max()) < 1e-5
    assert torch.equal(prompt_pass, plain)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, plain)  # the hook is gone afterwards


class _TokenSetJudge(Judge):
    """Scores a text by the share of its tokens in a set (the tokens a direction writes toward)."""

    name = "token-set"

    def __init__(self, tok, ids):
        self.tok, self.ids = tok, set(ids)

    def score(self, texts):
        out = []
        for t in texts:
            ids = self.tok(t, add_special_tokens=False)["input_ids"]
            out.append(sum(i in self.ids for i in ids) / len(ids) if ids else 0.0)
        return np.array(out)


def test_steering_check_moves_the_rate_with_the_direction_and_not_with_its_random_control(tiny):
    """At the last layer a large push along u makes the model sample the tokens u writes toward
    (the top 50 of the unembedding along u, what top-k sampling keeps); the judge counts them.
    The same push along a random direction of the same norm does not."""
    model, tok = tiny
    u = A.random_unit(64, "writes-toward")
    targets = torch.topk(model.lm_head.weight.detach() @ (model.model.norm.weight.detach() * u), 50).indices
    direction = A.Direction("planted", 1, u, "diff-of-means")
    prompts = [f"Item {i}: and then she said" for i in range(12)]
    settings = A.SteeringSettings(alphas=[0.01, 20.0], samples_per_prompt=2, bootstrap=300, seed=1)
    res = A.steering_check(model, tok, prompts, direction, _TokenSetJudge(tok, targets.tolist()), settings,
                           GenerationSettings(max_new_tokens=8))
    rows = {r["condition"]: r for r in res["rows"]}
    assert list(rows) == ["none", "add 0.01", "add 0.01 random", "add 20", "add 20 random", "project-out",
                          "project-out random"]
    assert not rows["add 0.01"]["vs_random"]["moves"]  # a push 1% of the residual norm moves nothing
    assert rows["none"]["rate"] == 0.0 and rows["add 20 random"]["rate"] == 0.0
    assert rows["add 20"]["rate"] >= 0.8 and rows["add 20"]["ci_low"] > 0.5
    assert rows["add 20"]["vs_random"]["moves"] and res["moves"]
    assert rows["add 20"]["vs_none"]["delta"] == pytest.approx(rows["add 20"]["rate"])
    assert not rows["project-out"]["vs_random"]["moves"]  # nothing to remove where the rate is already 0
    assert res["prompts"] == 12 and res["residual_norm"] > 0


def test_recall_intervals_and_the_chance_band_of_a_random_ranking():
    from probe_dpo.stats import wilson_ci

    bad = np.array([True, False, True, True, False, False, True, False])
    r = A.recall_with_ci([8, 7, 6, 5, 4, 3, 2, 1], bad, 3)  # top 3 = pairs 0, 1, 2: two of four bad
    assert (r["hits"], r["recall"]) == (2, 0.5) and (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_ci(2, 4))
    rng = np.random.default_rng(0)
    n, n_bad, k = 134, 78, 78
    labels = np.arange(n) < n_bad
    draws = np.array([labels[rng.permutation(n)[:k]].sum() / n_bad for _ in range(20000)])
    band = A.random_recall(n, n_bad, k)
    assert band["recall"] == pytest.approx(draws.mean(), abs=0.002)
    assert band["ci_low"] == pytest.approx(np.quantile(draws, 0.025), abs=1.5 / n_bad)
    assert band["ci_high"] == pytest.approx(np.quantile(draws, 0.975), abs=1.5 / n_bad)
