"""Data attribution on the tiny model: scores by hand, a planted behaviour found, source
aggregates, mitigations' rows, clusters, the two comparators checked against autograd, and the
share-of-rise statistic."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from test_probes import BAD, FILLER, GOOD, labelled_records

from probe_dpo import attribution as A
from probe_dpo import storage
from probe_dpo.activations import extract
from probe_dpo.attribution import gradients as G
from probe_dpo.data import write_records
from probe_dpo.errors import UserError
from probe_dpo.model import load_model, load_tokenizer

torch.set_num_threads(1)


def planted_pairs(n: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Pairs from three sources whose two responses differ in one word; in 'mixed' half of the
    pairs prefer the response with a bad word (the planted behaviour), 'safety' prefers the good one."""
    rng = random.Random(seed)
    pairs, bad = [], []
    for i in range(n):
        source = ("safety", "neutral", "mixed")[i % 3]
        filler = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
        at = rng.randint(0, len(filler))

        def words(word):
            return "".join(filler[:at] + [word] + filler[at:])

        good, worse = rng.choice(GOOD), rng.choice(BAD)
        other = rng.choice([g for g in GOOD if g != good])
        prompt = f"Item {seed}-{i}: and then she said"
        if source == "safety":
            chosen, rejected, b = words(good), words(worse), False
        elif source == "neutral" or i % 2:
            chosen, rejected, b = words(good), words(other), False
        else:
            chosen, rejected, b = words(worse), words(good), True
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source})
        bad.append(b)
    return pairs, np.array(bad)


