"""Evaluation metrics against independent computations (scikit-learn, brute force, planted data)."""

from __future__ import annotations

from math import comb

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import f1_score, top_k_accuracy_score

from stagelens.aggregate import behaviour_row, metrics_table
from stagelens.metrics import (
    EvalSettings,
    align_to,
    bootstrap_ci,
    bootstrap_indices,
    cross_fit_offsets,
    evaluate_probe,
    macro_f1,
    mcnemar_exact_p,
    topk_accuracy,
)
from stagelens.probe import Probe

N_CLASSES, DIM = 8, 16


def _probe(rng: np.random.Generator) -> tuple[Probe, np.ndarray]:
    """A hand-made probe whose classes sit at known centres (nearest-centre logits)."""
    centers = rng.normal(size=(N_CLASSES, DIM)).astype(np.float32) * 2
    probe = Probe(
        weight=centers, bias=-0.5 * np.sum(centers**2, axis=1).astype(np.float32),
        mean=np.zeros(DIM, np.float32), scale=np.ones(DIM, np.float32),
        classes=np.arange(10, 10 + N_CLASSES, dtype=np.int64),  # labels need not be 0..K-1
    )
    return probe, centers


def _sample(centers: np.ndarray, per_class: int, rng: np.random.Generator, noise: float = 1.0):
    labels = np.repeat(np.arange(N_CLASSES), per_class)
    x = (centers[labels] + noise * rng.normal(size=(len(labels), DIM))).astype(np.float32)
    return labels + 10, x


def _control(rng: np.random.Generator) -> Probe:
    probe, _ = _probe(rng)
    return probe


def test_paired_drop_is_exactly_zero_when_variant_equals_anchor():
    rng = np.random.default_rng(0)
    probe, centers = _probe(rng)
    labels, x = _sample(centers, 30, rng, noise=2.0)
    m = evaluate_probe(probe, _control(rng), labels, x.copy(), x, EvalSettings(n_bootstrap=300))
    assert 0.2 < m["accuracy"] < 1.0  # not trivially perfect: the test could see a non-zero drop
    assert m["drop"] == 0.0 and m["drop_ci_low"] == 0.0 and m["drop_ci_high"] == 0.0
    assert m["drop_p"] == 1.0
    assert m["anchor_accuracy"] == m["accuracy"]


def test_shift_correction_recovers_anchor_accuracy_under_a_constant_offset():
    rng = np.random.default_rng(1)
    probe, centers = _probe(rng)
    labels, anchor = _sample(centers, 40, rng)
    offset = rng.normal(size=DIM).astype(np.float32) * 8
    variant = anchor + offset
    m = evaluate_probe(probe, _control(rng), labels, variant, anchor, EvalSettings(n_bootstrap=200))
    assert m["drop"] > 0.3  # the offset breaks the frozen probe
    assert m["drop_p"] < 1e-6
    assert m["shift_corrected_accuracy"] == pytest.approx(m["anchor_accuracy"], abs=1 / m["n"])
    assert abs(m["shift_corrected_drop"]) <= 1 / m["n"]


def test_shift_correction_estimates_the_offset_on_other_images():
    """With one image per fold each offset comes from the other image alone, never its own."""
    rng = np.random.default_rng(2)
    probe, centers = _probe(rng)
    anchor = centers[[0, 1]].copy()
    variant = anchor.copy()
    variant[0] += 50.0  # image 0 alone is displaced: its own offset would undo that, the other's does not
    labels = probe.classes[[0, 1]]
    m = evaluate_probe(probe, _control(rng), labels, variant, anchor, EvalSettings(n_bootstrap=10))
    assert m["anchor_accuracy"] == 1.0
    assert m["shift_corrected_accuracy"] == 0.0  # in-sample estimation would score 1.0


