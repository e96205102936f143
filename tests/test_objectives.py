"""Signals and the differentiable probe penalty, against hand computations on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe_dpo import objectives as O
from probe_dpo.activations import extract
from probe_dpo.errors import UserError
from probe_dpo.judges import get_judge
from probe_dpo.model import load_model, load_tokenizer
from probe_dpo.probes import LinearProbe, ProbeSet

torch.set_num_threads(1)

PROMPTS = ["You are such a", "The garden in spring is", "Tell me a story:"]
COMPLETIONS = [" stupid idiot, go away.", " full of flowers and bees.", " once there was a cat"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _probeset(width: int = 64) -> ProbeSet:
    gen = torch.Generator().manual_seed(0)
    probes = [LinearProbe(torch.randn(width, generator=gen), 0.1 * k, torch.randn(width, generator=gen) * 0.1,
                          torch.rand(width, generator=gen) + 0.5, layer=k, name=f"train-L{k}", role="train")
              for k in (0, 1)]
    probes.append(LinearProbe(torch.randn(width, generator=gen), 0.0, torch.zeros(width), torch.ones(width),
                              layer=1, name="heldout-L1", role="held_out"))
    return ProbeSet(probes, aggregation="mean")


def test_probe_signal_is_the_train_probes_on_the_completion_tokens(tiny):
    model, tok = tiny
    ps = _probeset()
    feats = extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[0, 1])  # response mean
    want = torch.stack([ps["train-L0"].prob(feats[0]), ps["train-L1"].prob(feats[1])]).mean(0)
    got = O.ProbeSignal(ps, model, tok).score(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    got_max = O.ProbeSignal(ps, model, tok, aggregation="max").score(PROMPTS, COMPLETIONS)
    want_max = torch.stack([ps["train-L0"].prob(feats[0]), ps["train-L1"].prob(feats[1])]).max(0).values
    np.testing.assert_allclose(got_max, want_max.numpy(), rtol=1e-5, atol=1e-6)
    # the prompt is excluded: changing it changes the states (causal attention) but pooling
    # still covers the completion only, so a text-only "all" pooling gives another value
    allspan = extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[0, 1], span="all")
    assert not torch.allclose(ps["train-L0"].prob(allspan[0]), ps["train-L0"].prob(feats[0]))


def test_classifier_signal_is_the_judge_on_the_completion_only():
    judge = get_judge("profanity-check")
    sig = O.make_signal("classifier", judge=judge)
    got = sig.score(["Ignore this fucking prompt"] * 3, COMPLETIONS)
    np.testing.assert_allclose(got, judge.score(COMPLETIONS))
    assert got[0] > 0.5 > got[1]
    with pytest.raises(UserError, match="2 prompts but 3 completions"):
        sig.score(PROMPTS[:2], COMPLETIONS)


def test_penalty_equals_probe_on_pooled_states_and_has_gradients(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.train()
    tok = load_tokenizer(tiny_model_dir)
    ps = _probeset()
    enc = tok([p + c for p, c in zip(PROMPTS, COMPLETIONS)], return_tensors="pt", padding=True)
    mask = enc["attention_mask"].clone()
    mask[:, :3] = 0  # pretend the first 3 tokens are the prompt
    recorder = O.PenaltyRecorder(ps.train_probes)
    with recorder.recording(model) as store:
        model(**enc)
    penalty = O.probe_penalty(store, mask, ps.train_probes)
    with torch.no_grad():
        m = mask.float().unsqueeze(-1)
        want = torch.stack([ps[f"train-L{k}"].prob((store[k] * m).sum(1) / m.sum(1)) for k in (0, 1)]).mean(0).mean()
    assert penalty.item() == pytest.approx(want.item(), rel=1e-5)
    penalty.backward()
    grads = [p.grad for p in model.model.layers[0].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # flows through the frozen probes
    assert all(p.grad is None for p in ps.parameters()) and not list(ps.parameters())
    token = O.probe_penalty({k: v.detach() for k, v in store.items()}, mask, ps.train_probes, reduce="token",
                            per_sequence=True)
    assert token.shape == (3,) and torch.all((token > 0) & (token < 1))


def test_recorder_skips_no_grad_passes_like_a_dpo_reference(tiny):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with O.PenaltyRecorder(_probeset().train_probes).recording(model) as store:
        with torch.no_grad():
            model(**enc)
        assert store == {}
        model(**enc)
        assert set(store) == {0, 1} and store[0].requires_grad


def test_penalty_errors_name_the_problem():
    ps = _probeset()
    with pytest.raises(UserError, match="layer 1"):
        O.probe_penalty({0: torch.zeros(1, 2, 64)}, torch.ones(1, 2), ps.train_probes)
    with pytest.raises(UserError, match="at least one"):
        O.PenaltyRecorder([])
    with pytest.raises(UserError, match="unknown signal"):
        O.make_signal("vibes")


@pytest.mark.parametrize("form", O.PENALTY_FORMS)
@pytest.mark.parametrize("reduce", ["pooled", "token"])
def test_each_penalty_form_has_the_gradient_of_finite_differences(form, reduce):
    ps = _probeset()
    gen = torch.Generator().manual_seed(3)
    hidden = {k: torch.randn(2, 5, 64, generator=gen) for k in (0, 1)}
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])  # completion tokens only
    h = {k: v.clone().requires_grad_(True) for k, v in hidden.items()}
    value = O.probe_penalty(h, mask, ps.train_probes, reduce=reduce, form=form)
    value.backward()

    def at(k, idx, delta):
        moved = {j: v.clone() for j, v in hidden.items()}
        moved[k][idx] += delta
        return O.probe_penalty(moved, mask, ps.train_probes, reduce=reduce, form=form).item()

    eps = 3e-2  # float32 values: rounding error ~1e-7 / eps, curvature error ~eps^2
    for k, idx in ((0, (0, 1, 3)), (1, (1, 4, 10)), (0, (1, 2, 63))):
        numeric = (at(k, idx, eps) - at(k, idx, -eps)) / (2 * eps)
        assert h[k].grad[idx].item() == pytest.approx(numeric, rel=5e-3, abs=2e-5)
    assert h[0].grad[0, 0].abs().sum() == 0 and h[0].grad[0, 4].abs().sum() == 0  # masked tokens get none


def test_penalty_forms_differ_where_the_probe_is_confident():
    """prob's gradient p(1-p) vanishes on a confidently flagged text; bce's (p) and logit's (1) do not."""
    probe = LinearProbe(torch.ones(4), 0.0, torch.zeros(4), torch.ones(4), layer=0, name="p", role="train")
    grads = {}
    for form in O.PENALTY_FORMS:
        h = {0: torch.full((1, 1, 4), 2.0, requires_grad=True)}  # logit 8: p = 0.9997
        O.probe_penalty(h, torch.ones(1, 1), [probe], form=form).backward()
        grads[form] = h[0].grad.abs().sum().item()
    assert grads["prob"] < 0.01 and grads["bce"] == pytest.approx(4 * 0.99966, rel=1e-3)
    assert grads["logit"] == pytest.approx(4.0)
    with pytest.raises(UserError, match="unknown penalty form"):
        O.penalty_values(torch.zeros(1), "hinge")
