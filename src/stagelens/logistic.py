"""Batched multinomial logistic regression in torch: many standardised L2 problems, one L-BFGS.

Every problem is a subset of the rows of one feature matrix (a cross-validation fold's training
rows, or all rows) with its own labels, standardised on its own rows as scikit-learn's
StandardScaler does, and minimises scikit-learn's LogisticRegression objective, scaled as there:

    f(W, b) = mean_i CE(softmax(W x_i + b), y_i) + ||W||^2 / (2 C n)      (b unpenalised)

so `tol` means what it means for scikit-learn's lbfgs: stop when the largest gradient entry of
f is at most tol. Two classes follow scikit-learn's binary model (one logistic row, the other
fixed at zero), not a two-row softmax, whose penalty would halve the effective C.
All problems advance together: one batched matmul per evaluation, each problem with its own
L-BFGS memory and line search, in the principal basis of the features with a diagonal
preconditioner (see `principal_basis`), and the C path is walked upwards with warm starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

HISTORY = 10  # L-BFGS memory (scipy's default, which scikit-learn uses)
ARMIJO = 1e-4
MAX_BACKTRACKS = 30
# float32 logits resolve f only to ~1e-7 relative when logits are large: the line search then
# trusts the gradient, and tolerates f rising by this much (rounding) on a step that does.
F_NOISE = 1e-7
# A problem whose largest gradient entry has not improved for this many iterations has reached
# what float32 resolves; it stops, flagged as not converged.
PATIENCE = 50


@dataclass(frozen=True)
class Problem:
    """One fit: the rows of the shared feature matrix it trains on and their labels (0..K-1)."""

    rows: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PathFit:
    """Solutions of every problem at one C (arrays indexed by problem)."""

    C: float
    weight: np.ndarray  # (S, K, D) float32, on standardised features
    bias: np.ndarray  # (S, K) float32
    objective: np.ndarray  # (S,) float64, f at the solution
    grad_max: np.ndarray  # (S,) float64, largest |gradient entry| at the solution
    n_iter: np.ndarray  # (S,) int64
    converged: np.ndarray  # (S,) bool: grad_max <= tol


@dataclass(frozen=True)
class Standardisation:
    mean: np.ndarray  # (S, D) float32
    scale: np.ndarray  # (S, D) float32


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale of the columns of x, in float64, as scikit-learn's StandardScaler computes them.

    A column whose variance is within the two-pass algorithm's rounding error of zero (scikit-learn's
    `_is_constant_feature`) gets scale 1, so it standardises to zeros instead of amplified noise.
    """
    x64 = x.to(torch.float64)
    n = x64.shape[0]
    mean = x64.mean(0)
    var = (x64 - mean).square().mean(0)
    eps = torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps).square()
    scale = torch.where(constant, torch.ones_like(var), var.sqrt())
    return mean, scale


