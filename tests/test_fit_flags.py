"""A probe fit that stops at max_iter is flagged: from the sidecar into the metrics table and
onto the accuracy figure of the report. (That the workflow's table carries its own sidecars'
flags is checked in tests/test_analysis_workflow.py.)"""

from __future__ import annotations

import polars as pl
import pytest

from stagelens.aggregate import fit_table, with_fits
from stagelens.figures import accuracy_chart


def sidecar(layer: int, converged: bool, n_iter: int = 37) -> dict:
    """The parts of a probe sidecar (train_probe's JSON) that the flag is read from."""
    fit = {"C": 1.0, "n_iter": n_iter, "converged": converged, "train_accuracy": 0.9}
    return {"kind": "probe", "input": {"layer": layer, "positions": ["last"]}, "fit": {"last": fit}}


def test_fit_table_reads_convergence_per_layer_and_position():
    probes = [sidecar(0, True, 12), sidecar(1, False, 200), sidecar(2, True, 15)]
    controls = [sidecar(0, True, 40), sidecar(1, True, 41), sidecar(2, False, 200)]
    assert fit_table(probes, controls).rows() == [
        ("last", 0, True, 12, True, 40),
        ("last", 1, False, 200, True, 41),
        ("last", 2, True, 15, False, 200),
    ]


def metrics(layers: int) -> pl.DataFrame:
    return pl.DataFrame([
        {"model": "m", "revision": "main", "readout": "prompt", "position": "last", "layer": layer, "prompt": prompt, "family": family,
         "n": 20, "chance": 0.5, "accuracy": 0.8, "accuracy_ci_low": 0.7, "accuracy_ci_high": 0.9,
         "control_accuracy": 0.5}
        for layer in range(layers) for prompt, family in (("anchor", "anchor"), ("neg", "negation"))
    ])


def test_metrics_rows_carry_the_flag_and_every_row_needs_a_fit():
    fits = fit_table([sidecar(0, True), sidecar(1, False)], [sidecar(0, True), sidecar(1, True)])
    table = with_fits(metrics(2), fits)
    assert table.filter(pl.col("layer") == 1)["probe_converged"].to_list() == [False, False]
    assert table.filter(pl.col("layer") == 0)["probe_converged"].to_list() == [True, True]
    with pytest.raises(ValueError, match=r"no probe fit record for \(position, layer\) \[\('last', 2\)\]"):
        with_fits(metrics(3), fits)


def test_accuracy_figure_marks_unconverged_layers():
    fits = fit_table([sidecar(0, True), sidecar(1, False), sidecar(2, True)], [sidecar(k, True) for k in range(3)])
    spec = accuracy_chart(with_fits(metrics(3), fits), "m").to_dict()
    assert "probe fit did not converge (max_iter reached): last layer 1" in spec["title"]["subtitle"][-1]
    crosses = [u for u in spec["spec"]["layer"] if isinstance(u["mark"], dict) and u["mark"].get("shape") == "cross"]
    assert len(crosses) == 1 and crosses[0]["encoding"]["y"]["field"] == "accuracy"
    data = next(iter(spec["datasets"].values()))
    assert sorted({r["layer"] for r in data if not r["probe_converged"]}) == [1]
    all_fine = fit_table([sidecar(k, True) for k in range(3)], [sidecar(k, True) for k in range(3)])
    converged = accuracy_chart(with_fits(metrics(3), all_fine), "m").to_dict()
    assert len(converged["title"]["subtitle"]) == 1