def test_shift_corrected_logits_equal_scoring_the_shifted_features():
    """The logit-space shortcut equals the frozen probe applied to variant - offset."""
    rng = np.random.default_rng(9)
    probe, centers = _probe(rng)
    labels, anchor = _sample(centers, 30, rng, noise=2.0)
    variant = anchor + rng.normal(size=DIM).astype(np.float32) * 3 + rng.normal(size=anchor.shape).astype(np.float32)
    predicted = np.empty(len(labels), dtype=np.int64)
    for scored, offset in cross_fit_offsets(variant, anchor, seed=0):
        predicted[scored] = probe.predict(variant[scored] - offset.astype(np.float32))
    m = evaluate_probe(probe, _control(rng), labels, variant, anchor, EvalSettings(n_bootstrap=10, seed=0))
    assert m["shift_corrected_accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1 / len(labels))
    assert 0.2 < m["shift_corrected_accuracy"] < 1.0


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(3)
    correct = (rng.random(500) < 0.7).astype(np.float64)
    a = bootstrap_ci(correct, bootstrap_indices(500, 1000, seed=7), 0.95)
    b = bootstrap_ci(correct, bootstrap_indices(500, 1000, seed=7), 0.95)
    c = bootstrap_ci(correct, bootstrap_indices(500, 1000, seed=8), 0.95)
    assert a == b
    assert a != c
    assert a[0] < correct.mean() < a[1]
    # Close to the normal approximation's half-width 1.96 * sqrt(p(1-p)/n) ~ 0.04.
    assert 0.03 < (a[1] - a[0]) / 2 < 0.05


def test_evaluate_probe_is_deterministic_given_the_seed():
    rng = np.random.default_rng(4)
    probe, centers = _probe(rng)
    control = _control(rng)
    labels, anchor = _sample(centers, 20, rng, noise=2.0)
    variant = anchor + rng.normal(size=anchor.shape).astype(np.float32)
    settings = EvalSettings(n_bootstrap=200, seed=5)
    assert evaluate_probe(probe, control, labels, variant, anchor, settings) == evaluate_probe(
        probe, control, labels, variant, anchor, settings)
    m = evaluate_probe(probe, control, labels, variant, anchor, settings)
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
    assert m["drop_ci_low"] <= m["drop"] <= m["drop_ci_high"]


def test_topk_and_macro_f1_match_scikit_learn():
    rng = np.random.default_rng(5)
    probe, centers = _probe(rng)
    labels, x = _sample(centers, 25, rng, noise=3.0)
    logits = probe.logits(x)
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(labels, logits, k=k, labels=probe.classes)
        assert topk_accuracy(labels, logits, probe.classes, k) == pytest.approx(expected)
    predicted = probe.predict(x)
    assert macro_f1(labels, predicted) == pytest.approx(f1_score(labels, predicted, average="macro"))
    # A class that is predicted but never true counts with F1 = 0, as in scikit-learn.
    skewed = predicted.copy()
    skewed[:3] = 99
    assert macro_f1(labels, skewed) == pytest.approx(f1_score(labels, skewed, average="macro"))


def test_topk_is_capped_at_the_number_of_classes():
    rng = np.random.default_rng(6)
    probe, centers = _probe(rng)
    labels, x = _sample(centers, 5, rng)
    assert topk_accuracy(labels, probe.logits(x), probe.classes, k=50) == 1.0


def test_mcnemar_exact_p_matches_the_binomial_formula():
    anchor = np.array([True] * 10 + [False] * 2 + [True] * 30)
    variant = np.array([False] * 10 + [True] * 2 + [True] * 30)
    expected = 2 * sum(comb(12, i) for i in range(3)) / 2**12
    assert mcnemar_exact_p(anchor, variant) == pytest.approx(expected)
    assert mcnemar_exact_p(variant, anchor) == pytest.approx(expected)  # two-sided
    assert mcnemar_exact_p(anchor, anchor) == 1.0
    big = np.array([True] * 1500 + [False] * 1500)  # n > 1023 discordant pairs: no float overflow
    assert mcnemar_exact_p(big, ~big) == 1.0
    assert mcnemar_exact_p(np.ones(1200, bool), np.zeros(1200, bool)) == 0.0


def test_align_to_pairs_by_sample_id_and_rejects_other_sets():
    ids = np.array(["b", "c", "a"], dtype=object)
    reference = np.array(["a", "b", "c"], dtype=object)
    np.testing.assert_array_equal(ids[align_to(ids, reference)], reference)
    with pytest.raises(ValueError, match="different samples"):
        align_to(np.array(["a", "b", "x"], dtype=object), reference)
    with pytest.raises(ValueError, match="cannot pair"):
        align_to(np.array(["a", "b"], dtype=object), reference)


def test_metrics_table_adds_depth_and_rejects_duplicates():
    row = {"model": "m", "position": "last", "prompt": "anchor", "num_layers": 4, "accuracy": 0.5}
    frames = [pl.DataFrame([{**row, "layer": layer}]) for layer in (2, 0, 4)]
    table = metrics_table(frames, num_layers=4)
    assert table["layer"].to_list() == [0, 2, 4]
    assert table["depth"].to_list() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="duplicate"):
        metrics_table(frames + frames[:1], num_layers=4)


def test_behaviour_row_case_folds_answers_and_scores_agreement():
    answers = pl.DataFrame({
        "answer": ["yes", "Yes", "No", "1", "yes", "0"],
        "p_yes": [0.6] * 6, "p_Yes": [0.1] * 6, "p_no": [0.1] * 6, "p_No": [0.0] * 6,
        "p_1": [0.1] * 6, "p_0": [0.0] * 6,
    })
    row = behaviour_row(answers, {"id": "anchor", "family": "anchor", "expected": "yes"})
    assert row["n"] == 6
    assert row["share_yes"] == pytest.approx(3 / 6)
    assert row["share_no"] == pytest.approx(1 / 6)
    assert row["share_1"] == pytest.approx(1 / 6) and row["share_0"] == pytest.approx(1 / 6)
    assert row["agreement"] == pytest.approx(3 / 6)
    assert row["mean_p_yes"] == pytest.approx(0.7)
    fmt = behaviour_row(answers, {"id": "fmt", "family": "format", "expected": "1"})
    assert fmt["agreement"] == pytest.approx(1 / 6)


def test_behaviour_row_pairs_answers_with_the_anchor():
    anchor = pl.DataFrame({"sample_id": ["a", "b", "c", "d"], "answer": ["yes", "Yes", "no", "yes"]})
    # Rows in another order: pairing is by sample_id, not position.
    negation = pl.DataFrame({"sample_id": ["d", "c", "b", "a"], "answer": ["No", "no", "yes", "no"]})
    row = behaviour_row(negation, {"id": "neg", "family": "negation", "expected": "no"}, anchor)
    assert row["yes_to_no"] == pytest.approx(2 / 4)  # a and d
    assert row["changed_vs_anchor"] == pytest.approx(2 / 4)
    same = behaviour_row(anchor, {"id": "anchor", "family": "anchor", "expected": "yes"}, anchor)
    assert same["changed_vs_anchor"] == 0.0 and same["yes_to_no"] == 0.0
    with pytest.raises(ValueError, match="different images"):
        behaviour_row(negation.head(3), {"id": "neg", "family": "negation", "expected": "no"}, anchor)
