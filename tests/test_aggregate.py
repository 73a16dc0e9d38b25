"""The aggregate job's tables: metrics sorted with depth, behaviour paired with the anchor by id."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stagelens.adapters.base import ANSWER_WORDS
from stagelens.aggregate import model_tables

PROMPTS = [
    {"id": "neg_plane", "family": "negation", "expected": "no"},  # the anchor deliberately not first
    {"id": "anchor", "family": "anchor", "expected": "yes"},
    {"id": "ctl_suffix", "family": "control", "expected": "yes"},
]
IDS = [f"s{i}" for i in range(6)]


def answers(words: list[str], seed: int) -> pl.DataFrame:
    probs = np.random.default_rng(seed).dirichlet(np.ones(len(ANSWER_WORDS)), size=len(words))
    return pl.DataFrame({"sample_id": IDS, "label": [0] * len(IDS),
                         **{f"p_{w}": probs[:, i] for i, w in enumerate(ANSWER_WORDS)}, "answer": words})


def metric_rows(num_layers: int = 2) -> list[pl.DataFrame]:
    return [pl.DataFrame([{"model": "m", "readout": "prompt", "position": "last", "layer": layer, "num_layers": num_layers,
                           "prompt": p["id"], "family": p["family"], "expected": p["expected"],
                           "drop": 0.0, "drop_p": 1.0}])
            for layer in reversed(range(num_layers + 1)) for p in PROMPTS]


ANSWERS = {
    "anchor": answers(["yes", "Yes", "yes", "no", "yes", "1"], 0),
    "neg_plane": answers(["no", "no", "Yes", "no", "no", "1"], 1),  # listed out of the anchor's order below
    "ctl_suffix": answers(["yes", "yes", "yes", "no", "yes", "1"], 2),
}


def test_behaviour_pairs_every_prompt_with_the_anchor_found_by_id():
    shuffled = {**ANSWERS, "neg_plane": ANSWERS["neg_plane"].reverse()}  # pairing is by sample_id
    tables = model_tables(metric_rows(), shuffled, PROMPTS, "anchor", "m", 0.05, 0.05)
    behaviour = tables["behaviour"]
    assert behaviour["prompt"].to_list() == ["neg_plane", "anchor", "ctl_suffix"]  # the prompts' order
    neg = behaviour.row(0, named=True)
    # Independent count: anchor yes (case-folded) -> variant no at s0, s1, s4; s2 stays yes.
    assert neg["yes_to_no"] == pytest.approx(3 / 6)
    assert neg["changed_vs_anchor"] == pytest.approx(3 / 6)
    assert neg["share_no"] == pytest.approx(4 / 6) and neg["agreement"] == pytest.approx(4 / 6)
    anchor = ANSWERS["anchor"]
    assert behaviour.row(1, named=True)["mean_p_yes"] == pytest.approx(float((anchor["p_yes"] + anchor["p_Yes"]).mean()))
    assert behaviour.row(1, named=True)["changed_vs_anchor"] == 0.0
    assert behaviour.columns[0] == "model" and set(behaviour["model"]) == {"m"}


def test_metrics_are_sorted_with_depth_and_stages_cover_the_position():
    tables = model_tables(metric_rows(), ANSWERS, PROMPTS, "anchor", "m", 0.05, 0.05)
    metrics = tables["metrics"]
    assert metrics["layer"].to_list() == sorted(metrics["layer"].to_list())
    assert metrics["depth"].to_list() == [row["layer"] / 2 for row in metrics.iter_rows(named=True)]
    assert set(tables["stages"]["position"]) == {"last"}


def test_mismatched_inputs_are_errors():
    rows = metric_rows()
    rows[0] = rows[0].with_columns(pl.lit(3).alias("num_layers"))
    with pytest.raises(ValueError, match="disagree on num_layers"):
        model_tables(rows, ANSWERS, PROMPTS, "anchor", "m", 0.05, 0.05)
    with pytest.raises(ValueError, match="no answers for prompts"):
        model_tables(metric_rows(), {k: v for k, v in ANSWERS.items() if k != "ctl_suffix"}, PROMPTS, "anchor",
                     "m", 0.05, 0.05)