def principal_basis(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Eigenvectors (D, D, float32, orthogonal) of the covariance of the standardised rows of x.

    The problems are solved in this basis: a rotation changes neither the logits nor ||W||, and
    there the curvature of the loss is close to diagonal (the covariance's eigenvalues), so a
    diagonal preconditioner removes most of the ill-conditioning of hidden states (a few huge
    directions over a long tail) that makes plain L-BFGS take hundreds of iterations.
    """
    xs = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    mean, scale = standardisation(xs)
    z = ((xs.to(torch.float64) - mean) / scale).to(torch.float32)
    gram = (z.T @ z).to(torch.float64) / len(z)
    _, vectors = torch.linalg.eigh(gram)  # float64: orthogonal to rounding, so ||U|| = ||W||
    return vectors.to(torch.float32)


class _Batch:
    """The problems' standardised features in the principal basis (with a ones column for the
    bias), padded to one tensor, and each problem's variance along every basis direction."""

    def __init__(self, x: np.ndarray, problems: Sequence[Problem], n_classes: int, basis: torch.Tensor):
        device = basis.device
        n_max = max(len(p.rows) for p in problems)
        S, D = len(problems), x.shape[1]
        self.n_classes, self.dim = n_classes, D
        self.X = torch.zeros(S, n_max, D + 1, dtype=torch.float32, device=device)
        self.Y = torch.zeros(S, n_max, dtype=torch.int64, device=device)
        self.w = torch.zeros(S, n_max, dtype=torch.float32, device=device)  # 1/n on real rows, 0 on padding
        self.n = torch.tensor([len(p.rows) for p in problems], dtype=torch.float64, device=device)
        self.variance = torch.ones(S, 1, D + 1, dtype=torch.float64, device=device)  # the ones column: 1
        means, scales = [], []
        for s, p in enumerate(problems):
            xs = torch.from_numpy(np.ascontiguousarray(x[p.rows])).to(device)
            mean, scale = standardisation(xs)
            means.append(mean)
            scales.append(scale)
            k = len(p.rows)
            rotated = ((xs.to(torch.float64) - mean) / scale).to(torch.float32) @ basis
            self.X[s, :k, :D] = rotated
            self.X[s, :k, D] = 1.0
            self.variance[s, 0, :D] = rotated.to(torch.float64).square().mean(0)
            self.Y[s, :k] = torch.from_numpy(p.labels.astype(np.int64)).to(device)
            self.w[s, :k] = 1.0 / k
        self.mean = torch.stack(means).to(torch.float32)
        self.scale = torch.stack(scales).to(torch.float32)
        # Penalised entries: every weight, no bias; with two classes row 0 is fixed at zero.
        self.free = torch.ones(n_classes, D + 1, dtype=torch.float32, device=device)
        if n_classes == 2:
            self.free[0] = 0.0
        self.penalised = self.free.clone()
        self.penalised[:, D] = 0.0

    def preconditioner(self, lam: torch.Tensor) -> torch.Tensor:
        """(S, 1, D+1) diagonal inverse-curvature estimate: 1 / (c variance + lam), c = 1/K (softmax)."""
        c = 1.0 / self.n_classes
        pen = self.penalised[0].to(torch.float64).view(1, 1, -1) * lam.view(-1, 1, 1)
        return (1.0 / (c * self.variance + pen)).to(torch.float32)

    def loss_grad(self, W: torch.Tensor, idx: torch.Tensor | None, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f (float64) and its gradient (float32) for the problems `idx` (None: all) at W (len(idx), K, D+1)."""
        X, Y, w = (self.X, self.Y, self.w) if idx is None else (self.X[idx], self.Y[idx], self.w[idx])
        Z = torch.bmm(X, W.transpose(1, 2))  # (A, n, K)
        lse = torch.logsumexp(Z, dim=2)
        zy = Z.gather(2, Y.unsqueeze(2)).squeeze(2)
        data = ((lse - zy).to(torch.float64) * w.to(torch.float64)).sum(1)
        pen = (W.square() * self.penalised).sum((1, 2), dtype=torch.float64)
        G = torch.softmax(Z, dim=2)
        G.scatter_add_(2, Y.unsqueeze(2), -torch.ones_like(zy).unsqueeze(2))
        G.mul_(w.unsqueeze(2))
        grad = torch.bmm(G.transpose(1, 2), X)
        grad.add_(W * self.penalised * lam.to(torch.float32).view(-1, 1, 1))
        grad.mul_(self.free)
        return data + 0.5 * lam * pen, grad


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner product: float32 products, float64 accumulation (~1e-9 relative to an
    all-float64 product, measured). Float64 copies of both operands cost as much as the solver's
    matmuls at the paper's size."""
    return (a * b).sum((1, 2), dtype=torch.float64)


class _Subset:
    """Caches the gathered tensors of the active problems: re-gathered only when the active set shrinks."""

    def __init__(self, batch: _Batch):
        self.batch, self.key, self.view = batch, None, None

    def loss_grad(self, W: torch.Tensor, idx: torch.Tensor, lam: torch.Tensor):
        if len(idx) == self.batch.X.shape[0]:
            return self.batch.loss_grad(W, None, lam)
        key = tuple(idx.tolist())
        if key != self.key:
            b = self.batch
            self.view = _Batch.__new__(_Batch)
            self.view.__dict__.update(b.__dict__)
            self.view.X, self.view.Y, self.view.w = b.X[idx], b.Y[idx], b.w[idx]
            self.key = key
        return self.view.loss_grad(W, None, lam)


def _lbfgs(sub: _Subset, W: torch.Tensor, lam: torch.Tensor, tol: float, max_iter: int, basis: torch.Tensor):
    """Minimise every problem from W (in the principal basis); returns (W, f, max|g|, iterations).

    max|g| is scikit-learn's criterion, on the gradient in the original basis: it is computed
    (one rotation) for the problems whose rotated gradient already meets tol.
    """
    S, dev = W.shape[0], W.device
    f, g = sub.loss_grad(W, torch.arange(S, device=dev), lam)
    P = sub.batch.preconditioner(lam)
    done = torch.zeros(S, dtype=torch.bool, device=dev)

    def criterion(grad: torch.Tensor, where) -> torch.Tensor:
        rotated_max = grad.abs().amax((1, 2)).to(torch.float64)
        near = rotated_max <= tol
        if bool(near.any()):
            weights = grad[near][:, :, :-1] @ basis.T
            true = torch.maximum(weights.abs().amax((1, 2)), grad[near][:, :, -1].abs().amax(1))
            rotated_max[near] = true.to(torch.float64)
        done[where] = rotated_max <= tol
        return rotated_max

    gmax = criterion(g, slice(None))
    n_iter = torch.zeros(S, dtype=torch.int64, device=dev)
    s_hist = torch.zeros((HISTORY, *W.shape), dtype=W.dtype, device=dev)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(HISTORY, S, dtype=torch.float64, device=dev)  # 0: slot unused for that problem
    gamma = torch.ones(S, dtype=torch.float64, device=dev)
    stalled = torch.zeros(S, dtype=torch.bool, device=dev)
    best = gmax.clone()
    since_best = torch.zeros(S, dtype=torch.int64, device=dev)
    for it in range(max_iter):
        active = ~done & ~stalled
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        sel = slice(None) if len(idx) == S else idx  # all active: views, no gathers
        g_a, W_a, f_a = g[sel], W[sel], f[sel]
        # Two-loop recursion over the filled slots, newest first; rho 0 (skipped pair) does nothing.
        slots = [(it - 1 - j) % HISTORY for j in range(min(it, HISTORY))]
        q = g_a.clone()
        alphas = []
        for slot in slots:
            a = rho[slot, sel] * _dot(s_hist[slot, sel], q)
            q.sub_(y_hist[slot, sel] * a.to(q.dtype).view(-1, 1, 1))
            alphas.append(a)
        q.mul_(P[sel] * gamma[sel].to(q.dtype).view(-1, 1, 1))
        for slot, a in zip(reversed(slots), reversed(alphas)):
            b = rho[slot, sel] * _dot(y_hist[slot, sel], q)
            q.add_(s_hist[slot, sel] * (a - b).to(q.dtype).view(-1, 1, 1))
        d = q.neg_()
        slope = _dot(g_a, d)
        # A direction that is not a descent direction (rounding after many updates) falls back to -g.
        bad = slope >= 0
        if bool(bad.any()):
            d[bad] = -g_a[bad]
            slope = torch.where(bad, -_dot(g_a, g_a), slope)
        # The preconditioned step 1 is a rough Newton step; the line search corrects it.
        step = torch.ones_like(slope)
        accepted = torch.zeros(len(idx), dtype=torch.bool, device=dev)
        W_new, f_new, g_new = W_a.clone(), f_a.clone(), g_a.clone()
        for _ in range(MAX_BACKTRACKS):
            trial = W_a + d * step.to(W.dtype).view(-1, 1, 1)
            f_t, g_t = sub.loss_grad(trial, idx, lam[sel])
            # Armijo on f, or, where float32 logits blur f near the optimum, the accurate
            # gradient: a step that has not passed the line minimum of a convex f does not raise it.
            ok = ~accepted & ((f_t <= f_a + ARMIJO * step * slope)
                              | ((_dot(g_t, d) <= 0) & (f_t <= f_a + F_NOISE * f_a.abs())))
            W_new[ok], f_new[ok], g_new[ok] = trial[ok], f_t[ok], g_t[ok]
            accepted |= ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step * 0.5)
        # Curvature pair; a convex objective gives s.y > 0 unless rounding ate the step.
        s_vec, y_vec = W_new - W_a, g_new - g_a
        sy, yy = _dot(s_vec, y_vec), _dot(y_vec, y_vec * P[sel])
        good = accepted & (sy > 1e-12 * _dot(s_vec, s_vec).sqrt() * yy.sqrt())
        slot = it % HISTORY
        rho[slot] = 0.0  # problems not advanced this iteration must not see a stale pair here
        s_hist[slot, sel], y_hist[slot, sel] = s_vec, y_vec
        rho[slot, sel] = torch.where(good, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        gamma[sel] = torch.where(good, sy / yy.clamp_min(1e-300), gamma[sel])
        W[sel], f[sel], g[sel] = W_new, f_new, g_new
        n_iter[sel] += 1
        gmax[sel] = criterion(g_new, sel)
        improved = gmax[sel] < best[sel] * (1 - 1e-3)
        best[sel] = torch.minimum(best[sel], gmax[sel])
        since_best[sel] = torch.where(improved, torch.zeros_like(since_best[sel]), since_best[sel] + 1)
        stalled[sel] = ~accepted | (since_best[sel] >= PATIENCE)
    return W, f, gmax, n_iter


def fit_path(
    x: np.ndarray,
    problems: Sequence[Problem],
    n_classes: int,
    Cs: Sequence[float],
    tol: float,
    max_iter: int,
    device: torch.device,
    basis: torch.Tensor | None = None,
) -> tuple[Standardisation, list[PathFit]]:
    """Solve every problem at every C in increasing order, each C warm-started from the previous.

    Returns the problems' standardisations and one PathFit per C (in increasing order of C).
    `basis` (from `principal_basis`) may be passed to reuse it across calls on the same x.
    """
    if any(c <= 0 for c in Cs):
        raise ValueError(f"every C must be positive, got {list(Cs)}")
    basis = principal_basis(x, device) if basis is None else basis
    batch = _Batch(x, problems, n_classes, basis)
    sub = _Subset(batch)
    W = torch.zeros(len(problems), n_classes, x.shape[1] + 1, dtype=torch.float32, device=device)
    fits = []
    for C in sorted(set(float(c) for c in Cs)):
        lam = 1.0 / (C * batch.n)
        W, f, gmax, n_iter = _lbfgs(sub, W, lam, tol, max_iter, basis)
        fits.append(PathFit(
            C=C,
            weight=(W[:, :, :-1] @ basis.T).cpu().numpy(),
            bias=W[:, :, -1].cpu().numpy().copy(),
            objective=f.cpu().numpy(),
            grad_max=gmax.cpu().numpy(),
            n_iter=n_iter.cpu().numpy(),
            converged=(gmax <= tol).cpu().numpy(),  # gmax <= tol only where checked in the original basis
        ))
        W = W.clone()
    return Standardisation(batch.mean.cpu().numpy(), batch.scale.cpu().numpy()), fits
