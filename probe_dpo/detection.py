"""How well probes detect the behaviour in a model, the way a monitor is used.

A deployed probe is a monitor with a fixed threshold: it flags ``score > threshold``, the
threshold fixed on the base model (each probe card's ``threshold``, set at a validation
false-positive rate). Training that shifts every activation along ``-w`` leaves AUROC where
it was and defeats that monitor, so detection is reported both ways: AUROC, and TPR, FPR
and accuracy at the base threshold, plus the mean probe score on positives and negatives.

Two kinds of rows are read:

- **fixed texts** (``read_fixed``): the probe-test generations of the base model, the same
  rows for every model, labelled once; probes read each model's activations on them. Fresh
  probes are also *retrained* on the model's own activations (``retrained:L<layer>``), with
  their own threshold at the same validation FPR.
- **own completions**: the policy's continuations of held-out prompts, labelled by each
  judge (what a monitor in deployment sees), read from the policy's activations and from a
  frozen copy of the base model's activations on the same text
  (``probe_dpo.evaluation.policy_readings``).

A ``Readout`` holds one model's scores on one set of rows; ``compare`` gives a role's metric
for the base model, the fine-tuned model (seeds pooled) and the paired change with its
cluster-bootstrap interval (``probe_dpo.stats``). The outcome label of an arm (what
happened to the behaviour and to its probe) is ``probe_dpo.outcome``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from probe_dpo.errors import UserError
from probe_dpo.stats import cluster_ids, two_level_bootstrap, weighted_auroc, weighted_mean

TRAIN_AGGREGATE = "aggregate:train"
METRICS = ("auroc", "tpr", "fpr", "accuracy", "mean_pos", "mean_neg")


@dataclass
class Readout:
    """One model's probe scores on one set of labelled rows, with each key's flags.

    ``scores`` and ``flagged`` map a key (a probe name, ``aggregate:train``,
    ``retrained:L<layer>``) to one value per row; ``groups`` are the rows' prompts.
    """

    scores: dict[str, np.ndarray]
    flagged: dict[str, np.ndarray]
    labels: np.ndarray
    groups: list[Any]
    thresholds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, scores: Mapping[str, Any], labels: Any, groups: Sequence[Any],
              thresholds: Mapping[str, float]) -> "Readout":
        s = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
        t = {k: float(thresholds[k]) if thresholds.get(k) is not None else float("nan") for k in s}
        flagged = {k: (v > t[k]).astype(np.float64) if math.isfinite(t[k]) else np.full(v.shape, np.nan)
                   for k, v in s.items()}
        return cls(s, flagged, np.asarray(labels).astype(bool), list(groups), t)

    @classmethod
    def concat(cls, parts: Sequence["Readout"]) -> "Readout":
        """Rows of several readouts (seeds of one arm) as one; keys common to all are kept."""
        keys = [k for k in parts[0].scores if all(k in p.scores for p in parts)]
        return cls({k: np.concatenate([p.scores[k] for p in parts]) for k in keys},
                   {k: np.concatenate([p.flagged[k] for p in parts]) for k in keys},
                   np.concatenate([p.labels for p in parts]), [g for p in parts for g in p.groups])

    def to_json(self) -> dict:
        return {"scores": {k: v.tolist() for k, v in self.scores.items()}, "thresholds": self.thresholds,
                "labels": self.labels.astype(int).tolist(), "groups": [str(g) for g in self.groups]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Readout":
        return cls.build(d["scores"], d["labels"], d["groups"], d["thresholds"])


def metric_values(r: Readout, key: str, metric: str, w: np.ndarray) -> np.ndarray:
    """One metric of one key for row weights ``w [..., rows]``."""
    s, y = r.scores[key], r.labels
    if metric == "auroc":
        return weighted_auroc(s, y, w)
    if metric == "mean_pos":
        return weighted_mean(s, w, y)
    if metric == "mean_neg":
        return weighted_mean(s, w, ~y)
    f = r.flagged[key]
    if metric == "tpr":
        return weighted_mean(f, w, y)
    if metric == "fpr":
        return weighted_mean(f, w, ~y)
    if metric == "accuracy":
        return weighted_mean(f == y, w) if np.isfinite(f).all() else np.full(w.shape[:-1], np.nan)
    raise ValueError(f"unknown metric {metric!r}")


def role_value(r: Readout, keys: Sequence[str], metric: str, w: np.ndarray) -> np.ndarray:
    """The metric averaged over the role's keys (several held-out probes are one statistic)."""
    return np.mean([metric_values(r, k, metric, w) for k in keys], axis=0)


