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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from probe_dpo.config import bounded
from probe_dpo.errors import UserError

FORMAT = "probe_dpo.probeset/1"
NEWTON_MAX_DIM = 2048
_REFORM_AFTER = 10  # CG iterations after which the preconditioning Hessian is re-formed
_CG_MAX_ITER = 50
DEFAULT_C_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
ROLES = ("train", "held_out")


# ---------------------------------------------------------------------------------------------
# Metrics


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    s, y = _np(scores).ravel(), _np(labels).ravel() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def threshold_at_fpr(scores: Any, labels: Any, fpr: float) -> float:
    """The lowest threshold t such that at most ``fpr`` of the negatives score above t."""
    s, y = _np(scores).ravel(), _np(labels).ravel() > 0.5
    neg = np.sort(s[~y])[::-1]
    if len(neg) == 0:
        return float("nan")
    k = int(math.floor(fpr * len(neg)))  # this many negatives may be above the threshold
    return float(neg[min(k, len(neg) - 1)])


def binary_metrics(probs: Any, labels: Any, threshold: float | None = None) -> dict[str, float]:
    """AUROC, accuracy at 0.5, and TPR/FPR when flagging ``prob > threshold``."""
    p, y = _np(probs).ravel(), _np(labels).ravel() > 0.5
    out = {"n": int(len(y)), "positives": int(y.sum()), "auroc": roc_auc(p, y),
           "accuracy": float(((p > 0.5) == y).mean()) if len(y) else float("nan")}
    if threshold is not None and not math.isnan(threshold):
        flagged = p > threshold
        out["tpr"] = float(flagged[y].mean()) if y.any() else float("nan")
        out["fpr"] = float(flagged[~y].mean()) if (~y).any() else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# Fitting


@dataclass
class FitResult:
    weight: torch.Tensor       # [d] in standardised space
    bias: float
    mean: torch.Tensor         # [d]
    std: torch.Tensor          # [d]
    c: float                   # the chosen C
    l2: float                  # 1 / (C * n_train)
    val_auroc: float
    path: list[dict]           # per C: {"c", "val_auroc", "iterations"}
    seconds: float
    n_train: int = 0
    positives: int = 0


def standardize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    return mean, std


