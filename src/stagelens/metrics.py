"""Evaluation figures of a frozen probe on one prompt: accuracy, CIs, paired drop, shift correction.

numpy only: an evaluation job imports this, and a paper run has about a thousand of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stagelens.probe import Probe


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of correct predictions."""
    return float(np.mean(y_true == y_pred))


def topk_accuracy(y_true: np.ndarray, logits: np.ndarray, classes: np.ndarray, k: int) -> float:
    """Share of samples whose label is among the k highest-scoring classes (ties: lowest index)."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(classes[top] == y_true[:, None], axis=1)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over the labels present in y_true or y_pred (scikit-learn's convention)."""
    labels, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    true_codes, pred_codes = codes[: len(y_true)], codes[len(y_true) :]
    k = len(labels)
    tp = np.bincount(true_codes[true_codes == pred_codes], minlength=k)
    denominator = np.bincount(true_codes, minlength=k) + np.bincount(pred_codes, minlength=k)
    return float(np.mean(2 * tp / denominator))


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n) resampling indices; the same seed gives the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n), dtype=np.int32)


def bootstrap_ci(values: np.ndarray, indices: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-sample values (e.g. 0/1 correctness)."""
    means = values[indices].mean(axis=1)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def mcnemar_exact_p(anchor_correct: np.ndarray, variant_correct: np.ndarray) -> float:
    """Two-sided exact McNemar test: binomial test of the discordant pairs against 1/2."""
    b = int(np.sum(anchor_correct & ~variant_correct))
    c = int(np.sum(~anchor_correct & variant_correct))
    n = b + c
    if n == 0:
        return 1.0
    from math import comb

    # Exact integer arithmetic: 2**n overflows floats for n > 1023.
    tail = sum(comb(n, i) for i in range(min(b, c) + 1))
    return float(min(1.0, 2 * tail / 2**n))


def cross_fit_offsets(variant: np.ndarray, anchor: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(scored indices, offset)] for two random halves (seeded); each half's variant-minus-anchor
    mean offset is estimated on the other half, so no image's own features enter its correction.
    No labels are used."""
    if variant.shape != anchor.shape:
        raise ValueError(f"variant features {variant.shape} and anchor features {anchor.shape} differ")
    n = len(variant)
    order = np.random.default_rng(seed).permutation(n)
    folds = (order[: n // 2], order[n // 2 :])
    means = [
        variant[fold].mean(axis=0, dtype=np.float64) - anchor[fold].mean(axis=0, dtype=np.float64)
        if len(fold) else np.zeros(variant.shape[1])  # a single image: no other image to learn from
        for fold in folds
    ]
    # Each fold is scored with the offset estimated on the other fold.
    return [(folds[0], means[1]), (folds[1], means[0])]


@dataclass(frozen=True)
class EvalSettings:
    """Knobs of one evaluation; part of every metrics row's provenance."""

    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    top_k: int = 5


def align_to(ids: np.ndarray, reference_ids: np.ndarray) -> np.ndarray:
    """Indices that reorder `ids` into the order of `reference_ids` (same sample sets required)."""
    if len(ids) != len(reference_ids) or len(np.unique(ids)) != len(ids):
        raise ValueError(
            f"cannot pair samples: {len(ids)} variant ids vs {len(reference_ids)} anchor ids (or duplicates)"
        )
    order = np.argsort(ids)
    positions = np.searchsorted(ids[order], reference_ids)
    positions = np.clip(positions, 0, len(ids) - 1)
    index = order[positions]
    if not np.array_equal(ids[index], reference_ids):
        missing = sorted(set(reference_ids.tolist()) - set(ids.tolist()))[:5]
        raise ValueError(f"variant and anchor hold different samples, e.g. {missing}")
    return index


# Metrics that compare a prompt with the anchor on the same images (undefined for the image pass).
PAIRED_METRICS = ("anchor_accuracy", "drop", "drop_ci_low", "drop_ci_high", "drop_p", "shift_corrected_accuracy",
                  "shift_corrected_drop")


def evaluate_probe(
    probe: Probe,
    control: Probe,
    labels: np.ndarray,
    variant: np.ndarray,
    anchor: np.ndarray,
    settings: EvalSettings,
) -> dict[str, float | int]:
    """All metrics of one probe on one prompt; variant and anchor rows are the same images in order.

    The drop is anchor accuracy minus variant accuracy on the same images (positive = the
    variant hurts); its CI resamples images jointly, its p-value is the exact McNemar test.
    """
    if not (len(labels) == len(variant) == len(anchor)):
        raise ValueError(f"labels {len(labels)}, variant {len(variant)}, anchor {len(anchor)} rows differ")
    # One matmul for the probe and its control on the variant; the shift correction is linear
    # in the features, so it is a per-fold shift of the logits (no further matmul).
    w, b = probe.folded()
    wc, bc = control.folded()
    k = len(w)
    both = variant.astype(np.float32, copy=False) @ np.concatenate([w, wc]).T
    logits = both[:, :k] + b
    predicted = probe.classes[np.argmax(logits, axis=1)]
    correct = predicted == labels
    control_accuracy = accuracy(labels, control.classes[np.argmax(both[:, k:] + bc, axis=1)])
    anchor_logits = logits if anchor is variant else anchor.astype(np.float32, copy=False) @ w.T + b
    anchor_correct = probe.classes[np.argmax(anchor_logits, axis=1)] == labels
    shifted = np.empty(len(labels), dtype=probe.classes.dtype)
    for scored, offset in cross_fit_offsets(variant, anchor, settings.seed):
        shifted[scored] = probe.classes[np.argmax(logits[scored] - (w @ offset).astype(np.float32), axis=1)]
    shifted_correct = shifted == labels
    indices = bootstrap_indices(len(labels), settings.n_bootstrap, settings.seed)
    diff = anchor_correct.astype(np.float64) - correct.astype(np.float64)
    acc = float(correct.mean())
    acc_low, acc_high = bootstrap_ci(correct.astype(np.float64), indices, settings.ci)
    drop_low, drop_high = bootstrap_ci(diff, indices, settings.ci)
    n_classes = len(probe.classes)
    return {
        "n": int(len(labels)),
        "n_classes": int(n_classes),
        "chance": 1.0 / n_classes,
        "accuracy": acc,
        "accuracy_ci_low": acc_low,
        "accuracy_ci_high": acc_high,
        "top_k": int(min(settings.top_k, n_classes)),
        "topk_accuracy": topk_accuracy(labels, logits, probe.classes, settings.top_k),
        "macro_f1": macro_f1(labels, predicted),
        "anchor_accuracy": float(anchor_correct.mean()),
        "drop": float(diff.mean()),
        "drop_ci_low": drop_low,
        "drop_ci_high": drop_high,
        "drop_p": mcnemar_exact_p(anchor_correct, correct),
        "shift_corrected_accuracy": float(shifted_correct.mean()),
        "shift_corrected_drop": float(anchor_correct.mean() - shifted_correct.mean()),
        "control_accuracy": control_accuracy,
        "selectivity": acc - control_accuracy,
    }
