"""Probes: metrics, the fit against scikit-learn, the frozen module, probe sets, files, training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from probe_dpo import storage
from probe_dpo.data import write_records
from probe_dpo.errors import UserError
from probe_dpo.probes import LinearProbe, ProbeSet, ProbeTrainConfig, evaluate_probes, fit_probe, train_probes
from probe_dpo.stats import binary_metrics, roc_auc, threshold_at_fpr

torch.set_num_threads(1)

BAD = [" idiot", " stupid", " moron", " loser", " trash", " jerk"]
GOOD = [" friend", " garden", " river", " music", " window", " coffee"]
FILLER = [" and", " the", " then", " a", " very", " so", " of"]


def labelled_records(n_prompts: int, seed: int, per_prompt: int = 3) -> list[dict]:
    """Generations whose label is carried by the completion's words (not the prompt's genre)."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        genre = "toxic-prompt" if p % 3 else "benign-prompt"
        prompt = f"Prompt {seed}-{p}: she said that" if genre == "benign-prompt" else f"Prompt {seed}-{p}: you are a"
        for s in range(per_prompt):
            label = int(rng.random() < (0.4 if genre == "toxic-prompt" else 0.15))
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
            words.insert(rng.randint(0, len(words)), rng.choice(BAD if label else GOOD))
            completion = "".join(words)
            rows.append({"prompt_id": f"{seed}-{p}", "prompt": prompt, "completion": completion,
                         "text": prompt + completion, "label": label, "score": float(label),
                         "score_other_judge": float(label) * 0.6 + rng.random() * 0.5, "genre": genre})
    return rows


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-data")
    files = {}
    for split, (n, seed) in {"train": (60, 1), "val": (25, 2), "test": (25, 3)}.items():
        files[split] = str(root / f"{split}.jsonl")
        write_records(labelled_records(n, seed), files[split])
    return files


def test_roc_auc_and_threshold_match_definitions():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # many ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))
    t = threshold_at_fpr(s, y, 0.1)
    assert (s[y == 0] > t).mean() <= 0.1 < (s[y == 0] >= t).mean() + 1e-9
    m = binary_metrics(1 / (1 + np.exp(-s)), y, threshold=1 / (1 + np.exp(-t)))
    assert m["fpr"] <= 0.1 and m["n"] == 500 and 0.5 < m["accuracy"] < 1


def test_fit_matches_sklearn_and_picks_c_on_validation():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    d = 20
    w = rng.normal(size=d)
    x = rng.normal(size=(600, d)) * rng.uniform(0.1, 30, size=d) + rng.normal(size=d) * 5
    z = (x - x.mean(0)) / x.std(0)
    y = (rng.random(600) < 1 / (1 + np.exp(-(z @ w) / 2))).astype(int)
    xt, yt, xv, yv = torch.tensor(x[:400], dtype=torch.float32), y[:400], torch.tensor(x[400:], dtype=torch.float32), y[400:]
    grid = [1e-3, 1e-2, 0.1, 1.0]
    fit = fit_probe(xt, yt, xv, yv, grid, tol=1e-8)
    aurocs = []
    for c in grid:
        zt = (x[:400] - fit.mean.numpy()) / fit.std.numpy()
        sk = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(zt, yt)
        aurocs.append(roc_auc(sk.decision_function((x[400:] - fit.mean.numpy()) / fit.std.numpy()), yv))
        if c == fit.c:
            np.testing.assert_allclose(fit.weight.numpy(), sk.coef_[0], atol=2e-4, rtol=1e-3)
            assert fit.bias == pytest.approx(sk.intercept_[0], abs=2e-4)
    assert fit.c == grid[int(np.argmax(aurocs))]
    assert [p["val_auroc"] for p in fit.path] == pytest.approx(aurocs, abs=1e-6)
    assert fit.val_auroc > 0.75 and fit.l2 == pytest.approx(1 / (fit.c * 400))
    with pytest.raises(UserError, match="single class"):
        fit_probe(xt, np.zeros(400), xv, yv)


