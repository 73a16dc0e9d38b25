"""A probe fit that stops at max_iter is flagged: from the sidecar into the metrics table and
onto the accuracy figure of the report."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stagelens.aggregate import fit_table, with_fits
from stagelens.figures import accuracy_chart
from stagelens.probe import fit_probe


def sidecar(layer: int, max_iter: int) -> dict:
    """The fit record train_probe writes, from a real fit (lbfgs stops early at max_iter=1)."""
    rng = np.random.default_rng(layer)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(np.int64)
    _, report = fit_probe(x, y, Cs=[1.0], cv_folds=2, max_iter=max_iter, seed=0)
    return {"input": {"layer": layer}, "fit": {"last": vars(report)}}


def test_fit_table_reads_convergence_per_layer_and_position():
    probes = [sidecar(0, 1000), sidecar(1, 1), sidecar(2, 1000)]
    controls = [sidecar(0, 1000), sidecar(1, 1000), sidecar(2, 1)]
    fits = fit_table(probes, controls)
    assert fits.rows() == [
        ("last", 0, True, probes[0]["fit"]["last"]["n_iter"], True, controls[0]["fit"]["last"]["n_iter"]),
        ("last", 1, False, 1, True, controls[1]["fit"]["last"]["n_iter"]),
        ("last", 2, True, probes[2]["fit"]["last"]["n_iter"], False, 1),
    ]


def metrics(layers: int) -> pl.DataFrame:
    return pl.DataFrame([
        {"model": "m", "revision": "main", "position": "last", "layer": layer, "prompt": prompt, "family": family,
         "n": 20, "chance": 0.5, "accuracy": 0.8, "accuracy_ci_low": 0.7, "accuracy_ci_high": 0.9,
         "control_accuracy": 0.5}
        for layer in range(layers) for prompt, family in (("anchor", "anchor"), ("neg", "negation"))
    ])


def test_metrics_rows_carry_the_flag_and_every_row_needs_a_fit():
    fits = fit_table([sidecar(0, 1000), sidecar(1, 1)], [sidecar(0, 1000), sidecar(1, 1000)])
    table = with_fits(metrics(2), fits)
    assert table.filter(pl.col("layer") == 1)["probe_converged"].to_list() == [False, False]
    assert table.filter(pl.col("layer") == 0)["probe_converged"].to_list() == [True, True]
    with pytest.raises(ValueError, match=r"no probe fit record for \(position, layer\) \[\('last', 2\)\]"):
        with_fits(metrics(3), fits)


def test_accuracy_figure_marks_unconverged_layers():
    fits = fit_table([sidecar(0, 1000), sidecar(1, 1), sidecar(2, 1000)], [sidecar(k, 1000) for k in range(3)])
    spec = accuracy_chart(with_fits(metrics(3), fits), "m").to_dict()
    assert "probe fit did not converge (max_iter reached): last layer 1" in spec["title"]["subtitle"][-1]
    crosses = [u for u in spec["spec"]["layer"] if isinstance(u["mark"], dict) and u["mark"].get("shape") == "cross"]
    assert len(crosses) == 1 and crosses[0]["encoding"]["y"]["field"] == "accuracy"
    data = next(iter(spec["datasets"].values()))
    assert sorted({r["layer"] for r in data if not r["probe_converged"]}) == [1]
    converged = accuracy_chart(with_fits(metrics(3), fit_table([sidecar(k, 1000) for k in range(3)],
                                                               [sidecar(k, 1000) for k in range(3)])), "m").to_dict()
    assert len(converged["title"]["subtitle"]) == 1