def _loss(xa: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    # softplus(z) - y z is the log-loss; one fused kernel (binary_cross_entropy_with_logits took
    # ~300x longer on a loaded 2-core CPU); the threshold keeps it exact to ~1e-22
    z = xa @ theta
    return (nn.functional.softplus(z, threshold=50.0) - y * z).mean() + 0.5 * (reg * theta * theta).sum()


def _hvp(xh: torch.Tensor, w: torch.Tensor, reg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The logistic Hessian times ``v``: ``X^T W X v + reg v`` (in ``xh``'s precision, result in ``v``'s)."""
    return (xh.T @ (w * (xh @ v.to(xh.dtype)))).to(v.dtype) + reg * v


def _cholesky_apply(chol: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1 r`` by two triangular solves (~100x faster on CPU than ``torch.cholesky_solve`` for a vector)."""
    half = torch.linalg.solve_triangular(chol, r.unsqueeze(1), upper=False)
    return torch.linalg.solve_triangular(chol.T, half, upper=True).squeeze(1)


def _pcg(hvp, b: torch.Tensor, precond, rtol: float, max_iter: int) -> tuple[torch.Tensor, int]:
    """Preconditioned conjugate gradients for ``H x = b`` (``H`` given as ``hvp``, SPD)."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    p = z.clone()
    rz = r @ z
    stop = rtol * float(b.norm())
    for it in range(1, max_iter + 1):
        hp = hvp(p)
        alpha = rz / (p @ hp)
        x += alpha * p
        r -= alpha * hp
        if float(r.norm()) <= stop:
            return x, it
        z = precond(r)
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, max_iter


def _newton(xa, y, theta, reg, tol: float, max_iter: int, xa_lo=None, cache: dict | None = None
            ) -> tuple[torch.Tensor, int]:
    """Newton's method with each step solved by conjugate gradients, preconditioned by a stale Hessian.

    Forming the Hessian ``X^T W X`` (n * d^2) dominated the exact-Newton fit. Here it is formed
    (from ``xa_lo``, a float32 copy, when given), kept in ``cache`` and reused as the
    preconditioner for later steps and for the next C of the warm-started grid (only the ridge
    changes: a new Cholesky, d^3/3). ``W`` drifts slowly along the path, so CG needs a few
    Hessian-vector products (2 n d each); when it needs more than ``_REFORM_AFTER``, the Hessian
    is formed afresh at the current point. The gradient, loss and line search stay in ``xa``'s
    precision and the stopping rule is the gradient's, so the optimum is that of exact Newton.
    """
    n = xa.shape[0]
    xh = xa if xa_lo is None else xa_lo
    cache = {} if cache is None else cache
    f = _loss(xa, y, theta, reg)
    for it in range(1, max_iter + 1):
        p = torch.sigmoid(xa @ theta)
        grad = xa.T @ (p - y) / n + reg * theta
        if grad.abs().max() < tol:
            return theta, it - 1
        w = (p * (1 - p) / n).to(xh.dtype)
        if cache.get("gram") is None:
            xw = xh * w.sqrt().unsqueeze(1)
            cache["gram"], cache["chol"] = (xw.T @ xw).to(xa.dtype), None
        if cache.get("chol") is None or not torch.equal(cache["reg"], reg):
            hess = cache["gram"].clone()
            hess.diagonal().add_(reg + 1e-10)
            chol, info = torch.linalg.cholesky_ex(hess)
            cache["chol"] = chol if int(info) == 0 else None  # None: singular even with the jitter
            cache["reg"] = reg.clone()

        if cache["chol"] is None:
            step = torch.linalg.lstsq(cache["gram"] + torch.diag(reg), grad.unsqueeze(1)).solution.squeeze(1)
            cache["gram"] = None
        else:
            rtol = min(0.1, math.sqrt(float(grad.norm())))
            step, cg_iters = _pcg(functools.partial(_hvp, xh, w, reg), grad,
                                  functools.partial(_cholesky_apply, cache["chol"]), rtol, _CG_MAX_ITER)
            if cg_iters > _REFORM_AFTER:
                cache["gram"] = None
        slope = float(grad @ step)
        if slope <= 0:  # CG from zero on an SPD system always descends; this is float32 round-off: gradient step
            step, slope, cache["gram"] = grad, float(grad @ grad), None
        t = 1.0
        while True:
            cand = theta - t * step
            f_new = _loss(xa, y, cand, reg)
            if f_new <= f - 1e-4 * t * slope or t < 1e-8:
                break
            t *= 0.5
        theta, f = cand, f_new
    return theta, max_iter


def _lbfgs(xa, y, theta, reg, tol: float, max_iter: int, xa_lo=None, cache=None) -> tuple[torch.Tensor, int]:
    theta = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(xa, y, theta, reg)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach(), int(opt.state[opt._params[0]].get("n_iter", 0))


def fit_probe(x_train: torch.Tensor, y_train: Any, x_val: torch.Tensor, y_val: Any,
              c_grid: Sequence[float] = DEFAULT_C_GRID, *, device: str | torch.device | None = None,
              method: str = "auto", tol: float = 1e-5, max_iter: int = 100,
              dtype: torch.dtype = torch.float64) -> FitResult:
    """Standardise, fit logistic regression along ``c_grid`` (warm-started), pick C by val AUROC."""
    t0 = time.perf_counter()
    if not c_grid or any(c <= 0 for c in c_grid):
        raise UserError(f"c_grid must be a non-empty list of positive numbers, got {list(c_grid)}")
    device = torch.device(device) if device is not None else x_train.device
    xt = torch.as_tensor(x_train).to(device, dtype)
    xv = torch.as_tensor(x_val).to(device, dtype)
    yt = torch.as_tensor(_np(y_train) > 0.5).to(device, dtype)
    yv = _np(y_val) > 0.5
    if yt.min() == yt.max():
        raise UserError("probe training data has a single class; a probe needs both")
    n, d = xt.shape
    mean, std = standardize_stats(xt)
    ones = torch.ones(n, 1, dtype=dtype, device=device)
    xa = torch.cat([(xt - mean) / std, ones], 1)
    xva = torch.cat([(xv - mean) / std, torch.ones(len(xv), 1, dtype=dtype, device=device)], 1)
    solver = _newton if (method == "newton" or (method == "auto" and d <= NEWTON_MAX_DIM)) else _lbfgs
    xa_lo = xa.float() if dtype == torch.float64 and solver is _newton else None
    theta = torch.zeros(d + 1, dtype=dtype, device=device)
    best: tuple[float, float, torch.Tensor] | None = None
    path = []
    cache: dict = {}  # the Newton solver's preconditioning Hessian, carried along the grid
    for c in sorted(c_grid):
        reg = torch.full((d + 1,), 1.0 / (c * n), dtype=dtype, device=device)
        reg[-1] = 0.0
        theta, iters = solver(xa, yt, theta, reg, tol, max_iter, xa_lo, cache)
        auroc = roc_auc((xva @ theta), yv)
        path.append({"c": float(c), "val_auroc": auroc, "iterations": iters})
        if best is None or (not math.isnan(auroc) and auroc > best[1] + 1e-12) or math.isnan(best[1]):
            best = (float(c), auroc, theta.clone())
    c, val_auroc, theta = best
    return FitResult(weight=theta[:-1].to("cpu", torch.float32), bias=float(theta[-1]),
                     mean=mean.to("cpu", torch.float32), std=std.to("cpu", torch.float32), c=c,
                     l2=1.0 / (c * n), val_auroc=val_auroc, path=path, seconds=time.perf_counter() - t0,
                     n_train=n, positives=int(yt.sum()))


# ---------------------------------------------------------------------------------------------
# Probes


class LinearProbe(nn.Module):
    """A frozen logistic-regression probe on one layer's pooled residual stream.

    ``logits(h) = ((h - mean) / std) @ weight + bias`` for ``h`` of shape ``[..., hidden]``,
    computed in float32 (gradients flow into ``h``; the probe itself has no parameters).
    """

    def __init__(self, weight: torch.Tensor, bias: float | torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 *, layer: int, pooling: str = "mean", span: str = "response", name: str | None = None,
                 role: str = "train", card: dict | None = None):
        super().__init__()
        weight = torch.as_tensor(weight, dtype=torch.float32).reshape(-1)
        if mean.shape != weight.shape or std.shape != weight.shape:
            raise UserError(f"probe {name}: weight, mean and std must all have shape [{weight.numel()}]")
        if role not in ROLES:
            raise UserError(f"probe {name}: role must be one of {', '.join(ROLES)}, got {role!r}")
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32).reshape(()).clone())
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.layer = int(layer)
        self.pooling = pooling
        self.span = span
        self.name = name or f"L{layer}"
        self.role = role
        self.card = dict(card or {})
        self.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.numel())

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.hidden_size:
            raise UserError(f"probe {self.name} expects hidden size {self.hidden_size}, got features of "
                            f"size {h.shape[-1]}")
        z = (h.to(torch.float32) - self.mean) / self.std
        return z @ self.weight + self.bias

    def prob(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h)

    def direction(self) -> torch.Tensor:
        """The probe's direction in raw activation space (``weight / std``), for projections."""
        return self.weight / self.std

    @classmethod
    def from_fit(cls, fit: FitResult, **kwargs: Any) -> "LinearProbe":
        return cls(fit.weight, fit.bias, fit.mean, fit.std, **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous().cpu(), "bias": self.bias.reshape(1).contiguous().cpu(),
                "mean": self.mean.contiguous().cpu(), "std": self.std.contiguous().cpu()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, role={self.role!r}, layer={self.layer}, pooling={self.pooling!r}, " \
               f"hidden={self.hidden_size}"


class ProbeSet(nn.Module):
    """Probes with roles; ``score(features_by_layer, role)`` is the role's aggregated probability."""

    def __init__(self, probes: Sequence[LinearProbe], aggregation: str = "mean", meta: dict | None = None):
        super().__init__()
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise UserError(f"probe names must be unique, got {names}")
        if aggregation not in ("mean", "max"):
            raise UserError(f"aggregation must be 'mean' or 'max', got {aggregation!r}")
        sizes = {p.hidden_size for p in probes}
        if len(sizes) > 1:
            raise UserError(f"probes of one set must share a hidden size, got {sorted(sizes)}")
        self.probes = nn.ModuleList(probes)
        self.aggregation = aggregation
        self.meta = dict(meta or {})
        self.uri: str | None = None
        self.requires_grad_(False)

    def __getitem__(self, name: str) -> LinearProbe:
        for probe in self.probes:
            if probe.name == name:
                return probe
        raise KeyError(name)

    def with_role(self, role: str | None) -> list[LinearProbe]:
        if role is not None and role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return [p for p in self.probes if role is None or p.role == role]

    @property
    def train_probes(self) -> list[LinearProbe]:
        return self.with_role("train")

    @property
    def held_out_probes(self) -> list[LinearProbe]:
        return self.with_role("held_out")

    @property
    def default_probe(self) -> LinearProbe:
        """The probe used where none is named: the first train probe (else the first probe)."""
        return (self.train_probes or list(self.probes))[0]

    @property
    def hidden_size(self) -> int:
        return self.probes[0].hidden_size if len(self.probes) else int(self.meta.get("hidden_size", 0))

    def layers(self, role: str | None = None) -> list[int]:
        return sorted({p.layer for p in self.with_role(role)})

    def scores(self, features_by_layer: dict[int, torch.Tensor], role: str | None = None) -> dict[str, torch.Tensor]:
        """Each probe's probability, by name."""
        out = {}
        for probe in self.with_role(role):
            if probe.layer not in features_by_layer:
                raise UserError(f"probe {probe.name} reads layer {probe.layer}, but the features hold layers "
                                f"{sorted(features_by_layer)}")
            out[probe.name] = probe.prob(features_by_layer[probe.layer])
        return out

    def score(self, features_by_layer: dict[int, torch.Tensor], role: str = "train",
              aggregation: str | None = None) -> torch.Tensor:
        """The aggregated probability of the probes of ``role`` (differentiable in the features)."""
        probs = list(self.scores(features_by_layer, role).values())
        if not probs:
            raise UserError(f"the probe set has no {role} probes")
        stacked = torch.stack(probs, 0)
        how = aggregation or self.aggregation
        return stacked.max(0).values if how == "max" else stacked.mean(0)

    # --- compatibility ------------------------------------------------------------------------

    def check_compatible(self, model: Any, *, same_weights: bool = False) -> None:
        """UserError unless ``model`` (module or folder) fits these probes.

        The hidden size, the architecture and the layer count must match; with
        ``same_weights`` the model hash must too (the probes' own model, not a fine-tune).
        """
        from probe_dpo.model import arch_hash, hidden_size, model_hash, num_layers

        if not isinstance(model, nn.Module):
            from probe_dpo.model import load_model

            desc = str(model)
            model = load_model(model)
        else:
            desc = f"the given {type(model).__name__}"
        where = f"probes {self.uri}" if self.uri else "these probes"
        mine = f"hidden size {self.hidden_size}, model hash {self.meta.get('model_hash', '?')}"
        size = hidden_size(model)
        theirs = f"hidden size {size}, model hash {model_hash(model)}"
        if size != self.hidden_size:
            raise UserError(f"{where} were trained on a model with {mine}, but {desc} has {theirs}")
        if self.meta.get("arch_hash") and arch_hash(model) != self.meta["arch_hash"]:
            raise UserError(f"{where} were trained on a model with {mine} (architecture {self.meta['arch_hash']}), "
                            f"but {desc} has {theirs} (architecture {arch_hash(model)})")
        count = num_layers(model)
        deep = [p.layer for p in self.probes if p.layer >= count]
        if deep:
            raise UserError(f"{where} read layer(s) {sorted(set(deep))}, but {desc} has {count} layers")
        if same_weights and self.meta.get("model_hash") and model_hash(model) != self.meta["model_hash"]:
            raise UserError(f"{where} were trained on a model with {mine}, but {desc} has {theirs}")

    # --- files --------------------------------------------------------------------------------

    def card(self) -> dict:
        return {"format": FORMAT, "aggregation": self.aggregation, "hidden_size": self.hidden_size,
                **{k: v for k, v in self.meta.items() if k not in ("format", "aggregation", "hidden_size")},
                "probes": [{"name": p.name, "role": p.role, "layer": p.layer, "pooling": p.pooling,
                            "span": p.span, "tensors": f"probes/{p.name}.safetensors",
                            "card": f"probes/{p.name}.json"} for p in self.probes]}

    def save(self, uri: str, *, extra_files: dict[str, str | bytes] | None = None, overwrite: bool = True) -> dict:
        """Publish the set at ``uri`` (safetensors + JSON cards; manifest last); returns the manifest."""
        from safetensors.torch import save_file

        from probe_dpo import storage

        with tempfile.TemporaryDirectory(prefix="probeset-") as tmp:
            root = Path(tmp)
            (root / "probes").mkdir()
            for probe in self.probes:
                save_file(probe.tensors(), str(root / "probes" / f"{probe.name}.safetensors"),
                          metadata={"format": FORMAT, "name": probe.name, "layer": str(probe.layer)})
                card = {"name": probe.name, "role": probe.role, "layer": probe.layer, "pooling": probe.pooling,
                        "span": probe.span, "hidden_size": probe.hidden_size, **probe.card}
                (root / "probes" / f"{probe.name}.json").write_text(json_text(card))
            (root / "probeset.json").write_text(json_text(self.card()))
            for rel, content in (extra_files or {}).items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            manifest = storage.publish_dir(root, uri, metadata={"kind": "probeset", "format": FORMAT,
                                                               "probes": len(self.probes)}, overwrite=overwrite)
        self.uri = str(uri)
        return manifest

    @classmethod
    def load(cls, uri: str) -> "ProbeSet":
        """Read a published set (safetensors + JSON only)."""
        from safetensors.torch import load

        from probe_dpo import storage

        if not storage.is_complete(uri):
            if storage.exists(storage.join(uri, "probeset.json")):
                raise UserError(f"probes {uri}: incomplete (no {storage.MANIFEST_NAME}; saving stopped half-way)")
            raise UserError(f"probes {uri}: no probe set there (no probeset.json)")
        card = storage.read_json(storage.join(uri, "probeset.json"))
        if not isinstance(card, dict) or card.get("format") != FORMAT:
            raise UserError(f"probes {uri}: probeset.json is not a {FORMAT} card")
        probes = []
        for entry in card["probes"]:
            tensors = load(storage.read_bytes(storage.join(uri, entry["tensors"])))
            pcard = storage.read_json(storage.join(uri, entry["card"]))
            extra = {k: v for k, v in pcard.items()
                     if k not in ("name", "role", "layer", "pooling", "span", "hidden_size")}
            probes.append(LinearProbe(tensors["weight"], tensors["bias"][0], tensors["mean"], tensors["std"],
                                      layer=entry["layer"], pooling=entry["pooling"], span=entry["span"],
                                      name=entry["name"], role=entry["role"], card=extra))
        meta = {k: v for k, v in card.items() if k not in ("format", "aggregation", "probes")}
        out = cls(probes, aggregation=card.get("aggregation", "mean"), meta=meta)
        out.uri = str(uri)
        return out


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clean(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars and arrays -> Python, recursively."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON (NaN written as null), indented."""
    return json.dumps(_clean(obj), indent=2, default=_plain, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Training from labelled data


@dataclass
class TrainProbeSpec:
    """The probes fine-tuning trains against."""

    kind: Literal["single", "layers", "seeds", "bootstrap", "subsets"] = "single"
    """single: one probe; layers: one per layer; seeds: one per re-split of train+val by prompt;
    bootstrap: one per bootstrap resample of the training rows; subsets: one per disjoint
    share of the training prompts (members that never saw each other's data)."""
    layer: int | None = None
    """Layer for single/seeds/bootstrap/subsets (None: the best layer by validation AUROC)."""
    layers: list[int] = field(default_factory=list)
    """Layers for kind=layers (empty: ``layer``, when set, and the best others by validation
    AUROC, n in all)."""
    n: int = bounded(5, ge=1, le=100)
    aggregation: Literal["mean", "max"] = "mean"


@dataclass
class HeldOutSpec:
    """Probes that fine-tuning never sees (to measure whether detection really dropped)."""

    layers: list[int] | None = None
    """Held-out layers (None: every extracted layer that no training probe reads)."""
    data_fraction: float = bounded(0.0, ge=0.0, lt=1.0)
    """Share of training prompts reserved for held-out probes at the training layer(s);
    training probes never see them (0: no reserve)."""


@dataclass
class ProbeTrainConfig:
    layers: list[int] = field(default_factory=list)
    """Layers to extract (negative counts from the end; empty: every layer)."""
    pooling: Literal["mean", "last"] = "mean"
    span: Literal["response", "all"] = "response"
    """response: pool over the completion's tokens only (needs prompt and completion columns)."""
    label_column: str = "label"
    train_probe: TrainProbeSpec = field(default_factory=TrainProbeSpec)
    held_out: HeldOutSpec = field(default_factory=HeldOutSpec)
    c_grid: list[float] = field(default_factory=lambda: list(DEFAULT_C_GRID))
    fpr: float = bounded(0.05, gt=0.0, lt=1.0)
    """False-positive rate (on validation negatives) that fixes each probe's threshold."""
    batch_size: int = bounded(32, ge=1)
    max_length: int = bounded(256, ge=1)
    seed: int = bounded(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    actors: int = bounded(0, ge=0)
    """0: extract in this process; N: N Ray actors (extract_sharded)."""
    address: str | None = None
    """Ray address for actors > 0 (None: a local Ray)."""
    activations: str | None = None
    """Where sharded activations are kept (actors > 0; default: a temporary folder)."""
    threads: int | None = bounded(None, ge=1)
    """torch threads in this process (None: leave as is)."""


@dataclass
class ProbeTrainResult:
    probeset: ProbeSet
    report: dict
    markdown: str
    features: dict[str, dict[int, torch.Tensor]] | None = None
    """With ``keep_features``: the extracted features by split and layer (what a caller that
    scores the same rows, e.g. ranking candidate completions, would otherwise extract again)."""


def _columns_for(cfg: ProbeTrainConfig) -> tuple[str, ...]:
    return ("prompt", "completion") if cfg.span == "response" else ()


def _read_split(uri: str, cfg: ProbeTrainConfig, what: str) -> list[dict]:
    from probe_dpo.data import check_labels, read_records

    required = (*_columns_for(cfg), cfg.label_column)
    records = read_records(uri, required=required if cfg.span == "response" else (cfg.label_column,),
                           what=what)
    if cfg.span == "all" and not all(("text" in r) or ("prompt" in r and "completion" in r) for r in records):
        raise UserError(f"{uri}: missing column 'text' (or 'prompt' and 'completion') for span 'all'")
    check_labels(records, cfg.label_column, what=f"{what} {uri}")
    for row, r in enumerate(records, start=1):
        value = r[cfg.label_column]
        if value not in (0, 1, True, False, 0.0, 1.0):
            raise UserError(f"{what} {uri}: row {row}: column '{cfg.label_column}' must be 0/1, got {value!r}")
    return records


def _inputs(records: list[dict], cfg: ProbeTrainConfig) -> dict[str, list[str]]:
    if cfg.span == "response":
        return {"prompts": [str(r["prompt"]) for r in records],
                "completions": [str(r.get("completion") or "") for r in records]}
    return {"texts": [str(r["text"]) if "text" in r else str(r["prompt"]) + str(r["completion"])
                      for r in records]}


def _labels(records: list[dict], cfg: ProbeTrainConfig) -> np.ndarray:
    return np.array([int(float(r[cfg.label_column]) > 0.5) for r in records], dtype=np.int64)


def extract_records(model_path: str, model, tokenizer, records: list[dict], layers: list[int], *,
                    pooling: str, span: str, batch_size: int, max_length: int, pool: Any = None,
                    activations: str | None = None, name: str = "data",
                    dtype: str = "float32") -> dict[int, torch.Tensor]:
    """Pooled features of labelled records: in this process, or on a Ray ``ExtractorPool``.

    With a pool the shards go to ``activations/name``, so a restarted run skips the shards it
    already has (without ``activations``, to a temporary folder removed afterwards).
    """
    from probe_dpo.activations import extract, extract_sharded, shards_folder

    cols = _inputs(records, ProbeTrainConfig(span=span))  # type: ignore[arg-type]
    if pool is None:
        return extract(model, tokenizer, layers=layers, pooling=pooling, span=span, batch_size=batch_size,
                       max_length=max_length, **cols)
    from probe_dpo import storage

    with shards_folder(activations) as where:
        return extract_sharded(model_path, storage.join(where, name), layers=layers, pooling=pooling, span=span,
                               batch_size=batch_size, max_length=max_length, pool=pool, dtype=dtype,
                               shard_size=max(64, batch_size * 8), **cols)


def _group_ids(records: list[dict]) -> list[Any]:
    return [r.get("prompt_id", r.get("prompt", i)) for i, r in enumerate(records)]


def _split_groups(groups: list[Any], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (rest, chosen) with ``fraction`` of the distinct groups chosen at random."""
    unique = sorted(set(map(str, groups)))
    rng = random.Random(seed)
    rng.shuffle(unique)
    k = max(1, int(round(fraction * len(unique))))
    chosen = set(unique[:k])
    mask = np.array([str(g) in chosen for g in groups])
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def group_folds(groups: Sequence[Any], k: int, seed: int) -> np.ndarray:
    """A fold id in ``[0, k)`` per row, with every row of a group (prompt) in the same fold and
    the groups dealt round-robin after a seeded shuffle (folds differ in size by at most one group)."""
    unique = sorted(set(map(str, groups)))
    random.Random(seed).shuffle(unique)
    fold_of = {g: i % k for i, g in enumerate(unique)}
    return np.array([fold_of[str(g)] for g in groups], dtype=np.int64)


def cross_fit_scores(feats: dict[int, torch.Tensor], labels: np.ndarray, groups: Sequence[Any],
                     probes: Sequence["LinearProbe"], *, folds: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Each probe's probability on every row from a probe that never saw the row's prompt.

    The rows' prompts are dealt into ``folds`` folds (``group_folds``); for each fold, each
    probe's layer is refitted, with the probe's own C, on the rows of the other folds, and
    scores the fold's rows. Probes that share a layer and C (members of one ensemble that
    differ only by their data) share the refit. Why: a probe scoring the very rows it was
    fitted on ranks them by the labels it memorised, so a probe-ranked pair would be a
    judge-ranked pair by construction.
    """
    fold = group_folds(groups, folds, seed)
    y = np.asarray(labels)
    refits: dict[tuple[int, float], np.ndarray] = {}
    out = {}
    for probe in probes:
        key = (probe.layer, float(probe.card.get("c", 1.0)))
        if key not in refits:
            x = feats[probe.layer]
            scores = np.zeros(len(y))
            for f in range(folds):
                inside, outside = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
                if not len(inside):
                    continue
                if len(set(y[outside].tolist())) < 2:
                    raise UserError(f"cross-fitting: the prompts outside fold {f} have a single class; "
                                    "use fewer folds or more data")
                res = fit_probe(x[torch.as_tensor(outside)], y[outside], x[torch.as_tensor(inside)], y[inside],
                                [key[1]])
                with torch.no_grad():
                    scores[inside] = _np(LinearProbe.from_fit(res, layer=probe.layer).prob(
                        x[torch.as_tensor(inside)]))
            refits[key] = scores
        out[probe.name] = refits[key]
    return out


def _auroc_subset(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    return roc_auc(probs[mask], labels[mask]) if mask.any() else float("nan")


def train_probes(cfg: ProbeTrainConfig, *, testbed: str | None = None, model: str | None = None,
                 train: str | None = None, val: str | None = None, test: str | None = None,
                 out: str | None = None, log: Any = print, keep_features: bool = False) -> ProbeTrainResult:
    """Extract features, fit the per-layer sweep, the training and held-out probes; report; save.

    Data come from a testbed folder (``model/`` and ``data/probe_{train,val,test}.jsonl``) or
    explicit ``model`` / ``train`` / ``val`` / ``test`` paths (``test`` is optional).
    """
    from probe_dpo import storage
    from probe_dpo.data import content_hash
    from probe_dpo.model import arch_hash, hidden_size, load_model, load_tokenizer, model_hash, num_layers, \
        resolve_layers

    t_start = time.perf_counter()
    info: dict[str, Any] = {}
    if testbed is not None:
        model = model or os.path.join(testbed, "model")
        train = train or os.path.join(testbed, "data", "probe_train.jsonl")
        val = val or os.path.join(testbed, "data", "probe_val.jsonl")
        test = test or os.path.join(testbed, "data", "probe_test.jsonl")
        if storage.exists(os.path.join(testbed, "testbed.json")):
            info = storage.read_json(os.path.join(testbed, "testbed.json"))
    if model is None or train is None or val is None:
        raise UserError("give a testbed folder, or a model and train and val data")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = {"train": _read_split(train, cfg, "probe-train data"), "val": _read_split(val, cfg, "probe-val data")}
    if test is not None:
        splits["test"] = _read_split(test, cfg, "probe-test data")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    lm = load_model(model, dtype=cfg.dtype, device=device)
    tok = load_tokenizer(model)
    layers = resolve_layers(lm, cfg.layers) if cfg.layers else list(range(num_layers(lm)))
    m_hash, a_hash, width = model_hash(lm), arch_hash(lm), hidden_size(lm)
    spec = cfg.train_probe
    spec_layer = _in_layers(lm, spec.layer, layers, "train_probe.layer") if spec.layer is not None else None
    spec_layers = [_in_layers(lm, L, layers, "train_probe.layers") for L in spec.layers]
    held_layers = None if cfg.held_out.layers is None else \
        [_in_layers(lm, L, layers, "held_out.layers") for L in cfg.held_out.layers]
    labels = {k: _labels(v, cfg) for k, v in splits.items()}
    feats: dict[str, dict[int, torch.Tensor]] = {}
    pool = None
    if cfg.actors > 0:
        from probe_dpo.activations import ExtractorPool

        pool = ExtractorPool(str(model), actors=cfg.actors, address=cfg.address, dtype=cfg.dtype,
                             threads_per_actor=max(1, (cfg.threads or torch.get_num_threads()) // cfg.actors))
    try:
        for name, records in splits.items():
            t0 = time.perf_counter()
            feats[name] = extract_records(model, lm, tok, records, layers, pooling=cfg.pooling, span=cfg.span,
                                          batch_size=cfg.batch_size, max_length=cfg.max_length, pool=pool,
                                          activations=cfg.activations, name=name, dtype=cfg.dtype)
            log(f"probes: extracted {len(records)} {name} rows x {len(layers)} layers in "
                f"{time.perf_counter() - t0:.1f}s")
    finally:
        if pool is not None:
            pool.close()
    del lm
    data_hashes = {k: content_hash(v, [*_columns_for(cfg), "text", cfg.label_column]) for k, v in splits.items()}
    base_card = {"pooling": cfg.pooling, "span": cfg.span, "label_column": cfg.label_column,
                 "standardization": "z-score with the probe's own training rows' mean and std",
                 "model_hash": m_hash, "arch_hash": a_hash, "model": str(model), "hidden_size": width,
                 "max_length": cfg.max_length, "c_grid": list(cfg.c_grid), "fpr": cfg.fpr,
                 "data_hash": data_hashes["train"], "val_data_hash": data_hashes["val"]}
    fit_device = device

    train_rows = np.arange(len(splits["train"]))
    reserve_rows = np.array([], dtype=np.int64)
    if cfg.held_out.data_fraction > 0:
        train_rows, reserve_rows = _split_groups(_group_ids(splits["train"]), cfg.held_out.data_fraction, cfg.seed)

    def fit(layer: int, rows: np.ndarray | None = None, xs: tuple | None = None) -> FitResult:
        if xs is None:
            x_tr, y_tr = feats["train"][layer], labels["train"]
            if rows is not None:
                x_tr, y_tr = x_tr[torch.as_tensor(rows)], y_tr[rows]
            xs = (x_tr, y_tr, feats["val"][layer], labels["val"])
        if len(set(xs[1].tolist())) < 2:
            raise UserError(f"a probe's training subset at layer {layer} has a single class: use more data "
                            f"or a smaller held_out.data_fraction")
        return fit_probe(xs[0], xs[1], xs[2], xs[3], cfg.c_grid, device=fit_device)

    # 1. the per-layer sweep (on the rows training probes may use)
    sweep = {layer: fit(layer, train_rows if len(reserve_rows) else None) for layer in layers}
    ranked = sorted(layers, key=lambda L: (-_nan_low(sweep[L].val_auroc), L))
    log("probes: per-layer sweep done (best layer by val AUROC: " + ", ".join(
        f"L{L}={sweep[L].val_auroc:.3f}" for L in ranked[:3]) + ")")

    # 2. training probes
    made: list[tuple[LinearProbe, FitResult, dict]] = []
    best_layer = spec_layer if spec_layer is not None else ranked[0]
    if spec.kind == "single":
        made.append((_probe(sweep[best_layer], best_layer, f"train-L{best_layer}", "train", base_card),
                     sweep[best_layer], {"subset": "all" if not len(reserve_rows) else "train-share"}))
        train_layers = [best_layer]
    elif spec.kind == "layers":
        # explicit layers; else the n best, with the fixed layer (when one is set) always among them
        first = [spec_layer] if spec_layer is not None else []
        train_layers = spec_layers or first + [L for L in ranked if L not in first][:spec.n - len(first)]
        for L in train_layers:
            made.append((_probe(sweep[L], L, f"train-L{L}", "train", base_card), sweep[L], {"subset": "all"}))
    elif spec.kind == "seeds":
        train_layers = [best_layer]
        pool_x = torch.cat([feats["train"][best_layer][torch.as_tensor(train_rows)], feats["val"][best_layer]])
        pool_y = np.concatenate([labels["train"][train_rows], labels["val"]])
        groups = [_group_ids(splits["train"])[i] for i in train_rows] + _group_ids(splits["val"])
        frac = len(splits["val"]) / (len(train_rows) + len(splits["val"]))
        for s in range(spec.n):
            tr, va = _split_groups(groups, frac, cfg.seed + 1000 + s)
            res = fit(best_layer, xs=(pool_x[torch.as_tensor(tr)], pool_y[tr], pool_x[torch.as_tensor(va)], pool_y[va]))
            made.append((_probe(res, best_layer, f"train-L{best_layer}-seed{s}", "train", base_card), res,
                         {"subset": f"train+val re-split by prompt, seed {cfg.seed + 1000 + s}"}))
    elif spec.kind == "subsets":
        train_layers = [best_layer]
        folds = group_folds([_group_ids(splits["train"])[i] for i in train_rows], spec.n, cfg.seed + 3000)
        for s in range(spec.n):
            res = fit(best_layer, train_rows[folds == s])
            made.append((_probe(res, best_layer, f"train-L{best_layer}-part{s}", "train", base_card), res,
                         {"subset": f"disjoint share {s + 1} of {spec.n} of the training prompts "
                                    f"(seed {cfg.seed + 3000})"}))
    else:  # bootstrap
        train_layers = [best_layer]
        rng = np.random.default_rng(cfg.seed + 2000)
        for s in range(spec.n):
            rows = rng.choice(train_rows, size=len(train_rows), replace=True)
            res = fit(best_layer, rows)
            made.append((_probe(res, best_layer, f"train-L{best_layer}-boot{s}", "train", base_card), res,
                         {"subset": f"bootstrap resample {s} of the training rows (seed {cfg.seed + 2000})"}))

    # 3. held-out probes
    held = held_layers if held_layers is not None else [L for L in layers if L not in train_layers]
    for L in held:
        if L in train_layers and not len(reserve_rows):
            continue  # the same layer on the same data is not held out
        made.append((_probe(sweep[L], L, f"heldout-L{L}", "held_out", base_card), sweep[L], {"subset": "all"}))
    if len(reserve_rows):
        for L in train_layers:
            res = fit(L, reserve_rows)
            made.append((_probe(res, L, f"heldout-data-L{L}", "held_out", base_card), res,
                         {"subset": f"reserved {cfg.held_out.data_fraction:.0%} of training prompts"}))

    # 4. metrics
    genre = {k: np.array([r.get("genre") == "toxic-prompt" for r in v]) for k, v in splits.items()}
    has_genre = all("genre" in r for v in splits.values() for r in v)
    rows_out = []
    for probe, res, extra in made:
        metrics = _probe_metrics(probe, res, feats, labels, genre if has_genre else None, cfg.fpr)
        probe.card.update({"l2": res.l2, "c": res.c, "c_path": res.path, "n_train": res.n_train, "train_positives": res.positives, **extra,
                           "threshold": metrics.pop("threshold"), "metrics": metrics, "fit_seconds": res.seconds})
        rows_out.append(_row(probe, res, metrics))
    probeset = ProbeSet([p for p, _, _ in made], aggregation=spec.aggregation,
                        meta={"model_hash": m_hash, "arch_hash": a_hash, "model": str(model), "hidden_size": width,
                              "num_layers_extracted": layers, "data_hashes": data_hashes,
                              "config": dataclasses.asdict(cfg)})
    # the train role's own threshold (its aggregated score at the same validation FPR as every
    # probe's): what a monitor built from the whole ensemble would flag at
    probeset.meta["train_threshold"] = threshold_at_fpr(_np(probeset.score(feats["val"], "train")), labels["val"],
                                                        cfg.fpr)
    ensemble = None
    if len(probeset.train_probes) > 1:
        ensemble = {}
        for split in splits:
            p = _np(probeset.score(feats[split], "train"))
            ensemble[split] = roc_auc(p, labels[split])
            if has_genre and split == "test":
                ensemble["test_toxic_prompts"] = _auroc_subset(p, labels[split], genre[split])

    # 5. baselines and report
    baselines = _baselines(splits, labels, genre if has_genre else None, info)
    report = {"model": str(model), "model_hash": m_hash, "testbed": testbed, "layers": layers,
              "pooling": cfg.pooling, "span": cfg.span, "fpr": cfg.fpr, "c_grid": list(cfg.c_grid),
              "sizes": {k: {"rows": len(v), "positives": int(labels[k].sum()),
                            "toxic_prompt_rows": int(genre[k].sum()) if has_genre else None}
                        for k, v in splits.items()},
              "train_probe": dataclasses.asdict(spec), "aggregation": spec.aggregation,
              "best_layer": ranked[0], "probes": rows_out, "train_ensemble": ensemble, "baselines": baselines,
              "sweep": {str(L): {"val_auroc": sweep[L].val_auroc, "c": sweep[L].c} for L in layers},
              "seconds": round(time.perf_counter() - t_start, 2)}
    markdown = report_markdown(report)
    if out is not None:
        probeset.save(out, extra_files={"report.json": json_text(report),
                                        "report.md": markdown})
    return ProbeTrainResult(probeset, report, markdown, feats if keep_features else None)


def _in_layers(model, layer: int, layers: list[int], key: str) -> int:
    from probe_dpo.model import resolve_layer

    resolved = resolve_layer(model, layer)
    if resolved not in layers:
        raise UserError(f"config key {key}: layer {layer} is not among the extracted layers {layers} "
                        f"(config key layers)")
    return resolved


def _nan_low(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def _probe(res: FitResult, layer: int, name: str, role: str, base_card: dict) -> LinearProbe:
    return LinearProbe.from_fit(res, layer=layer, pooling=base_card["pooling"], span=base_card["span"],
                                name=name, role=role, card={k: v for k, v in base_card.items()
                                                            if k not in ("pooling", "span", "hidden_size")})


def _probe_metrics(probe: LinearProbe, res: FitResult, feats, labels, genre, fpr: float) -> dict:
    probs = {k: _np(probe.prob(feats[k][probe.layer])) for k in feats}
    threshold = threshold_at_fpr(probs["val"], labels["val"], fpr)
    out: dict[str, Any] = {"threshold": threshold}
    for split, p in probs.items():
        out[split] = binary_metrics(p, labels[split], threshold)
    if genre is not None and "test" in probs:
        mask = genre["test"]
        out["test_toxic_prompts"] = binary_metrics(probs["test"][mask], labels["test"][mask], threshold)
    return out


def _row(probe: LinearProbe, res: FitResult, metrics: dict) -> dict:
    def get(split, key):
        return metrics.get(split, {}).get(key)

    return {"name": probe.name, "role": probe.role, "layer": probe.layer, "c": res.c,
            "train_auroc": get("train", "auroc"), "val_auroc": get("val", "auroc"), "test_auroc": get("test", "auroc"),
            "test_toxic_prompts_auroc": get("test_toxic_prompts", "auroc"),
            "test_accuracy": get("test", "accuracy"), "test_tpr_at_fpr": get("test", "tpr"),
            "test_fpr": get("test", "fpr")}


def _baselines(splits, labels, genre, info: dict) -> dict:
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        if split not in splits:
            continue
        records = splits[split]
        entry: dict[str, Any] = {}
        if genre is not None:
            entry["genre_indicator_auroc"] = roc_auc(genre[split].astype(float), labels[split])
            mask = genre[split]
            entry["toxic_prompt_share"] = float(mask.mean())
            entry["positive_rate_toxic_prompts"] = float(labels[split][mask].mean()) if mask.any() else None
            entry["positive_rate_benign_prompts"] = float(labels[split][~mask].mean()) if (~mask).any() else None
        columns = sorted({k for r in records for k in r if k.startswith("score_")})
        train_judge = info.get("train_judge")
        judges = {}
        for col in columns:
            if not all(isinstance(r.get(col), (int, float)) for r in records):
                continue
            scores = np.array([float(r[col]) for r in records])
            same = train_judge is not None and col == "score_" + str(train_judge).replace("-", "_")
            judges[col] = {"auroc": roc_auc(scores, labels[split]), "training_judge": same}
            if genre is not None:
                judges[col]["auroc_toxic_prompts"] = _auroc_subset(scores, labels[split], genre[split])
        entry["judge_agreement"] = judges
        out[split] = entry
    return out


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.0e}"
    return str(x)


def report_markdown(report: dict) -> str:
    """The report as a markdown table (what the CLI prints)."""
    lines = [f"# Probes on {report['model']} ({report['pooling']} pooling over {report['span']} tokens)", ""]
    sizes = ", ".join(f"{k}: {v['rows']} rows / {v['positives']} positive" for k, v in report["sizes"].items())
    lines += [f"Data: {sizes}. Threshold at {report['fpr']:.0%} FPR on validation negatives.", ""]
    lines += ["| probe | role | layer | C | val AUROC | test AUROC | test AUROC (toxic prompts) | test TPR @ thr |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["probes"], key=lambda r: (r["role"] != "train", r["layer"], r["name"])):
        lines.append(f"| {r['name']} | {r['role']} | {r['layer']} | {_fmt(r['c'])} | {_fmt(r['val_auroc'])} | "
                     f"{_fmt(r['test_auroc'])} | {_fmt(r['test_toxic_prompts_auroc'])} | {_fmt(r['test_tpr_at_fpr'])} |")
    if report.get("train_ensemble"):
        e = report["train_ensemble"]
        lines.append(f"| train ensemble ({report['aggregation']}) | train | - | - | {_fmt(e.get('val'))} | "
                     f"{_fmt(e.get('test'))} | {_fmt(e.get('test_toxic_prompts'))} | - |")
    split = "test" if "test" in report["baselines"] else "val"
    base = report["baselines"].get(split, {})
    lines += ["", f"Baselines on {split}:", ""]
    if "genre_indicator_auroc" in base:
        lines.append(f"- prompt-genre indicator (toxic-prompt vs benign-prompt) AUROC: {_fmt(base['genre_indicator_auroc'])}")
    for col, j in base.get("judge_agreement", {}).items():
        tag = " (the training judge)" if j.get("training_judge") else ""
        lines.append(f"- {col}{tag} AUROC against the labels: {_fmt(j['auroc'])} "
                     f"(toxic prompts only: {_fmt(j.get('auroc_toxic_prompts'))})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Evaluating a saved set on any model and labelled file


def evaluate_probes(probeset: ProbeSet, model: str, data: str, *, label_column: str = "label",
                    batch_size: int = 32, max_length: int = 256, device: str = "auto",
                    dtype: str = "float32", same_weights: bool = False) -> dict:
    """AUROC (and TPR at each probe's saved threshold) of every probe on ``model`` and ``data``."""
    from probe_dpo.model import load_model, load_tokenizer

    spans = {p.span for p in probeset.probes}
    poolings = {p.pooling for p in probeset.probes}
    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    lm = load_model(model, dtype=dtype, device=dev)
    probeset.check_compatible(lm, same_weights=same_weights)
    tok = load_tokenizer(model)
    results: dict[str, Any] = {"model": str(model), "data": str(data), "probes": {}}
    labels_done = None
    for span in sorted(spans):
        for pooling in sorted(poolings):
            group = [p for p in probeset.probes if p.span == span and p.pooling == pooling]
            if not group:
                continue
            cfg = ProbeTrainConfig(span=span, label_column=label_column)  # type: ignore[arg-type]
            records = _read_split(data, cfg, "labelled data")
            labels = _labels(records, cfg)
            labels_done = labels
            feats = extract_records(model, lm, tok, records, sorted({p.layer for p in group}), pooling=pooling,
                                    span=span, batch_size=batch_size, max_length=max_length)
            genre = np.array([r.get("genre") == "toxic-prompt" for r in records])
            has_genre = all("genre" in r for r in records)
            for probe in group:
                p = _np(probe.prob(feats[probe.layer]))
                m = binary_metrics(p, labels, probe.card.get("threshold"))
                if has_genre:
                    m["auroc_toxic_prompts"] = _auroc_subset(p, labels, genre)
                results["probes"][probe.name] = {"role": probe.role, "layer": probe.layer, **m}
            for role in ROLES:
                members = [p for p in group if p.role == role]
                if len(members) > 1 and len(group) == len(probeset.probes):
                    agg = _np(probeset.score(feats, role))
                    results[f"{role}_aggregate_auroc"] = roc_auc(agg, labels)
    if labels_done is not None:
        results["rows"] = int(len(labels_done))
        results["positives"] = int(labels_done.sum())
    return results


def eval_markdown(results: dict) -> str:
    lines = [f"Probe AUROC on {results['data']} ({results.get('rows')} rows, {results.get('positives')} positive) "
             f"with model {results['model']}", "",
             "| probe | role | layer | AUROC | AUROC (toxic prompts) | accuracy | TPR @ thr | FPR @ thr |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results["probes"].items(), key=lambda kv: (kv[1]["role"] != "train", kv[1]["layer"], kv[0])):
        lines.append(f"| {name} | {r['role']} | {r['layer']} | {_fmt(r['auroc'])} | {_fmt(r.get('auroc_toxic_prompts'))} "
                     f"| {_fmt(r['accuracy'])} | {_fmt(r.get('tpr'))} | {_fmt(r.get('fpr'))} |")
    for role in ROLES:
        if f"{role}_aggregate_auroc" in results:
            lines.append(f"| {role} aggregate | {role} | - | {_fmt(results[f'{role}_aggregate_auroc'])} | - | - | - | - |")
    return "\n".join(lines) + "\n"