def test_newton_cg_reaches_the_exact_optimum_on_ill_conditioned_wide_data():
    """The stale-Hessian preconditioner is reused along the grid; the optimum must not move."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    n, d = 500, 120  # nearly separable at weak regularisation, features of very different scales
    x = rng.normal(size=(n, 8)) @ rng.normal(size=(8, d)) * 3 + rng.normal(size=(n, d)) * rng.uniform(0.05, 2, d)
    z = (x - x.mean(0)) / x.std(0)
    y = (z[:, :10].sum(1) + rng.normal(size=n) > 1.0).astype(int)
    xt = torch.tensor(x[:350], dtype=torch.float32)
    grid = [1e-3, 1e-1, 10.0]
    fit = fit_probe(xt, y[:350], torch.tensor(x[350:], dtype=torch.float32), y[350:], grid, tol=1e-9, max_iter=200)
    assert max(p["iterations"] for p in fit.path) < 200
    zt = (x[:350] - fit.mean.numpy()) / fit.std.numpy()
    for p in fit.path:
        sk = LogisticRegression(C=p["c"], tol=1e-12, max_iter=100000).fit(zt, y[:350])
        auroc = roc_auc(sk.decision_function((x[350:] - fit.mean.numpy()) / fit.std.numpy()), y[350:])
        assert p["val_auroc"] == pytest.approx(auroc, abs=1e-6)
        if p["c"] == fit.c:
            np.testing.assert_allclose(fit.weight.numpy(), sk.coef_[0], atol=1e-4 * max(1.0, np.abs(sk.coef_).max()))


def test_linear_probe_is_frozen_and_differentiable():
    d = 8
    probe = LinearProbe(torch.randn(d), 0.3, torch.randn(d), torch.rand(d) + 0.5, layer=3, name="p")
    assert list(probe.parameters()) == [] and {n for n, _ in probe.named_buffers()} == {"weight", "bias", "mean", "std"}
    h = torch.randn(2, 5, d, dtype=torch.bfloat16, requires_grad=True)
    p = probe.prob(h)
    assert p.shape == (2, 5) and p.dtype == torch.float32
    p.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    x = torch.randn(4, d)
    want = torch.sigmoid(((x - probe.mean) / probe.std) @ probe.weight + probe.bias)
    torch.testing.assert_close(probe.prob(x), want)
    torch.testing.assert_close(probe.logits(x), x @ probe.direction() + probe.logits(torch.zeros(1, d)))
    with pytest.raises(UserError, match="expects hidden size 8"):
        probe.logits(torch.randn(3, 9))


def _set(d=6):
    torch.manual_seed(0)
    mk = lambda name, layer, role: LinearProbe(torch.randn(d), 0.1, torch.zeros(d), torch.ones(d), layer=layer,
                                               name=name, role=role, card={"metrics": {"test": {"auroc": 0.9}}})
    return ProbeSet([mk("a", 1, "train"), mk("b", 2, "train"), mk("c", 0, "held_out")], aggregation="max",
                    meta={"model_hash": "m" * 16, "arch_hash": "x" * 16})


def test_probe_set_scores_and_roles():
    ps = _set()
    feats = {0: torch.randn(5, 6), 1: torch.randn(5, 6), 2: torch.randn(5, 6)}
    pa, pb = ps["a"].prob(feats[1]), ps["b"].prob(feats[2])
    torch.testing.assert_close(ps.score(feats), torch.maximum(pa, pb))
    torch.testing.assert_close(ps.score(feats, aggregation="mean"), (pa + pb) / 2)
    torch.testing.assert_close(ps.score(feats, role="held_out"), ps["c"].prob(feats[0]))
    assert ps.layers("train") == [1, 2] and ps.layers() == [0, 1, 2]
    assert [p.name for p in ps.held_out_probes] == ["c"]
    assert ps.default_probe.name == "a" and ProbeSet([ps["c"]]).default_probe.name == "c"
    with pytest.raises(UserError, match="reads layer 2"):
        ps.score({1: feats[1]})


def test_probe_set_round_trip_without_pickle(storage_root):
    ps = _set()
    uri = storage.join(storage_root, "probes")
    ps.save(uri)
    names = set(storage.read_manifest(uri)["files"])
    assert names == {"probeset.json", "probes/a.safetensors", "probes/a.json", "probes/b.safetensors",
                     "probes/b.json", "probes/c.safetensors", "probes/c.json"}
    back = ProbeSet.load(uri)
    feats = {k: torch.randn(3, 6) for k in range(3)}
    torch.testing.assert_close(back.score(feats), ps.score(feats))
    assert back.aggregation == "max" and back["c"].role == "held_out" and back["a"].card["metrics"]["test"]["auroc"] == 0.9
    assert back.meta["model_hash"] == "m" * 16 and back.uri == uri
    card = json.loads(storage.read_text(storage.join(uri, "probes/a.json")))
    assert card["layer"] == 1 and card["hidden_size"] == 6 and card["pooling"] == "mean"


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no probe set there"):
        ProbeSet.load(str(tmp_path / "nothing"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "probeset.json").write_text("{}")
    with pytest.raises(UserError, match="incomplete"):
        ProbeSet.load(str(tmp_path / "half"))


def test_check_compatible_names_both_models(tiny_model_dir):
    from probe_dpo.model import arch_hash, load_model, model_hash

    model = load_model(tiny_model_dir)
    ps = _set(d=6)
    with pytest.raises(UserError, match=r"reads hidden size 6, but the given LlamaForCausalLM has hidden size 64"):
        ps.check_compatible(model)
    ok = ProbeSet([LinearProbe(torch.randn(64), 0.0, torch.zeros(64), torch.ones(64), layer=1)],
                  meta={"model_hash": model_hash(model), "arch_hash": arch_hash(model)})
    ok.check_compatible(model, same_weights=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.1)  # a "fine-tuned" model
    ok.check_compatible(model)  # same architecture: fine for measuring detection after training
    with pytest.raises(UserError, match="model hash"):
        ok.check_compatible(model, same_weights=True)
    deep = ProbeSet([LinearProbe(torch.randn(64), 0.0, torch.zeros(64), torch.ones(64), layer=5)])
    with pytest.raises(UserError, match=r"reads layer 5, but the given LlamaForCausalLM has layers 0..1"):
        deep.check_compatible(model)


def test_train_probes_end_to_end(tiny_model_dir, data_files, tmp_path):
    cfg = ProbeTrainConfig(c_grid=[0.01, 0.1, 1.0, 10.0], batch_size=16)
    cfg.train_probe.kind = "bootstrap"
    cfg.train_probe.n = 2
    cfg.held_out.data_fraction = 0.3
    out = str(tmp_path / "probes")
    result = train_probes(cfg, model=str(tiny_model_dir), train=data_files["train"], val=data_files["val"],
                          test=data_files["test"], out=out)
    ps, report = result.probeset, result.report
    assert report["layers"] == [0, 1]
    names = {p.name for p in ps.probes}
    best = report["best_layer"]
    assert {f"train-L{best}-boot0", f"train-L{best}-boot1", f"heldout-L{1 - best}", f"heldout-data-L{best}"} == names
    rows = {r["name"]: r for r in report["probes"]}
    # the label is in the completion's words: even a random tiny model's states carry it
    assert rows[f"train-L{best}-boot0"]["test_auroc"] > 0.85
    assert report["train_ensemble"]["test"] > 0.85
    base = report["baselines"]["test"]
    assert 0.5 < base["genre_indicator_auroc"] < 0.8
    assert base["judge_agreement"]["score_other_judge"]["auroc"] > 0.8
    card = ps[f"train-L{best}-boot0"].card
    assert card["model_hash"] == ps.meta["model_hash"] and len(card["data_hash"]) == 16
    assert card["c"] in cfg.c_grid and 0 < card["threshold"] < 1 and card["metrics"]["val"]["fpr"] <= cfg.fpr
    assert "| probe | role | layer |" in result.markdown
    saved = ProbeSet.load(out)
    assert {p.name for p in saved.probes} == names and saved.aggregation == "mean"
    assert json.loads(storage.read_text(storage.join(out, "report.json")))["best_layer"] == best

    # detection measured with the saved set on the same model and data
    ev = evaluate_probes(saved, str(tiny_model_dir), data_files["test"])
    assert ev["probes"][f"train-L{best}-boot0"]["auroc"] == pytest.approx(rows[f"train-L{best}-boot0"]["test_auroc"],
                                                                        abs=1e-6)
    assert ev["train_aggregate_auroc"] == pytest.approx(report["train_ensemble"]["test"], abs=1e-6)


def test_train_probe_kinds_and_layer_errors(tiny_model_dir, data_files):
    cfg = ProbeTrainConfig(layers=[-1], c_grid=[0.1, 1.0])
    cfg.train_probe.kind = "seeds"
    cfg.train_probe.n = 2
    result = train_probes(cfg, model=str(tiny_model_dir), train=data_files["train"], val=data_files["val"])
    assert [p.name for p in result.probeset.probes] == ["train-L1-seed0", "train-L1-seed1"]
    assert result.probeset.held_out_probes == []
    cfg = ProbeTrainConfig(layers=[0, 5])
    with pytest.raises(UserError, match="layer 5 is out of range: the model has 2 layers"):
        train_probes(cfg, model=str(tiny_model_dir), train=data_files["train"], val=data_files["val"])
    cfg = ProbeTrainConfig(layers=[0])
    cfg.train_probe.layer = 1
    with pytest.raises(UserError, match="train_probe.layer: layer 1 is not among the extracted layers"):
        train_probes(cfg, model=str(tiny_model_dir), train=data_files["train"], val=data_files["val"])


def test_cross_fitting_never_scores_a_row_with_a_probe_that_saw_its_prompt():
    from probe_dpo.probes import cross_fit_scores, group_folds

    rng = np.random.default_rng(0)
    groups = [f"p{i // 4}" for i in range(240)]
    y = (rng.random(240) < 0.3).astype(int)
    x = rng.normal(size=(240, 12)) + 0.8 * y[:, None] * (np.arange(12) == 0)
    planted = np.array([g == "p7" for g in groups])  # one memorisable prompt: its own feature, always toxic
    y[planted] = 1
    x[planted] = 0.0
    x[planted, 11] = 6.0
    x[~planted, 11] = 0.0
    feats = {3: torch.tensor(x, dtype=torch.float32)}
    folds = group_folds(groups, 5, seed=0)
    assert all(len(set(folds[[g == f"p{i}" for g in groups]])) == 1 for i in range(60))  # a prompt in one fold
    assert sorted(np.bincount(folds).tolist()) == [48, 48, 48, 48, 48]
    in_sample = fit_probe(feats[3], y, feats[3], y, [10.0])
    probe = LinearProbe.from_fit(in_sample, layer=3, name="train-L3", role="train", card={"c": 10.0})
    memorised = probe.prob(feats[3][torch.as_tensor(planted)]).numpy()
    crossed = cross_fit_scores(feats, y, groups, [probe], folds=5, seed=0)["train-L3"]
    assert memorised.min() > 0.95  # the in-sample probe learned the planted prompt's feature
    assert crossed[planted].max() < 0.6  # no cross-fitted probe had seen it
    # rows of other prompts are scored by probes of the right kind (toxic rows score higher)
    assert roc_auc(crossed[~planted], y[~planted]) > 0.6


def test_ensembles_of_disjoint_shares_and_the_train_role_threshold(tiny_model_dir, data_files, tmp_path):
    from probe_dpo.config import load_config

    def load_config_for(overrides):
        return load_config(ProbeTrainConfig, None, overrides)

    cfg = load_config_for(["layers=[0,1]", "train_probe.kind=subsets", "train_probe.n=3", "train_probe.layer=1"])
    result = train_probes(cfg, model=str(tiny_model_dir), train=data_files["train"], val=data_files["val"],
                          out=str(tmp_path / "ps"))
    members = result.probeset.train_probes
    assert [p.name for p in members] == ["train-L1-part0", "train-L1-part1", "train-L1-part2"]
    assert sum(p.card["n_train"] for p in members) == 180  # disjoint shares of the 60 x 3 training rows
    loaded = ProbeSet.load(str(tmp_path / "ps"))
    assert 0.0 < loaded.meta["train_threshold"] < 1.0
    layers = load_config_for(["layers=[0,1]", "train_probe.kind=layers", "train_probe.n=2", "train_probe.layer=0"])
    made = train_probes(layers, model=str(tiny_model_dir), train=data_files["train"], val=data_files["val"]).probeset
    assert [p.layer for p in made.train_probes][0] == 0 and len(made.train_probes) == 2
