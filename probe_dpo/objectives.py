"""Learning signals: what says "this completion is toxic" during training.

A *signal* scores (prompt, completion) pairs, one float per pair (higher = more of the
behaviour), and ranks sampled completions into preference pairs:

- ``ProbeSignal``: the training probes of a ``ProbeSet`` read the model's OWN hidden states
  on the completion, mean-pooled over the completion's tokens only (the prompt is
  excluded), at each probe's layer; an ensemble is aggregated by ``mean`` (or ``max``).
- ``ClassifierSignal``: an output classifier (a ``Judge``) scores the completion text.

The *differentiable probe penalty* (``probe_penalty``) is a function of the frozen probes'
output on the policy's hidden states during training, as a torch scalar: gradients flow
through the (parameter-free) probes into the layer activations and on into the policy. Its
``form`` matters for how hard it pushes: ``prob`` (the paper's default) is the sigmoid
probability, whose gradient p(1-p) vanishes on exactly the text the probe flags with
confidence; ``bce`` is the log-loss against "not the behaviour", softplus(logit) = -log(1-p),
whose gradient p stays near 1 there; ``logit`` is the raw logit, a constant push that never
saturates (and is unbounded below: what a deliberate attack on the probe uses).
``PenaltyRecorder`` hooks the probes' layers for one forward pass, recording only passes
run with gradients enabled (so a DPO reference pass under ``no_grad`` is skipped) and
looking through PEFT / DeepSpeed / DDP wrappers (``probe_dpo.model.unwrap_model``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from probe_dpo.errors import UserError

Aggregation = Literal["mean", "max"]
PenaltyReduce = Literal["pooled", "token"]
PenaltyForm = Literal["prob", "logit", "bce"]
PENALTY_FORMS: tuple[str, ...] = ("prob", "logit", "bce")


def penalty_values(logits: torch.Tensor, form: PenaltyForm) -> torch.Tensor:
    """The penalty of each probe logit: ``sigmoid`` (prob), the logit, or ``softplus`` (bce)."""
    if form == "prob":
        return torch.sigmoid(logits)
    if form == "logit":
        return logits
    if form == "bce":
        return torch.nn.functional.softplus(logits)
    raise UserError(f"unknown penalty form {form!r}: use one of {', '.join(PENALTY_FORMS)}")


class Signal:
    """Scores (prompt, completion) pairs: one float per pair, higher = more toxic."""

    name: str = "signal"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class ClassifierSignal(Signal):
    """An output classifier's score of the completion text (the prompt is not judged)."""

    def __init__(self, judge: Any):
        from probe_dpo.judges import Judge, get_judge

        self.judge = judge if isinstance(judge, Judge) else get_judge(judge)
        self.name = f"classifier:{self.judge.name}"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise UserError(f"{len(prompts)} prompts but {len(completions)} completions")
        return np.asarray(self.judge.score(list(completions)), dtype=np.float64)


