"""Linear class probes: fit (scikit-learn, training jobs only), apply and store (numpy + safetensors).

A probe is standardisation followed by a multinomial linear map. Applying it needs only numpy,
so evaluation jobs load the safetensors file and never import torch or scikit-learn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagelens.atomic import atomic_path


@dataclass(frozen=True)
class Probe:
    """A frozen linear probe: logits = ((x - mean) / scale) @ weight.T + bias."""

    weight: np.ndarray  # (n_classes, D) float32
    bias: np.ndarray  # (n_classes,) float32
    mean: np.ndarray  # (D,) float32, standardisation mean of the training features
    scale: np.ndarray  # (D,) float32, standardisation scale (1 where a feature is constant)
    classes: np.ndarray  # (n_classes,) int64, the label each logit row stands for

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(w, b) with the standardisation folded in: logits = x @ w.T + b (no (n, D) temporary)."""
        w = self.weight / self.scale
        return w, self.bias - w @ self.mean

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Class scores for features x of shape (n, D)."""
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"probe expects features of shape (n, {self.weight.shape[1]}), got {x.shape}"
            )
        w, b = self.folded()
        return x.astype(np.float32, copy=False) @ w.T + b

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels for features x of shape (n, D)."""
        return self.classes[np.argmax(self.logits(x), axis=1)]


@dataclass(frozen=True)
class FitReport:
    """What the fit chose and how well it did; written to the JSON sidecar."""

    C: float
    train_accuracy: float
    cv_accuracy: float
    cv_accuracy_by_C: dict[str, float]
    cv_folds: int
    n: int
    n_features: int
    n_classes: int
    n_iter: int
    converged: bool


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    Cs: Sequence[float],
    cv_folds: int,
    max_iter: int,
    seed: int,
    n_jobs: int = 1,
) -> tuple[Probe, FitReport]:
    """Fit standardised multinomial logistic regression, choosing C by stratified K-fold CV.

    The scaler is refitted inside every fold (a pipeline), so CV accuracy does not see the
    held-out fold's statistics. scikit-learn is imported here and nowhere else: only
    probe-training jobs pay for it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if len(x) != len(y):
        raise ValueError(f"features have {len(x)} rows but labels {len(y)}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least two classes, got {classes.tolist()}")
    folds = min(cv_folds, int(counts.min()))
    if folds < 2:
        raise ValueError(
            f"cross-validation needs >= 2 training samples per class; smallest class has {counts.min()}"
        )
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    search = GridSearchCV(
        pipe,
        {"logisticregression__C": [float(c) for c in Cs]},
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
        scoring="accuracy",
        n_jobs=n_jobs,
        refit=True,
    )
    # Parallelism comes from the CV fits (n_jobs processes); BLAS threads on top of them
    # oversubscribe the cores, which made fits up to 80x slower on a busy 2-core machine.
    with threadpool_limits(limits=1):
        search.fit(x, y)
    best = search.best_estimator_
    scaler, lr = best[0], best[1]
    weight, bias = lr.coef_, lr.intercept_
    if weight.shape[0] == 1:
        # Binary sklearn models keep one row (the positive class); two rows with the
        # negative class at zero give the same softmax and argmax.
        weight = np.vstack([np.zeros_like(weight), weight])
        bias = np.concatenate([[0.0], bias])
    probe = Probe(
        weight=np.ascontiguousarray(weight, dtype=np.float32),
        bias=bias.astype(np.float32),
        mean=scaler.mean_.astype(np.float32),
        scale=scaler.scale_.astype(np.float32),
        classes=lr.classes_.astype(np.int64),
    )
    cv_means = search.cv_results_["mean_test_score"]
    n_iter = int(np.max(lr.n_iter_))
    report = FitReport(
        C=float(search.best_params_["logisticregression__C"]),
        train_accuracy=float(np.mean(probe.predict(x) == y)),
        cv_accuracy=float(search.best_score_),
        cv_accuracy_by_C={repr(float(c)): float(s) for c, s in zip(Cs, cv_means)},
        cv_folds=folds,
        n=int(len(y)),
        n_features=int(x.shape[1]),
        n_classes=int(len(classes)),
        n_iter=n_iter,
        converged=n_iter < max_iter,
    )
    return probe, report


def shuffled_labels(y: np.ndarray, seed: int) -> np.ndarray:
    """Labels permuted with the seed: the control task of a selectivity estimate."""
    return np.random.default_rng(seed).permutation(y)


def save_probes(probes: dict[str, Probe], path: str | os.PathLike, sidecar: dict[str, Any]) -> None:
    """Write one probe per token position into one safetensors file (keys `<position>.<name>`)."""
    from safetensors.numpy import save_file

    path = Path(path)
    # safetensors writes the raw buffer: a strided array (sklearn's coef_ is one) would be scrambled.
    tensors = {
        f"{pos}.{name}": np.ascontiguousarray(getattr(probe, name))
        for pos, probe in probes.items()
        for name in ("weight", "bias", "mean", "scale", "classes")
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "stagelens-probe", "positions": ",".join(probes)})
    write_json(path.with_suffix(".json"), sidecar)


def load_probes(path: str | os.PathLike) -> dict[str, Probe]:
    """Read the probes of every position from a safetensors file written by `save_probes`."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors probe file ({err})") from err
    positions = sorted({key.rsplit(".", 1)[0] for key in tensors})
    probes = {}
    for pos in positions:
        try:
            probes[pos] = Probe(**{n: tensors[f"{pos}.{n}"] for n in ("weight", "bias", "mean", "scale", "classes")})
        except KeyError as err:
            raise ValueError(f"{path}: probe for position {pos!r} lacks tensor {err}") from err
    return probes


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically (tmp file + os.replace)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