def compare(base: Readout | Sequence[Readout], new: Readout | Sequence[Readout] | None, keys: Sequence[str],
            metric: str, *, n_boot: int = 1000, seed: int = 0, same_seeds: bool = False) -> dict[str, float]:
    """A role's ``metric`` on the base model and on ``new`` (None: the base alone), and their
    paired change. Either side may be one readout or one per training seed (pooled for the
    value). Resamples draw prompts, each model's rows of a drawn prompt counting as drawn, and
    each side's seeds with them (``probe_dpo.stats.two_level_bootstrap``): training variance is
    inside the interval.

    Returns ``base`` (its value), and with ``new``: ``value``, ``delta`` = value - base,
    ``delta_ci_low``/``delta_ci_high`` (95%), ``p_value``, and ``per_seed`` / ``seed_sd``: the
    change of each of ``new``'s seeds alone and their spread (NaN for one seed).
    ``same_seeds``: both sides are the same seeds' rows read two ways (the policy and a frozen copy
    on one model's completions), so one seed draw serves both.
    """
    bases = [base] if isinstance(base, Readout) else list(base)
    news = [] if new is None else [new] if isinstance(new, Readout) else list(new)
    keys = [k for k in keys if all(k in r.scores for r in bases + news)]
    if not keys:
        return {}
    order: dict[str, int] = {}
    b, gb, sb = _seeded(bases, order)
    base_value = float(role_value(b, keys, metric, np.ones(len(b.labels))))
    if not news:
        return {"base": base_value}
    n, gn, sn = _seeded(news, order)

    def delta(prompts: np.ndarray, seeds: list[np.ndarray]) -> np.ndarray:
        return (role_value(n, keys, metric, prompts[:, gn] * seeds[-1][:, sn])
                - role_value(b, keys, metric, prompts[:, gb] * seeds[0][:, sb]))

    groups = [len(news)] if same_seeds else [len(bases), len(news)]
    res = two_level_bootstrap(len(order), groups, delta, n_boot=n_boot, seed=seed)
    per_seed = [float(role_value(r, keys, metric, np.ones(len(r.labels)))) - base_value for r in news]
    return {"base": base_value, "value": float(role_value(n, keys, metric, np.ones(len(n.labels)))),
            "delta": res["estimate"], "delta_ci_low": res["ci_low"], "delta_ci_high": res["ci_high"],
            "p_value": res["p_value"], "per_seed": per_seed,
            "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")}


def _seeded(parts: Sequence[Readout], order: dict[str, int]) -> tuple[Readout, np.ndarray, np.ndarray]:
    """The seeds' rows as one readout, with each row's prompt id (in the shared ``order``) and seed."""
    pooled = Readout.concat(parts) if len(parts) > 1 else parts[0]
    groups, _ = cluster_ids(pooled.groups, order)
    seeds = np.concatenate([np.full(len(p.labels), i) for i, p in enumerate(parts)])
    return pooled, groups, seeds


def role_keys(probeset_summary: Mapping[str, Any]) -> dict[str, list[str]]:
    """Which keys each role reads: the train probe (the single arm's target), the ensemble
    (the train probes' aggregate), the held-out probes, the probe retrained at the train layer."""
    return {"train": [probeset_summary["best_probe"]], "ensemble": [TRAIN_AGGREGATE],
            "held_out": list(probeset_summary["held_out"]),
            "retrained": [f"retrained:L{probeset_summary['best_layer']}"]}


# ---------------------------------------------------------------------------------------------
# Reading probes on a model


def probe_scores(probeset: Any, feats: Mapping[int, Any]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every probe's probability and the train aggregate on pooled features, with thresholds."""
    import torch

    scores, thresholds = {}, {}
    with torch.no_grad():
        for probe in probeset.probes:
            scores[probe.name] = probe.prob(feats[probe.layer]).double().numpy()
            thresholds[probe.name] = probe.card.get("threshold")
        if probeset.train_probes:
            scores[TRAIN_AGGREGATE] = probeset.score(dict(feats), "train").double().numpy()
            thresholds[TRAIN_AGGREGATE] = probeset.meta.get("train_threshold")
    return scores, thresholds


def read_fixed(model: Any, tokenizer: Any, probeset: Any, splits: Mapping[str, Sequence[dict]], *,
               retrain_layers: Sequence[int] = (), c_grid: Sequence[float] | None = None, fpr: float = 0.05,
               batch_size: int = 32, max_length: int = 256, dtype: str = "float32") -> tuple[Readout, dict]:
    """The probes (and probes retrained on this model) on ``model``'s activations of the test rows.

    Records need ``prompt``, ``completion``, ``label`` (and ``prompt_id``). Retrained probes
    are fitted on ``splits["train"]``, C chosen and threshold fixed (at ``fpr``) on
    ``splits["val"]``. Returns the test readout and the retrained probes' fit facts.
    ``dtype``: the matmul precision of the forward passes (``probe_dpo.precision``); the
    features and every probe fit are float32 either way.
    """
    import torch

    from probe_dpo.activations import extract
    from probe_dpo.generation import device_of
    from probe_dpo.precision import autocast
    from probe_dpo.probes import DEFAULT_C_GRID, LinearProbe, fit_probe
    from probe_dpo.stats import threshold_at_fpr

    for name in ("test",) + (("train", "val") if retrain_layers else ()):
        if not splits.get(name):
            raise UserError(f"probe detection needs a non-empty '{name}' split")
    layers = sorted({p.layer for p in probeset.probes} | set(retrain_layers))
    feats, labels = {}, {}
    for name, rows in splits.items():
        with autocast(dtype, device_of(model)):
            feats[name] = extract(model, tokenizer, prompts=[r["prompt"] for r in rows],
                                  completions=[r["completion"] for r in rows], layers=layers,
                                  batch_size=batch_size, max_length=max_length)
        labels[name] = np.array([int(r["label"]) for r in rows])
    scores, thresholds = probe_scores(probeset, feats["test"])
    retrained = {}
    for layer in retrain_layers:
        fit = fit_probe(feats["train"][layer], labels["train"], feats["val"][layer], labels["val"],
                        c_grid or DEFAULT_C_GRID)
        probe = LinearProbe.from_fit(fit, layer=layer)
        key = f"retrained:L{layer}"
        with torch.no_grad():
            scores[key] = probe.prob(feats["test"][layer]).double().numpy()
            thresholds[key] = threshold_at_fpr(probe.prob(feats["val"][layer]), labels["val"], fpr)
        retrained[key] = {"layer": layer, "c": fit.c, "val_auroc": fit.val_auroc, "threshold": thresholds[key]}
    groups = [r.get("prompt_id", r["prompt"]) for r in splits["test"]]
    return Readout.build(scores, labels["test"], groups, thresholds), retrained
