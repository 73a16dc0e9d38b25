"""Probe training: C by stratified K-fold CV, the refit, the shuffled-label control, the sidecar.

Two solvers minimise the same objective (StandardScaler + multinomial L2 logistic regression,
scikit-learn's scaling of C): `torch` (stagelens.logistic: every fold and C in one batched L-BFGS,
warm-started along C, CPU or GPU) and `sklearn` (LogisticRegression, lbfgs: the reference).
Both see the same folds: scikit-learn's StratifiedKFold, reimplemented in numpy (`stratified_folds`).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from stagelens.probe import Probe, save_probes, shuffled_labels

SOLVERS = ("torch", "sklearn")


@dataclass(frozen=True)
class ProbeSettings:
    """The `probe` config section (its defaults live in the JSON schema)."""

    Cs: Sequence[float]
    cv_folds: int
    max_iter: int
    tol: float
    solver: str
    device: str

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"probe.solver must be one of {SOLVERS}, got {self.solver!r}")
        if not self.Cs or any(float(c) <= 0 for c in self.Cs):
            raise ValueError(f"probe.Cs must be positive numbers, got {list(self.Cs)}")


@dataclass(frozen=True)
class FitReport:
    """What a fit chose and how it went; written to the JSON sidecar (per position).

    `cv_fits[repr(C)]` lists, per fold, the iterations, whether the fit converged and the
    held-out accuracy; `converged` is true only when the refit and every CV fit converged.
    A control fit has no CV: its cv fields are empty.
    """

    solver: str
    device: str
    C: float
    train_accuracy: float
    cv_accuracy: float | None
    cv_accuracy_by_C: dict[str, float]
    cv_folds: int
    cv_fits: dict[str, dict[str, list]]
    n: int
    n_features: int
    n_classes: int
    n_iter: int
    converged: bool


def _check_labels(x: np.ndarray, y: np.ndarray, cv_folds: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(classes, labels encoded 0..K-1, folds) or a clear error."""
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features of shape {x.shape} do not match {len(y)} labels")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values")
    classes, encoded, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least two classes, got {classes.tolist()}")
    folds = min(cv_folds, int(counts.min()))
    if folds < 2:
        raise ValueError(
            f"cross-validation needs >= 2 training samples per class; smallest class has {counts.min()}"
        )
    return classes, encoded, folds


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) row indices of scikit-learn's StratifiedKFold(folds, shuffle=True,
    random_state=seed), reimplemented in numpy: importing scikit-learn costs a probe job ~1-9 s
    of start-up (tests/test_probe_solver.py holds the two to the same folds)."""
    rng = np.random.RandomState(seed)
    _, first_index, lexical = np.unique(y, return_index=True, return_inverse=True)
    # Classes numbered by first appearance, as scikit-learn does before allocating.
    _, appearance = np.unique(first_index, return_inverse=True)
    encoded = appearance[lexical.reshape(-1)]
    n_classes = len(first_index)
    ordered = np.sort(encoded)
    allocation = np.asarray([np.bincount(ordered[i::folds], minlength=n_classes) for i in range(folds)])
    test_fold = np.empty(len(y), dtype="i")
    for k in range(n_classes):
        fold_of_row = np.arange(folds).repeat(allocation[:, k])
        rng.shuffle(fold_of_row)
        test_fold[encoded == k] = fold_of_row
    rows = np.arange(len(y))
    return [(rows[test_fold != f], rows[test_fold == f]) for f in range(folds)]


def _best_C(Cs: Sequence[float], mean_accuracy: dict[float, float]) -> float:
    """The C of highest mean CV accuracy; ties go to the first in the configured order (as GridSearchCV)."""
    order = list(dict.fromkeys(float(c) for c in Cs))
    return max(order, key=lambda c: (mean_accuracy[c], -order.index(c)))


def _report(solver: str, device: str, probe: Probe, x: np.ndarray, y: np.ndarray, C: float, n_iter: int,
            converged: bool, folds: int = 0, cv: dict[float, dict[str, list]] | None = None) -> FitReport:
    cv = cv or {}
    by_c = {repr(c): float(np.mean(f["accuracy"])) for c, f in cv.items()}
    return FitReport(
        solver=solver,
        device=device,
        C=float(C),
        train_accuracy=float(np.mean(probe.predict(x) == y)),
        cv_accuracy=by_c[repr(float(C))] if cv else None,
        cv_accuracy_by_C=by_c,
        cv_folds=folds,
        cv_fits={repr(c): f for c, f in cv.items()},
        n=int(len(y)),
        n_features=int(x.shape[1]),
        n_classes=int(len(probe.classes)),
        n_iter=int(n_iter),
        converged=bool(converged and all(all(f["converged"]) for f in cv.values())),
    )


def fit_probe_and_control(
    x: np.ndarray, y: np.ndarray, settings: ProbeSettings, seed: int, threads: int = 1
) -> tuple[Probe, FitReport, Probe, FitReport]:
    """The probe (C by stratified K-fold CV, refitted on all rows) and its control.

    The control is the same recipe at the real probe's chosen C on labels permuted with the seed,
    fitted once on all rows: selectivity then compares like with like, and its held-out accuracy
    is measured on the test split by the evaluation jobs (a CV on noise would only add fits).
    """
    if settings.solver == "torch":
        return _fit_torch(x, y, settings, seed, threads)
    return _fit_sklearn(x, y, settings, seed, threads)


def _probe(classes: np.ndarray, weight, bias, mean, scale) -> Probe:
    return Probe(
        weight=np.ascontiguousarray(weight, dtype=np.float32),
        bias=np.ascontiguousarray(bias, dtype=np.float32),
        mean=np.ascontiguousarray(mean, dtype=np.float32),
        scale=np.ascontiguousarray(scale, dtype=np.float32),
        classes=classes.astype(np.int64),
    )


def _fit_torch(x, y, settings: ProbeSettings, seed: int, threads: int):
    import torch

    from stagelens.logistic import Problem, fit_path, principal_basis
    from stagelens.spec import resolve_device

    device = torch.device(resolve_device(settings.device))
    classes, encoded, folds = _check_labels(x, y, settings.cv_folds)
    K = len(classes)
    # Threads pay off only on large matmuls: below ~50 MFLOP a call their synchronisation costs
    # more, and on a busy machine every barrier can wait for a descheduled thread (measured: 6x
    # slower with 2 threads than with 1 at the embedded default's size on a loaded 2-core machine).
    torch.set_num_threads(1 if len(y) * x.shape[1] * K < 5e7 else max(1, threads))
    splits = stratified_folds(y, folds, seed)
    Cs = sorted(set(float(c) for c in settings.Cs))
    solve = dict(n_classes=K, tol=settings.tol, max_iter=settings.max_iter, device=device,
                 basis=principal_basis(x, device))
    std, path = fit_path(x, [Problem(train, encoded[train]) for train, _ in splits], Cs=Cs, **solve)
    cv: dict[float, dict[str, list]] = {}
    for fit in path:
        accuracies = []
        for f, (_, held) in enumerate(splits):
            fold_probe = _probe(classes, fit.weight[f], fit.bias[f], std.mean[f], std.scale[f])
            accuracies.append(float(np.mean(fold_probe.predict(x[held]) == y[held])))
        cv[fit.C] = {"n_iter": fit.n_iter.tolist(), "converged": fit.converged.tolist(), "accuracy": accuracies}
    C = _best_C(settings.Cs, {c: float(np.mean(f["accuracy"])) for c, f in cv.items()})
    # The refit and the control share the rows (all of them) and the path up to the chosen C.
    control_labels = shuffled_labels(encoded, seed)
    everyone = np.arange(len(y))
    std, path = fit_path(x, [Problem(everyone, encoded), Problem(everyone, control_labels)],
                         Cs=[c for c in Cs if c <= C], **solve)
    last = path[-1]
    probes = [_probe(classes, last.weight[i], last.bias[i], std.mean[i], std.scale[i]) for i in (0, 1)]
    n_iter = [sum(int(p.n_iter[i]) for p in path) for i in (0, 1)]
    name = str(device)
    real = _report("torch", name, probes[0], x, y, C, n_iter[0], bool(last.converged[0]), folds, cv)
    control = _report("torch", name, probes[1], x, classes[control_labels], C, n_iter[1], bool(last.converged[1]))
    return probes[0], real, probes[1], control


def _fit_sklearn(x, y, settings: ProbeSettings, seed: int, threads: int):
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    classes, encoded, folds = _check_labels(x, y, settings.cv_folds)
    splits = stratified_folds(y, folds, seed)
    template = make_pipeline(StandardScaler(), LogisticRegression(max_iter=settings.max_iter, tol=settings.tol,
                                                                  random_state=seed))

    def fit(C: float, labels: np.ndarray):
        model = clone(template).set_params(logisticregression__C=C).fit(x, labels)
        return model, int(np.max(model[1].n_iter_))

    cv: dict[float, dict[str, list]] = {}
    # Parallelism comes from the CV fits (n_jobs processes); BLAS threads on top of them
    # oversubscribe the cores, which made fits up to 80x slower on a busy 2-core machine.
    with threadpool_limits(limits=1):
        for C in dict.fromkeys(float(c) for c in settings.Cs):
            result = cross_validate(clone(template).set_params(logisticregression__C=C), x, y, cv=splits,
                                    scoring="accuracy", n_jobs=threads, return_estimator=True)
            iters = [int(np.max(m[1].n_iter_)) for m in result["estimator"]]
            cv[C] = {"n_iter": iters, "converged": [i < settings.max_iter for i in iters],
                     "accuracy": [float(a) for a in result["test_score"]]}
        C = _best_C(settings.Cs, {c: float(np.mean(f["accuracy"])) for c, f in cv.items()})
        control_y = shuffled_labels(y, seed)
        (real_model, real_iter), (control_model, control_iter) = fit(C, y), fit(C, control_y)

    def as_probe(model) -> Probe:
        scaler, lr = model[0], model[1]
        weight, bias = lr.coef_, lr.intercept_
        if weight.shape[0] == 1:
            # Binary sklearn models keep one row (the positive class); two rows with the
            # negative class at zero give the same softmax and argmax.
            weight = np.vstack([np.zeros_like(weight), weight])
            bias = np.concatenate([[0.0], bias])
        return _probe(lr.classes_, weight, bias, scaler.mean_, scaler.scale_)

    probe, control_probe = as_probe(real_model), as_probe(control_model)
    real = _report("sklearn", "cpu", probe, x, y, C, real_iter, real_iter < settings.max_iter, folds, cv)
    control = _report("sklearn", "cpu", control_probe, x, control_y, C, control_iter,
                      control_iter < settings.max_iter)
    return probe, real, control_probe, control


METHOD = {
    "torch": "StandardScaler + multinomial L2 logistic regression (scikit-learn's objective), "
    "batched L-BFGS in torch (float32, float64 reductions) in the features' principal basis with a "
    "diagonal preconditioner, warm-started along C",
    "sklearn": "StandardScaler + multinomial LogisticRegression (scikit-learn, lbfgs, L2)",
}
INPUT_KEYS = ("model_id", "model_name", "revision", "architecture", "dtype", "layer", "num_layers",
              "layer_convention", "prompt_id", "rendered_prompt", "split", "positions", "stagelens_version")


@dataclass(frozen=True)
class LayerProbes:
    """The probes and controls of every position of one embedding file, with their sidecars."""

    probes: dict[str, Probe]
    controls: dict[str, Probe]
    probe_sidecar: dict[str, Any]
    control_sidecar: dict[str, Any]

    def save(self, probe_path: str | os.PathLike, control_path: str | os.PathLike) -> None:
        save_probes(self.probes, probe_path, self.probe_sidecar)
        save_probes(self.controls, control_path, self.control_sidecar)


def _software(solver: str) -> dict[str, str]:
    """Versions that decide the bytes of a fit."""
    import importlib.metadata as md

    names = ("numpy", "scikit-learn") + (("torch",) if solver == "torch" else ())
    return {"python": platform.python_version(), **{n: md.version(n) for n in names}}


def train_layer_probes(path: str | os.PathLike, settings: dict[str, Any], seed: int, threads: int = 1) -> LayerProbes:
    """Fit the probe and control of every position stored in one embedding file (train split, anchor)."""
    from tqdm import tqdm

    from stagelens.store import read_metadata, read_vectors

    config = ProbeSettings(**settings)
    meta = read_metadata(path)
    if not meta.get("positions"):
        raise KeyError(f"{path}: metadata lists no `positions`")
    probes, controls, fits = {}, {}, {}
    for position in tqdm(meta["positions"], desc=f"probe layer {meta.get('layer')}", file=sys.stderr):
        _, labels, features = read_vectors(path, position)
        probes[position], real, controls[position], control = fit_probe_and_control(
            features, labels, config, seed, threads)
        fits[position] = {"probe": asdict(real), "control": asdict(control)}
        print(f"{position}: C={real.C} cv={real.cv_accuracy:.3f} converged={real.converged} "
              f"control train={control.train_accuracy:.3f}", file=sys.stderr)
    common = {
        "hyperparameters": {**settings, "seed": seed},
        "input": {"path": str(path), **{k: meta.get(k) for k in INPUT_KEYS}},
        "software": _software(config.solver),
    }
    sidecars = {
        kind: {
            "kind": kind,
            "labels": "shuffled with the seed" if kind == "control" else "true",
            "method": METHOD[config.solver] + "; " + (
                "C fixed to the real probe's chosen C, one fit on all rows" if kind == "control"
                else "C by stratified K-fold CV on the train split, refitted on all rows"),
            **common,
            "fit": {pos: fit[kind] for pos, fit in fits.items()},
        }
        for kind in ("probe", "control")
    }
    return LayerProbes(probes, controls, sidecars["probe"], sidecars["control"])