class ProbeSignal(Signal):
    """The training probes' probability on the model's hidden states of the completion.

    Hidden states come from one forward pass over prompt + completion (the sequence the
    model produced), pooled over the completion tokens as each probe was trained
    (``probe.pooling`` over ``probe.span``, normally mean over the response).
    """

    def __init__(self, probes: Any, model: Any, tokenizer: Any, *, aggregation: Aggregation | None = None,
                 role: str = "train", batch_size: int = 16, max_length: int = 512):
        self.probes = probes
        self.model = model
        self.tokenizer = tokenizer
        self.role = role
        members = probes.with_role(role)
        if not members:
            raise UserError(f"probes {probes.uri or ''}: no {role} probes to score with".replace("  ", " "))
        self.aggregation = aggregation or probes.aggregation
        if self.aggregation not in ("mean", "max"):
            raise UserError(f"aggregation must be 'mean' or 'max', got {self.aggregation!r}")
        self.groups = sorted({(p.pooling, p.span) for p in members})
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"probe:{'+'.join(p.name for p in members)}"

    def features(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[tuple, dict[int, torch.Tensor]]:
        from probe_dpo.activations import extract

        out = {}
        for pooling, span in self.groups:
            layers = sorted({p.layer for p in self.probes.with_role(self.role)
                             if (p.pooling, p.span) == (pooling, span)})
            out[(pooling, span)] = extract(self.model, self.tokenizer, prompts=list(prompts),
                                           completions=list(completions), layers=layers, pooling=pooling,
                                           span=span, batch_size=self.batch_size, max_length=self.max_length)
        return out

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise UserError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not len(prompts):
            return np.zeros(0)
        feats = self.features(prompts, completions)
        probs = []
        with torch.no_grad():
            for probe in self.probes.with_role(self.role):
                probs.append(probe.prob(feats[(probe.pooling, probe.span)][probe.layer]))
        stacked = torch.stack(probs, 0)
        agg = stacked.max(0).values if self.aggregation == "max" else stacked.mean(0)
        return agg.to(torch.float64).cpu().numpy()


def make_signal(kind: str, *, judge: Any = None, probes: Any = None, model: Any = None, tokenizer: Any = None,
                aggregation: Aggregation | None = None) -> Signal:
    """``"probe"`` or ``"classifier"`` signal from its parts."""
    if kind == "classifier":
        return ClassifierSignal(judge)
    if kind == "probe":
        if probes is None or model is None or tokenizer is None:
            raise UserError("the probe signal needs probes, a model and its tokenizer")
        return ProbeSignal(probes, model, tokenizer, aggregation=aggregation)
    raise UserError(f"unknown signal {kind!r}: use 'probe' or 'classifier'")


# ---------------------------------------------------------------------------------------------
# The differentiable probe penalty


def probe_penalty(hidden_by_layer: dict[int, torch.Tensor], mask: torch.Tensor, probes: Sequence[Any], *,
                  reduce: PenaltyReduce = "pooled", aggregation: Aggregation = "mean",
                  form: PenaltyForm = "prob", per_sequence: bool = False) -> torch.Tensor:
    """The frozen probes' penalty on hidden states ``[batch, seq, hidden]``, differentiable.

    ``mask [batch, seq]`` selects the tokens that count (completion tokens, or every real
    token of an SFT sequence). ``reduce="pooled"`` applies each probe to the masked mean of
    its layer's states (or the last masked token for a ``last``-pooling probe): exactly the
    feature the probe was trained on. ``reduce="token"`` averages the per-token penalty over
    the masked tokens. ``form`` turns each probe logit into the penalty (``penalty_values``).
    Probes are combined by ``aggregation``; the result is the mean over sequences (a scalar)
    or, with ``per_sequence``, one value per sequence. Sequences with no masked token
    contribute zero.
    """
    if not probes:
        raise UserError("probe_penalty needs at least one probe")
    m = mask.to(torch.float32)
    counts = m.sum(1)
    has = counts > 0
    values = []
    for probe in probes:
        if probe.layer not in hidden_by_layer:
            raise UserError(f"probe {probe.name} reads layer {probe.layer}, but no hidden states were "
                            f"recorded there (recorded: {sorted(hidden_by_layer)})")
        h = hidden_by_layer[probe.layer]
        if h.shape[:2] != mask.shape:
            raise UserError(f"hidden states {tuple(h.shape[:2])} and mask {tuple(mask.shape)} disagree")
        probe = probe.to(h.device)
        mk = m.to(h.device)
        if reduce == "token":
            p = penalty_values(probe.logits(h), form)  # [batch, seq]
            v = (p * mk).sum(1) / counts.to(h.device).clamp(min=1)
        elif getattr(probe, "pooling", "mean") == "last":
            pos = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
            last = torch.where(mk > 0, pos, torch.full_like(pos, -1)).max(1).values.clamp(min=0)
            v = penalty_values(probe.logits(h[torch.arange(h.shape[0], device=h.device), last]), form)
        else:
            pooled = (h.to(torch.float32) * mk.unsqueeze(-1)).sum(1) / counts.to(h.device).clamp(min=1).unsqueeze(-1)
            v = penalty_values(probe.logits(pooled), form)
        values.append(v * has.to(v.device))
    stacked = torch.stack(values, 0)
    per_seq = stacked.max(0).values if aggregation == "max" else stacked.mean(0)
    if per_sequence:
        return per_seq
    n = has.sum().clamp(min=1).to(per_seq.device)
    return per_seq.sum() / n


class PenaltyRecorder:
    """Records the residual stream at the probes' layers, with the graph, for the penalty.

    Use ``with recorder.recording(model) as store: outputs = model(...)``; ``store`` maps
    layer -> ``[batch, seq, hidden]`` of the last forward pass run with gradients enabled.
    """

    def __init__(self, probes: Sequence[Any]):
        if not probes:
            raise UserError("the probe penalty needs at least one training probe")
        self.probes = list(probes)
        self.layers = sorted({p.layer for p in self.probes})

    @contextlib.contextmanager
    def recording(self, model: Any) -> Iterator[dict[int, torch.Tensor]]:
        from probe_dpo.model import residual_hooks

        with residual_hooks(model, self.layers, detach=False, only_with_grad=True) as store:
            yield store
