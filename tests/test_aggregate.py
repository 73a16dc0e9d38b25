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


def readout(seed: int, layers: int = 3) -> pl.DataFrame:
    """An answer-readout file as extraction writes it: image-major rows, margin by extract.answer_margin."""
    from stagelens.extract import answer_margin

    probs = np.random.default_rng(seed).dirichlet(np.ones(len(ANSWER_WORDS) + 1), size=len(IDS) * layers)[:, :-1]
    return pl.DataFrame({"sample_id": [i for i in IDS for _ in range(layers)], "label": [0] * len(IDS) * layers,
                         "layer": list(range(layers)) * len(IDS),
                         **{f"p_{w}": probs[:, j] for j, w in enumerate(ANSWER_WORDS)},
                         "margin": answer_margin(np.log(probs), "yes")})


def test_answer_readout_table_per_prompt_and_layer():
    """Means per layer against an independent numpy reading of the same rows; the margin is
    signed towards each prompt's expected answer (negation: no over yes)."""
    from stagelens.extract import answer_margin

    readouts = {p["id"]: readout(i) for i, p in enumerate(PROMPTS)}
    neg = readouts["neg_plane"]
    readouts["neg_plane"] = neg.with_columns(
        pl.Series("margin", answer_margin(np.log(neg.select([f"p_{w}" for w in ANSWER_WORDS]).to_numpy()), "no")))
    table = model_tables(metric_rows(), ANSWERS, PROMPTS, "anchor", "m", 0.05, 0.05, answer_readouts=readouts)["answer_readout"]
    assert table.select("prompt", "layer").rows() == [(p["id"], layer) for p in PROMPTS for layer in range(3)]
    assert table["depth"].to_list() == [layer / 2 for _ in PROMPTS for layer in range(3)]
    for p in PROMPTS:
        frame = readouts[p["id"]]
        for layer in range(3):
            rows = frame.filter(pl.col("layer") == layer)
            yes, no = (rows["p_yes"] + rows["p_Yes"]).to_numpy(), (rows["p_no"] + rows["p_No"]).to_numpy()
            margin = np.log(yes / no) if p["expected"] == "yes" else np.log(no / yes)
            got = table.filter((pl.col("prompt") == p["id"]) & (pl.col("layer") == layer)).row(0, named=True)
            assert got["n"] == len(IDS) and got["model"] == "m" and got["expected"] == p["expected"]
            assert got["mean_p_expected"] == pytest.approx((yes if p["expected"] == "yes" else no).mean())
            assert got["mean_p_1"] == pytest.approx(rows["p_1"].mean())
            assert got["mean_margin"] == pytest.approx(margin.mean(), rel=1e-6)
            assert got["share_expected_ahead"] == pytest.approx((margin > 0).mean())
    with pytest.raises(ValueError, match="no answer readout for prompts"):
        model_tables(metric_rows(), ANSWERS, PROMPTS, "anchor", "m", 0.05, 0.05,
                     answer_readouts={k: v for k, v in readouts.items() if k != "anchor"})


def test_answer_leads_from_the_first_layer_of_the_last_positive_run():
    from stagelens.summary import answer_leads_from

    def leads(margins):
        return answer_leads_from(pl.DataFrame({"layer": list(range(len(margins)))[::-1], "mean_margin": margins[::-1]}))

    assert leads([-1.0, 0.5, -0.2, 0.1, 0.3]) == 3  # the early positive layer does not count: it is lost again
    assert leads([0.2, 0.1, 0.4]) == 0
    assert leads([0.2, 0.1, -0.4]) is None and leads([0.0]) is None


def test_vision_metrics_table_orders_rows_with_the_encoders_depth():
    from stagelens.aggregate import fit_table, vision_metrics_table

    def row(position, layer, readout="vision", num_layers=8):
        return pl.DataFrame([{"model": "m", "readout": readout, "position": position, "layer": layer,
                              "num_layers": num_layers, "prompt": "vision", "accuracy": 0.1 * layer}])

    rows = [row(p, v) for v in (8, 0, 4) for p in ("patch_mean",)]
    fits = fit_table([{"input": {"layer": v}, "fit": {"patch_mean": {"converged": True, "n_iter": 3}}} for v in (0, 4, 8)],
                     [{"input": {"layer": v}, "fit": {"patch_mean": {"converged": v != 4, "n_iter": 5}}} for v in (0, 4, 8)])
    table = vision_metrics_table(rows, "m", fits)
    assert table["layer"].to_list() == [0, 4, 8] and table["depth"].to_list() == [0.0, 0.5, 1.0]
    assert table["control_converged"].to_list() == [True, False, True]
    with pytest.raises(ValueError, match="readout"):
        vision_metrics_table([*rows, row("last", 1, readout="prompt")], "m")
    with pytest.raises(ValueError, match="num_layers"):
        vision_metrics_table([*rows, row("patch_mean", 1, num_layers=24)], "m")
    with pytest.raises(ValueError, match="duplicate"):
        vision_metrics_table([*rows, row("patch_mean", 4)], "m")


def test_read_by_prompt_keys_files_by_the_prompts_order_and_refuses_a_count_mismatch(tmp_path):
    from stagelens.aggregate import read_by_prompt

    paths = []
    for prompt in PROMPTS:
        paths.append(tmp_path / f"{prompt['id']}.parquet")
        ANSWERS[prompt["id"]].write_parquet(paths[-1])
    tables = read_by_prompt(PROMPTS, paths)
    assert list(tables) == [p["id"] for p in PROMPTS]
    assert all(tables[k].equals(ANSWERS[k]) for k in tables)
    with pytest.raises(ValueError, match="3 prompts but 2 files"):
        read_by_prompt(PROMPTS, paths[:2])


def test_read_fits_equals_fit_table_of_the_parsed_sidecars(tmp_path):
    import json

    from stagelens.aggregate import fit_table, read_fits

    sidecars = [{"input": {"layer": k}, "fit": {"last": {"converged": k != 1, "n_iter": 10 + k}}} for k in range(3)]
    paths = []
    for k, sidecar in enumerate(sidecars):
        paths.append(tmp_path / f"layer{k}.json")
        paths[-1].write_text(json.dumps(sidecar))
    assert read_fits(paths, paths[::-1]).equals(fit_table(sidecars, sidecars[::-1]))
