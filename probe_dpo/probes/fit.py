"""Fitting a linear probe: logistic regression on z-scored activations, exact and fast.

Fitting minimises ``mean log-loss + l2/2 * |w|^2`` (the bias is not penalised), which is
scikit-learn's ``LogisticRegression(C)`` objective with ``l2 = 1 / (C * n)``. It runs in torch
(CPU or GPU) with Newton's method (steps by conjugate gradients preconditioned with a Hessian
formed only when it goes stale, backtracking line search), warm-started along the C grid from
strong to weak regularisation; for very wide models (hidden size > ``NEWTON_MAX_DIM``)
full-batch L-BFGS is used instead. ``C`` is chosen on the validation split by AUROC (ties go
to the stronger regularisation). Measured 9.3x faster than scikit-learn's lbfgs at the same
optimum (benchmarks/probe_fit.py), which is why this solver is kept rather than sklearn's.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from probe_dpo.errors import UserError
from probe_dpo.stats import as_numpy as _np
from probe_dpo.stats import roc_auc

NEWTON_MAX_DIM = 2048
_REFORM_AFTER = 10  # CG iterations after which the preconditioning Hessian is re-formed
_CG_MAX_ITER = 50
DEFAULT_C_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]

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

