"""Linear probes on pooled hidden states: fitting, metrics, probe sets with roles, files.

A probe is logistic regression on z-scored activations of one layer. Fitting minimises
``mean log-loss + l2/2 * |w|^2`` (the bias is not penalised), which is scikit-learn's
``LogisticRegression(C)`` objective with ``l2 = 1 / (C * n)``. It runs in torch (CPU or GPU)
with Newton's method (steps by conjugate gradients preconditioned with a Hessian formed only
when it goes stale, backtracking line search), warm-started along the C grid from strong to
weak regularisation; for very wide models (hidden size >
``NEWTON_MAX_DIM``) full-batch L-BFGS is used instead. ``C`` is chosen on the validation
split by AUROC (ties go to the stronger regularisation).

``LinearProbe`` is a frozen ``nn.Module`` (buffers ``mean``, ``std``, ``weight``, ``bias``)
usable as a differentiable penalty: ``logits(h)`` / ``prob(h)`` for ``h[..., hidden]``.

``ProbeSet`` holds probes with roles: ``train`` probes (what fine-tuning is trained against:
one probe or an ensemble, aggregated by ``mean`` or ``max``) and ``held_out`` probes (other
layers / data that training never sees). On storage a set is a published folder:
``probeset.json`` + ``probes/<name>.safetensors`` + ``probes/<name>.json`` (the probe's card),
and for sets made by ``train_probes`` a ``report.json`` / ``report.md``. No pickle.

The package: ``fit`` (the solver), ``probe`` (``LinearProbe``, ``ProbeSet`` and their files),
``train`` (probe sets from labelled data and their report), ``crossfit`` (scores from probes
that never saw the row's prompt), ``evaluate`` (saved probes measured on any model and data).
"""

from probe_dpo.probes.crossfit import cross_fit_scores, group_folds
from probe_dpo.probes.evaluate import eval_markdown, evaluate_probes
from probe_dpo.probes.fit import DEFAULT_C_GRID, NEWTON_MAX_DIM, FitResult, fit_probe
from probe_dpo.probes.probe import FORMAT, ROLES, LinearProbe, ProbeSet
from probe_dpo.probes.report import report_markdown
from probe_dpo.probes.train import (
    HeldOutSpec,
    ProbeTrainConfig,
    ProbeTrainResult,
    TrainProbeSpec,
    train_probes,
)

__all__ = ["DEFAULT_C_GRID", "FORMAT", "NEWTON_MAX_DIM", "ROLES", "FitResult", "HeldOutSpec", "LinearProbe",
           "ProbeSet", "ProbeTrainConfig", "ProbeTrainResult", "TrainProbeSpec", "cross_fit_scores",
           "eval_markdown", "evaluate_probes", "fit_probe", "group_folds", "report_markdown", "train_probes"]
