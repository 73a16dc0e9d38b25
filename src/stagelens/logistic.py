"""Batched multinomial logistic regression in torch: many standardised L2 problems, one L-BFGS.

Every problem is a subset of the rows of one feature matrix (a cross-validation fold's training
rows, or all rows) with its own labels, standardised on its own rows as scikit-learn's
StandardScaler does, and minimises scikit-learn's LogisticRegression objective, scaled as there:

    f(W, b) = mean_i CE(softmax(W x_i + b), y_i) + ||W||^2 / (2 C n)      (b unpenalised)

so `tol` means what it means for scikit-learn's lbfgs: stop when the largest gradient entry of
f is at most tol. Two classes follow scikit-learn's binary model (one logistic row, the other
fixed at zero), not a two-row softmax, whose penalty would halve the effective C.
All problems advance together: one batched matmul per evaluation, each problem with its own
L-BFGS memory (in compact form, `_History`) and line search, in the principal basis of the features with a diagonal
preconditioner (see `principal_basis`), and the C path is walked upwards with warm starts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

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


@contextmanager
def cpu_matmul_precision(device: torch.device) -> Iterator[None]:
    """On the CPU, let oneDNN compute float32 matmuls in its bfloat16 mode for the block.

    On a CPU with bfloat16 dot products (AVX512-BF16, AMX) this made the solver's matmuls 2.1-2.5x
    faster at 2e-6 relative error (against 6e-7 for plain float32; measured on an AMD EPYC at the
    paper's size), far below what the stopping rule (max |gradient| <= tol) resolves; elsewhere it
    changes nothing. Not on CUDA, where the same setting means TF32 (1e-3 relative error).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


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
    """The problems' standardised features in the principal basis (with a ones row for the
    bias), transposed and padded to one (S, D+1, n) tensor, and each problem's variance along
    every basis direction. Transposed, the logits come out as (S, K, n): at K of 10 their matmul
    and softmax are 2x and 10x faster than as (S, n, K) on the CPU, and at the paper's size ~10%."""

    def __init__(self, x: np.ndarray, problems: Sequence[Problem], n_classes: int, basis: torch.Tensor):
        device = basis.device
        n_max = max(len(p.rows) for p in problems)
        S, D = len(problems), x.shape[1]
        self.n_classes, self.dim = n_classes, D
        self.Xt = torch.zeros(S, D + 1, n_max, dtype=torch.float32, device=device)
        self.Y = torch.zeros(S, n_max, dtype=torch.int64, device=device)
        self.w = torch.zeros(S, n_max, dtype=torch.float32, device=device)  # 1/n on real rows, 0 on padding
        self.n = torch.tensor([len(p.rows) for p in problems], dtype=torch.float64, device=device)
        self.variance = torch.ones(S, 1, D + 1, dtype=torch.float64, device=device)  # the ones column: 1
        means, scales = [], []
        first_with_rows: dict[bytes, int] = {}  # a refit and its control share rows: rotate them once
        for s, p in enumerate(problems):
            k = len(p.rows)
            same = first_with_rows.setdefault(np.asarray(p.rows).tobytes(), s)
            if same != s:
                means.append(means[same])
                scales.append(scales[same])
                self.Xt[s] = self.Xt[same]
                self.variance[s] = self.variance[same]
            else:
                xs = torch.from_numpy(np.ascontiguousarray(x[p.rows])).to(device)
                mean, scale = standardisation(xs)
                means.append(mean)
                scales.append(scale)
                rotated = ((xs.to(torch.float64) - mean) / scale).to(torch.float32) @ basis
                self.Xt[s, :D, :k] = rotated.T
                self.Xt[s, D, :k] = 1.0
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
        Xt, Y, w = (self.Xt, self.Y, self.w) if idx is None else (self.Xt[idx], self.Y[idx], self.w[idx])
        Z = torch.bmm(W, Xt)  # (A, K, n)
        lse = torch.logsumexp(Z, dim=1)
        zy = Z.gather(1, Y.unsqueeze(1)).squeeze(1)
        data = ((lse - zy).to(torch.float64) * w.to(torch.float64)).sum(1)
        pen = (W.square() * self.penalised).sum((1, 2), dtype=torch.float64)
        G = torch.softmax(Z, dim=1)
        G.scatter_add_(1, Y.unsqueeze(1), -torch.ones_like(zy).unsqueeze(1))
        G.mul_(w.unsqueeze(1))
        grad = torch.bmm(G, Xt.transpose(1, 2))
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
        if len(idx) == self.batch.Xt.shape[0]:
            return self.batch.loss_grad(W, None, lam)
        key = tuple(idx.tolist())
        if key != self.key:
            b = self.batch
            self.view = _Batch.__new__(_Batch)
            self.view.__dict__.update(b.__dict__)
            self.view.Xt, self.view.Y, self.view.w = b.Xt[idx], b.Y[idx], b.w[idx]
            self.key = key
        return self.view.loss_grad(W, None, lam)


def _matvec(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(A, m) products of each problem's (m, N) matrix with its vector: one gemv per problem, which
    is 5-8x faster on the CPU than a batched matmul of that shape and needs no broadcast temporary."""
    return torch.stack([torch.mv(M[i], v[i].reshape(-1)) for i in range(M.shape[0])])


class _History:
    """The last HISTORY curvature pairs (s, y) of every live problem, in the compact form of Byrd,
    Nocedal and Schnabel (1994): with the pairs' inner products s_i.y_j and y_i.P y_j kept up to
    date, one inverse-Hessian product is a dozen batched operations instead of the two-loop
    recursion's ~8 x HISTORY small ones, which dominated the time of small probe jobs.

    A slot holds zeros where a problem skipped its pair (rounding ate the step) or has not filled
    it yet; the unit diagonal such a slot gets in R makes it drop out of the product exactly.
    Slots are a ring: `stamp` (the iteration that wrote each slot) orders them in time.
    """

    def __init__(self, live: int, shape: torch.Size, device: torch.device):
        self.s = torch.zeros((live, HISTORY, *shape), dtype=torch.float32, device=device)
        self.y = torch.zeros_like(self.s)
        self.sy = torch.zeros(live, HISTORY, HISTORY, dtype=torch.float64, device=device)  # s_i . y_j
        self.ypy = torch.zeros_like(self.sy)  # y_i . P y_j
        self.filled = torch.zeros(live, HISTORY, dtype=torch.bool, device=device)
        self.stamp = torch.full((HISTORY,), -1, dtype=torch.int64, device=device)
        self.empty = True

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], HISTORY, -1)

    def direction(self, g: torch.Tensor, P: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """-H g for the L-BFGS inverse Hessian H with initial matrix gamma P (per problem)."""
        A = g.shape[0]
        gamma32 = gamma.to(g.dtype).view(A, 1, 1)
        Pg = P * g
        if self.empty:
            return -(gamma32 * Pg)
        S, Y = self._flat(self.s), self._flat(self.y)
        a = _matvec(S, g).to(torch.float64).unsqueeze(2)  # S^T g
        b = _matvec(Y, Pg).to(torch.float64).unsqueeze(2) * gamma.view(A, 1, 1)  # Y^T H0 g
        older = self.stamp.view(-1, 1) <= self.stamp.view(1, -1)  # slot i written no later than j
        R = torch.where(older, self.sy, 0.0) + torch.diag_embed((~self.filled).to(torch.float64))
        u = torch.linalg.solve(R, a)  # R^-1 S^T g
        middle = torch.diag_embed(torch.diagonal(self.sy, dim1=1, dim2=2)) + gamma.view(A, 1, 1) * self.ypy
        p = torch.linalg.solve(R.mT, middle @ u - b)
        Yu = torch.bmm(u.mT.to(g.dtype), Y).view_as(g)
        Sp = torch.bmm(p.mT.to(g.dtype), S).view_as(g)
        return -(gamma32 * P * (g - Yu) + Sp)

    def push(self, it: int, s: torch.Tensor, y: torch.Tensor, good: torch.Tensor, P: torch.Tensor,
             sy: torch.Tensor, yPy: torch.Tensor) -> None:
        """Store iteration `it`'s pairs (zeros where not `good`) and their products with the others."""
        A, slot = s.shape[0], it % HISTORY
        keep = good.to(s.dtype).view(A, 1, 1)
        s, y = s * keep, y * keep
        self.s[:, slot], self.y[:, slot] = s, y
        self.filled[:, slot] = good
        self.stamp[slot] = it
        self.empty = False
        S, Y = self._flat(self.s), self._flat(self.y)
        self.sy[:, slot, :] = _matvec(Y, s).to(torch.float64)
        self.sy[:, :, slot] = _matvec(S, y).to(torch.float64)
        ypy = _matvec(Y, P * y).to(torch.float64)
        self.ypy[:, slot, :], self.ypy[:, :, slot] = ypy, ypy
        # The diagonal decides the curvature scaling: the float64-accumulated values.
        self.sy[:, slot, slot] = torch.where(good, sy, 0.0)
        self.ypy[:, slot, slot] = torch.where(good, yPy, 0.0)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the problems that finished (rows: the ones that go on)."""
        self.s, self.y, self.sy, self.ypy, self.filled = (
            t[rows] for t in (self.s, self.y, self.sy, self.ypy, self.filled))


def _lbfgs(sub: _Subset, W: torch.Tensor, lam: torch.Tensor, tol: float, budget: torch.Tensor, basis: torch.Tensor):
    """Minimise each problem from W (in the principal basis) for at most its `budget` (S,) of
    iterations; returns (W, f, max|g|, iterations). A problem with budget 0 is only evaluated.

    max|g| is scikit-learn's criterion, on the gradient in the original basis: it is computed
    (one rotation) for the problems whose rotated gradient already meets tol. The state of the
    problems still running is kept compact (finished ones are written out and dropped), so that
    every iteration works on contiguous tensors.
    """
    S, dev = W.shape[0], W.device
    W = W.clone()
    f, g = sub.loss_grad(W, torch.arange(S, device=dev), lam)
    gmax = _criterion(g, tol, basis)
    n_iter = torch.zeros(S, dtype=torch.int64, device=dev)
    live = ((gmax > tol) & (budget > 0)).nonzero().squeeze(1)
    W_l, f_l, g_l, lam_l, budget_l = W[live], f[live], g[live], lam[live], budget[live]
    P = sub.batch.preconditioner(lam)[live]
    history = _History(len(live), W.shape[1:], dev)
    gamma = torch.ones(len(live), dtype=torch.float64, device=dev)
    best = gmax[live]
    since_best = torch.zeros(len(live), dtype=torch.int64, device=dev)
    for it in range(int(budget.max())):
        if len(live) == 0:
            break
        d = history.direction(g_l, P, gamma)
        slope = _dot(g_l, d)
        # A direction that is not a descent direction (rounding after many updates) falls back to -g.
        bad = slope >= 0
        if bool(bad.any()):
            d[bad] = -g_l[bad]
            slope = torch.where(bad, -_dot(g_l, g_l), slope)
        W_new, f_new, g_new, accepted = _line_search(sub, live, lam_l, W_l, f_l, g_l, d, slope)
        # Curvature pair; a convex objective gives s.y > 0 unless rounding ate the step.
        s_vec, y_vec = W_new - W_l, g_new - g_l
        sy, yPy = _dot(s_vec, y_vec), _dot(y_vec, y_vec * P)
        good = accepted & (sy > 1e-12 * _dot(s_vec, s_vec).sqrt() * yPy.sqrt())
        history.push(it, s_vec, y_vec, good, P, sy, yPy)
        gamma = torch.where(good, sy / yPy.clamp_min(1e-300), gamma)
        W_l, f_l, g_l = W_new, f_new, g_new
        g_max = _criterion(g_l, tol, basis)
        improved = g_max < best * (1 - 1e-3)
        best = torch.minimum(best, g_max)
        since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
        finished = (g_max <= tol) | ~accepted | (since_best >= PATIENCE) | (it + 1 >= budget_l)
        if bool(finished.any()):
            bound_only = finished & (g_max > tol)  # stopped early: report the criterion itself, not its bound
            if bool(bound_only.any()):
                g_max[bound_only] = _largest_entry(g_l[bound_only], basis)
            out = live[finished]
            W[out], f[out], gmax[out], n_iter[out] = W_l[finished], f_l[finished], g_max[finished], it + 1
            rows = (~finished).nonzero().squeeze(1)
            live, W_l, f_l, g_l, lam_l, budget_l, P, gamma, best, since_best = (
                t[rows] for t in (live, W_l, f_l, g_l, lam_l, budget_l, P, gamma, best, since_best))
            history.keep(rows)
    return W, f, gmax, n_iter


def _criterion(grad: torch.Tensor, tol: float, basis: torch.Tensor) -> torch.Tensor:
    """scikit-learn's criterion, the largest |gradient entry| in the original basis, per problem
    where it can be at most tol; elsewhere a lower bound of it (above tol).

    The gradient is rotated back (a quarter of an iteration's FLOPs) only where needed: a rotation
    keeps each class row's norm, and a row of norm r has an entry of at least r / sqrt(D). The
    rotated gradient's own largest entry is no stand-in: on hidden states it ran up to 20x above
    the true one, and stopping on it took 2-3x the iterations scikit-learn's rule needs.
    """
    bias = grad[:, :, -1].abs().amax(1)
    lower = torch.maximum(grad[:, :, :-1].norm(dim=2).amax(1) / basis.shape[0] ** 0.5, bias).to(torch.float64)
    near = lower <= tol
    if bool(near.any()):
        lower[near] = _largest_entry(grad[near], basis)
    return lower


def _largest_entry(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Largest |entry| of each problem's gradient in the original basis."""
    weights = grad[:, :, :-1] @ basis.T
    return torch.maximum(weights.abs().amax((1, 2)), grad[:, :, -1].abs().amax(1)).to(torch.float64)


def _line_search(sub: _Subset, live: torch.Tensor, lam: torch.Tensor, W: torch.Tensor, f: torch.Tensor,
                 g: torch.Tensor, d: torch.Tensor, slope: torch.Tensor):
    """Backtracking from the preconditioned step 1 (a rough Newton step); returns the new W, f, g
    and which problems accepted a step (the others keep their W, f and g)."""
    step = torch.ones_like(slope)
    accepted = torch.zeros(len(live), dtype=torch.bool, device=W.device)
    W_new = f_new = g_new = None
    for _ in range(MAX_BACKTRACKS):
        trial = W + d * step.to(W.dtype).view(-1, 1, 1)
        f_t, g_t = sub.loss_grad(trial, live, lam)
        # Armijo on f, or, where float32 logits blur f near the optimum, the accurate
        # gradient: a step that has not passed the line minimum of a convex f does not raise it.
        ok = ~accepted & ((f_t <= f + ARMIJO * step * slope)
                          | ((_dot(g_t, d) <= 0) & (f_t <= f + F_NOISE * f.abs())))
        if W_new is None:
            if bool(ok.all()):
                return trial, f_t, g_t, ok
            W_new, f_new, g_new = W.clone(), f.clone(), g.clone()
        W_new[ok], f_new[ok], g_new[ok] = trial[ok], f_t[ok], g_t[ok]
        accepted |= ok
        if bool(accepted.all()):
            break
        step = torch.where(accepted, step, step * 0.5)
    return W_new, f_new, g_new, accepted


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
    with cpu_matmul_precision(device):
        batch = _Batch(x, problems, n_classes, basis)
    sub = _Subset(batch)
    W = torch.zeros(len(problems), n_classes, x.shape[1] + 1, dtype=torch.float32, device=device)
    fits = []
    for C in sorted(set(float(c) for c in Cs)):
        lam = 1.0 / (C * batch.n)
        with cpu_matmul_precision(device):
            W, f, gmax, n_iter = _lbfgs(sub, W, lam, tol, torch.full_like(lam, max_iter, dtype=torch.int64), basis)
        # The bfloat16 mode's rounding can stall a fit just above tol (1 of 2,550 CV fits of the
        # embedded default, at C = 10): such fits go on in plain float32, with a fresh memory.
        stalled = (gmax > tol) & (n_iter < max_iter) & (device.type == "cpu")
        if bool(stalled.any()):
            W, f, gmax, more = _lbfgs(sub, W, lam, tol, torch.where(stalled, max_iter - n_iter, 0), basis)
            n_iter = n_iter + more
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