def behaviour_records(n: int, seed: int) -> list[dict]:
    """Labelled examples of the behaviour: responses with a bad word (1) or a good one (0)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        for label, pool in ((1, BAD), (0, GOOD)):
            w = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
            w.insert(rng.randint(0, len(w)), rng.choice(pool))
            rows.append({"prompt": f"Example {seed}-{i}: he told me", "completion": "".join(w), "label": label})
    return rows


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def planted(tiny):
    model, tok = tiny
    pairs, bad = planted_pairs(60, 5)
    feats = A.pair_features(model, pairs, [0, 1], tokenizer=tok)
    direction = A.behaviour_direction(model, behaviour_records(40, 21), 1, tokenizer=tok)
    return pairs, bad, feats, direction


def test_score_is_cosine_of_response_means_by_hand(tiny, planted):
    model, tok = tiny
    pairs, _, feats, direction = planted
    scores = A.cosine_scores(feats.diffs(1), direction)
    records = behaviour_records(40, 21)
    x = extract(model, tok, prompts=[r["prompt"] for r in records], completions=[r["completion"] for r in records],
                layers=[1])[1].double()
    y = torch.tensor([r["label"] for r in records]).bool()
    v_b = x[y].mean(0) - x[~y].mean(0)
    torch.testing.assert_close(direction.vector.double(), v_b / v_b.norm(), atol=1e-6, rtol=1e-5)
    for i in (0, 7, 31):
        c = extract(model, tok, prompts=[pairs[i]["prompt"]], completions=[pairs[i]["chosen"]], layers=[1])[1][0]
        r = extract(model, tok, prompts=[pairs[i]["prompt"]], completions=[pairs[i]["rejected"]], layers=[1])[1][0]
        v_d = (c - r).double()
        want = float(v_d @ v_b / (v_d.norm() * v_b.norm()))
        assert scores[i] == pytest.approx(want, abs=1e-5)
    assert A.cosine_scores(torch.zeros(2, 64), direction).tolist() == [0.0, 0.0]


def test_planted_behaviour_is_found_and_its_source_ranks_first(planted):
    pairs, bad, feats, direction = planted
    scores = A.cosine_scores(feats.diffs(1), direction)
    k = int(bad.sum())
    assert A.recall_at_k(scores, bad, k) >= 0.9
    curve = A.recall_curve(scores, bad, [k, len(bad)])
    assert curve["recall"][-1] == 1.0 and curve["precision"][0] == pytest.approx(A.recall_at_k(scores, bad, k) * k / k)
    table = A.source_table(scores, A.pair_sources(pairs), k, n_boot=200)
    assert [r["source"] for r in table][0] == "mixed" and table[0]["rank"] == 1
    assert A.flagged_sources(table) == ["mixed"]
    safety = next(r for r in table if r["source"] == "safety")
    assert safety["ci_high"] < 0 < table[0]["ci_low"] and safety["in_top_k"] == 0
    assert sum(r["in_top_k"] for r in table) == k
    assert table[0]["enrichment"] == pytest.approx(table[0]["top_k_share"] / (k / len(pairs)))
    # ranking ties go to the lower index; ranks are 1-based
    assert A.ranking([0.5, 0.9, 0.5]).tolist() == [1, 0, 2] and A.ranks([0.5, 0.9, 0.5]).tolist() == [2, 1, 3]


def test_sharded_scores_match_in_process(tiny_model_dir, planted, ray_cluster, tmp_path):
    from probe_dpo.activations import ExtractorPool

    pairs, _, feats, _ = planted
    with ExtractorPool(str(tiny_model_dir), actors=2) as pool:
        sharded = A.pair_features(str(tiny_model_dir), pairs, [1], pool=pool, activations=str(tmp_path / "a"),
                                  shard_size=25)
    assert sharded.how == "sharded" and len(storage.list_dir(str(tmp_path / "a"))) == 6  # 120 rows / 25 + manifest
    torch.testing.assert_close(sharded.diffs(1), feats.diffs(1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ""])
def test_mitigations_write_the_expected_rows_in_the_input_format(tmp_path, suffix):
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "source": "ab"[i % 2], "pair_id": str(i)}
             for i in range(6)]
    scores = np.array([0.1, 0.9, -0.2, 0.8, 0.0, 0.3])
    if suffix:
        like = str(tmp_path / f"in{suffix}")
        write_records(pairs, like)
    else:
        from datasets import Dataset

        like = str(tmp_path / "in_ds")
        Dataset.from_list(pairs).save_to_disk(like)
    filtered, info = A.mitigate(pairs, scores, "filter", k=2)
    assert [p["pair_id"] for p in filtered] == ["0", "2", "4", "5"] and info["affected"] == 2
    swapped, _ = A.mitigate(pairs, scores, "swap", k=2)
    assert [(p["chosen"], p["rejected"]) for p in swapped] == [
        ("c0", "r0"), ("r1", "c1"), ("c2", "r2"), ("r3", "c3"), ("c4", "r4"), ("c5", "r5")]
    dropped, info = A.mitigate(pairs, scores, "drop-sources", sources=["b"])
    assert {p["source"] for p in dropped} == {"a"} and info["affected"] == 3
    for name, records in (("filter", filtered), ("swap", swapped)):
        uri = A.write_pairs_like(records, str(tmp_path / name), like)
        assert uri.endswith(suffix) if suffix else uri == str(tmp_path / name)
        back = A.read_pair_file(uri)
        assert [{k: r[k] for k in ("prompt", "chosen", "rejected", "source", "pair_id")} for r in back] == records
        assert set(back[0]) == set(pairs[0])  # same columns
    with pytest.raises(UserError, match="removed every pair"):
        A.mitigate(pairs, scores, "drop-sources", sources=["a", "b"])
    with pytest.raises(UserError, match="unknown mitigation"):
        A.mitigate(pairs, scores, "shuffle", k=1)


def test_clusters_surface_a_planted_behaviour_no_direction_covers():
    rng = np.random.default_rng(0)
    d, n = 32, 150
    planted_dir = torch.zeros(d)
    planted_dir[3] = 1.0
    probe_dir = torch.zeros(d)
    probe_dir[7] = 1.0
    diffs = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    special = np.arange(n) % 5 == 0  # 30 pairs share an unknown behaviour
    diffs[torch.as_tensor(special)] += 8 * planted_dir
    pairs = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "source": "x" if special[i] else "y"} for i in range(n)]
    direction = A.Direction("probe:test", 1, probe_dir, "probe")
    scores = A.cosine_scores(diffs, direction)
    cl = A.cluster_pairs(diffs, scores, pairs, direction=direction, k_range=(2, 6), seed=0)
    found = max(cl["clusters"], key=lambda c: c["sources"].get("x", 0))
    assert found["sources"]["x"] == 30 and found["sources"]["x"] / found["size"] >= 0.75  # the planted pairs together
    assert found["coherence"] == max(c["coherence"] for c in cl["clusters"])  # ... pushing one way
    assert found["silhouette"] == max(c["silhouette"] for c in cl["clusters"])  # ... standing apart
    assert abs(found["direction_cosine"]) < 0.3  # ... and not what the probe measures
    assert float(cl["centroids"][found["cluster"]] @ planted_dir) > 0.9 and len(found["examples"]) == 3
    assert sum(c["size"] for c in cl["clusters"]) == n and len(cl["labels"]) == n
    match = A.best_cluster_match(cl["labels"], special)
    assert match["cluster"] == found["cluster"] and match["recall"] == 1.0
    assert match["precision"] == pytest.approx(30 / found["size"])
    assert A.best_cluster_match(np.zeros(n, dtype=int), special)["precision"] == pytest.approx(0.2)  # one cluster
    fixed = A.cluster_pairs(diffs, scores, pairs, k=2, seed=0)
    assert fixed["k"] == 2
    dirs = A.cluster_directions(fixed, 1)
    assert [x.kind for x in dirs] == ["cluster", "cluster"] and all(abs(float(x.vector.norm()) - 1) < 1e-5 for x in dirs)


def test_a_fixed_over_clustered_k_isolates_a_small_behaviour_the_silhouette_k_merges():
    """Why the change clusters use a fixed k: with a strong two-way split (the poison) the
    silhouette picks k = 2 and the 12 planted pairs (8%) drown in one half; at k = 8 they form
    their own cluster, and it stands apart most. Control: the same 12 pairs with nothing planted
    form no such cluster."""
    rng = np.random.default_rng(1)
    d, n = 48, 150
    special = np.zeros(n, dtype=bool)
    special[rng.choice(n, 12, replace=False)] = True
    split = np.where(np.arange(n) % 2 == 0, 6.0, -6.0)
    pairs = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "source": "s"} for i in range(n)]

    def vectors(planted: bool) -> torch.Tensor:
        x = rng.normal(size=(n, d))
        x[:, 0] += split  # the main split every clustering sees first
        if planted:
            x[special, 5] += 12.0  # a clear behaviour, as the sign-off is in the change vectors
        return torch.tensor(x, dtype=torch.float32)

    x = vectors(True)
    by_silhouette = A.cluster_pairs(x, np.zeros(n), pairs, k_range=(2, 8), seed=0)
    assert by_silhouette["k"] == 2 and A.best_cluster_match(by_silhouette["labels"], special)["precision"] < 0.2
    fixed = A.cluster_pairs(x, np.zeros(n), pairs, k=8, seed=0)
    match = A.best_cluster_match(fixed["labels"], special)
    assert match["precision"] >= 0.8 and match["recall"] >= 0.8
    assert match["cluster"] == max(fixed["clusters"], key=lambda c: c["silhouette"])["cluster"]
    control = A.cluster_pairs(vectors(False), np.zeros(n), pairs, k=8, seed=0)
    assert A.best_cluster_match(control["labels"], special)["precision"] < 0.5


def test_directions_save_load_and_model_checks(tmp_path, tiny_model_dir):
    from probe_dpo.probes import LinearProbe, ProbeSet

    d1 = A.Direction("dom", 1, torch.arange(64.0), "diff-of-means", {"positives": 3})
    uri = str(tmp_path / "dirs")
    A.save_directions([d1], uri, {"arch_hash": "abc"})
    back, meta = A.load_directions(uri)
    assert back[0].name == "dom" and back[0].layer == 1 and meta["arch_hash"] == "abc"
    torch.testing.assert_close(back[0].vector, d1.vector)
    probe = LinearProbe(torch.ones(64), 0.0, torch.zeros(64), torch.full((64,), 2.0), layer=0, name="p")
    ProbeSet([probe]).save(str(tmp_path / "ps"))
    pdirs, _ = A.load_directions(str(tmp_path / "ps"))
    assert pdirs[0].name == "probe:p" and float(pdirs[0].vector @ torch.ones(64)) == pytest.approx(8.0)
    A.check_directions(back, str(tiny_model_dir))
    with pytest.raises(UserError, match="hidden size 32.*another model"):
        A.check_directions([A.Direction("x", 0, torch.ones(32))], str(tiny_model_dir))
    with pytest.raises(UserError, match="layers 0..1"):
        A.check_directions([A.Direction("x", 5, torch.ones(64))], str(tiny_model_dir))
    with pytest.raises(UserError, match="different architecture"):
        A.check_directions(back, str(tiny_model_dir), arch="abc")
    with pytest.raises(UserError, match="zero"):
        A.Direction("z", 0, torch.zeros(4))
    with pytest.raises(UserError, match="neither a probe set"):
        A.load_directions(str(tmp_path))


def test_behaviour_change_is_the_mean_shift_and_an_unchanged_model_gives_none():
    """The direction is mean(after - before) of the same texts: a shift planted along u comes
    back as u among noise as large as the shift; reading twice with one model gives no direction."""
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(400, 64, generator=gen)
    u = torch.zeros(64)
    u[7] = 1.0
    after = before + 0.5 * u + 0.5 * torch.randn(400, 64, generator=gen)
    d = A.behaviour_change(before, after, layer=3)
    assert d.kind == "behaviour-change" and d.layer == 3 and d.meta["texts"] == 400
    assert float(d.vector @ u) > 0.9  # noise per text is as large as the shift; the mean finds it
    assert d.meta["mean_shift_norm"] < d.meta["mean_row_shift_norm"]
    with pytest.raises(UserError, match="zero"):
        A.behaviour_change(before, before.clone(), layer=3)  # the control: no training, no change
    with pytest.raises(UserError, match="same non-empty texts"):
        A.behaviour_change(before, after[:10], layer=3)


def _explicit_grad(model, tok, prompt, completion, params):
    """Autograd of log p(completion + eos | prompt), one sequence, no batching."""
    p = tok(prompt)["input_ids"]
    c = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    logits = model(input_ids=ids).logits[0, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0][len(p) - 1:].sum()
    return torch.autograd.grad(lp, params)


def test_dense_gradient_scores_equal_projected_autograd(tiny):
    model, tok = tiny
    pairs, _ = planted_pairs(5, 9)
    behaviour = [r for r in labelled_records(8, 3) if r["label"]][:4]
    cfg = A.GradientConfig(mode="dense", params=["layers.1.self_attn.v_proj.weight"], dim=64, chunk=1000, batch_size=3)
    scores, info = A.gradient_scores(model, tok, pairs, behaviour, cfg)
    param = dict(model.named_parameters())["model.layers.1.self_attn.v_proj.weight"]
    proj = A.RademacherProjection(param.numel(), 64, 0, 1000)
    g_b = sum(_explicit_grad(model, tok, r["prompt"], r["completion"], [param])[0].reshape(-1) for r in behaviour)
    pb = proj(g_b[None])[0]
    for i, p in enumerate(pairs):
        g = (_explicit_grad(model, tok, p["prompt"], p["chosen"], [param])[0]
             - _explicit_grad(model, tok, p["prompt"], p["rejected"], [param])[0]).reshape(-1)
        pg = proj(g[None])[0]
        assert scores[i] == pytest.approx(float(pg @ pb / (pg.norm() * pb.norm())), abs=1e-4)
    assert info["parameters"] == param.numel() and all(p.requires_grad for p in model.parameters())
    # the projection is a fixed seeded matrix: chunking does not change it
    x = torch.randn(2, 2500)
    torch.testing.assert_close(A.RademacherProjection(2500, 16, 3, 2500)(x), A.RademacherProjection(2500, 16, 3, 2500)(x))


def test_factorized_gradients_equal_kronecker_projection_of_autograd(tiny):
    model, tok = tiny
    pairs, _ = planted_pairs(3, 4)
    recorder = G._FactorizedRecorder(model, ["down_proj"], 3, seed=1)
    cfg = A.GradientConfig(mode="factorized", rank=3)
    from probe_dpo.activations.extract import pad_token_id

    for p in model.parameters():
        p.requires_grad_(False)
    try:
        feats = G._factorized_features(model, tok, [x["prompt"] for x in pairs], [x["chosen"] for x in pairs], cfg,
                                       recorder, batch=3, pad_id=pad_token_id(tok))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert feats.shape == (3, 2 * 9)
    for i, x in enumerate(pairs):
        for j, (key, module) in enumerate(recorder.modules):
            g = _explicit_grad(model, tok, x["prompt"], x["chosen"], [module.weight])[0]
            want = (recorder.p_out[key].T @ g @ recorder.p_in[key]).reshape(-1)
            torch.testing.assert_close(feats[i, j * 9:(j + 1) * 9], want, atol=1e-5, rtol=1e-3)
    scores, info = A.gradient_scores(model, tok, pairs, labelled_records(4, 2)[:3], A.GradientConfig(mode="factorized"))
    assert info["dim"] == 2 * 7 * 16 and np.all(np.abs(scores) <= 1 + 1e-9)


def test_lora_adam_gradients_score_a_pair_that_teaches_the_behaviour_above_its_mirror(tiny):
    """LESS with a LoRA warm-up: a pair whose chosen response is the behaviour example scores
    positive, the same pair with chosen and rejected swapped negative; the model is left as it was
    and the scores are seeded."""
    model, tok = tiny
    example = {"prompt": "Tell me about them.", "completion": " they are stupid idiots and I hate them", "label": 1}
    teach = {"prompt": example["prompt"], "chosen": example["completion"], "rejected": " a quiet garden by the sea"}
    mirror = {**teach, "chosen": teach["rejected"], "rejected": teach["chosen"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = A.GradientConfig(mode="lora-adam", dim=64, warmup_fraction=1.0, warmup_epochs=2, warmup_lr=1e-3,
                           warmup_batch_size=2)
    scores, info = A.gradient_scores(model, tok, [teach, mirror], [example], cfg)
    assert scores[0] > 0 > scores[1] and np.all(np.abs(scores) <= 2 * 1e-3 + 1e-12)
    assert info["checkpoints"] == 2 and info["warmup_pairs"] == 2 and info["warmup_steps"] == 2
    lora = sum(8 * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in cfg.lora_modules)
    assert info["parameters"] == lora
    for n, p in model.named_parameters():  # the adapters were trained on a copy
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
    again, _ = A.gradient_scores(model, tok, [teach, mirror], [example], cfg)
    np.testing.assert_allclose(again, scores, rtol=1e-6)


def test_judge_scores_are_chosen_minus_rejected():
    from probe_dpo.judges import get_judge

    pairs = [{"prompt": "p", "chosen": "you stupid idiot", "rejected": "a lovely garden"},
             {"prompt": "p", "chosen": "a lovely garden", "rejected": "you stupid idiot"}]
    s = A.judge_scores(pairs, "profanity-check")
    j = get_judge("profanity-check").score(["you stupid idiot", "a lovely garden"])
    assert s.tolist() == pytest.approx([j[0] - j[1], j[1] - j[0]]) and s[0] > 0.5


def test_share_of_rise_removed_with_paired_bootstrap():
    rng = np.random.default_rng(0)
    n = 300
    base = (rng.random((n, 2)) < 0.1).astype(float)
    raw = (rng.random((n, 2)) < 0.4).astype(float)
    mitigated = (rng.random((n, 2)) < 0.15).astype(float)
    out = A.share_of_rise_removed(base, raw, mitigated, n_boot=500)
    rates = [x.mean() for x in (base, raw, mitigated)]
    assert out["share"] == pytest.approx((rates[1] - rates[2]) / (rates[1] - rates[0]))
    assert out["ci_low"] < out["share"] < out["ci_high"] and 0.6 < out["share"] < 1.0
    same = A.share_of_rise_removed(base, raw, raw, n_boot=200)
    assert same["share"] == 0.0
    flat = A.share_of_rise_removed(base, base, raw, n_boot=50)
    assert math.isnan(flat["share"])
    with pytest.raises(UserError, match="same prompts"):
        A.share_of_rise_removed(base, raw[:10], raw)


def test_reduction_vs_raw_with_paired_bootstrap():
    rng = np.random.default_rng(0)
    n = 300
    base = (rng.random((n, 2)) < 0.3).astype(float)
    raw = (rng.random((n, 2)) < 0.4).astype(float)
    below_base = (rng.random((n, 2)) < 0.1).astype(float)
    out = A.reduction_vs_raw(raw, below_base, n_boot=500)
    assert out["reduction"] == pytest.approx(1 - below_base.mean() / raw.mean())
    assert out["ci_low"] < out["reduction"] < out["ci_high"] and 0.6 < out["reduction"] < 0.9
    # the share of the rise of the same arm is far above 1 (clean data below the base): not bounded
    assert A.share_of_rise_removed(base, raw, below_base, n_boot=50)["share"] > 2
    same = A.reduction_vs_raw(raw, raw, n_boot=200)  # the control: no mitigation, no reduction
    assert same["reduction"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0
    assert math.isnan(A.reduction_vs_raw(np.zeros((n, 2)), raw, n_boot=50)["reduction"])
    with pytest.raises(UserError, match="same prompts"):
        A.reduction_vs_raw(raw[:10], raw)


def test_pair_file_errors_are_one_line(tmp_path):
    good = [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    for name, rows, needle in (("missing.jsonl", [{"prompt": "p", "chosen": "c"}], "missing column 'rejected'"),
                               ("empty.jsonl", [{"prompt": "p", "chosen": " ", "rejected": "r"}],
                                "row 1: column 'chosen' is empty"),
                               ("types.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}], "must be a string")):
        write_records(rows, str(tmp_path / name))
        with pytest.raises(UserError, match=needle) as exc:
            A.read_pair_file(str(tmp_path / name))
        assert "\n" not in str(exc.value)
    write_records(good, str(tmp_path / "ok.parquet"))
    assert A.read_pair_file(str(tmp_path / "ok.parquet")) == good
