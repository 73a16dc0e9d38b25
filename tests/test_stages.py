"""Stage detection on synthetic metrics with planted drops."""

from __future__ import annotations

import polars as pl
import pytest

from stagelens.aggregate import stages_table
from stagelens.stages import STAGES, detect_stages, layer_reactions

FAMILIES = {"anchor": "anchor", "lex_picture": "lexical", "lex_feature": "lexical",
            "neg_plane": "negation", "fmt_10": "format", "ctl_suffix": "control"}
MIN_DROP, ALPHA = 0.05, 0.05


def metrics(planted: dict[str, dict[int, float]], layers=range(13), p: dict | None = None) -> pl.DataFrame:
    """One row per layer x prompt; drops default to 0.01 (noise), p-values to 1e-6 for drops >= 0.03."""
    rows = []
    for layer in layers:
        for prompt, family in FAMILIES.items():
            drop = 0.0 if family == "anchor" else planted.get(prompt, {}).get(layer, 0.01)
            p_value = (p or {}).get((prompt, layer), 1e-6 if drop >= 0.03 else 0.4)
            rows.append({"model": "m", "readout": "prompt", "position": "last", "layer": layer, "prompt": prompt,
                         "family": family, "drop": drop, "drop_p": p_value})
    return pl.DataFrame(rows)


def spans(table: pl.DataFrame) -> dict[str, tuple[int, int] | None]:
    return {r["stage"]: (r["start_layer"], r["end_layer"]) if r["detected"] else None
            for r in table.iter_rows(named=True)}


def run(planted, layers=range(13), num_layers=12, p=None) -> dict:
    return spans(detect_stages(layer_reactions(metrics(planted, layers, p), MIN_DROP, ALPHA), num_layers))


def block(layers, drop):
    return {layer: drop for layer in layers}


PAPER_LIKE = {
    "lex_picture": block(range(3, 6), 0.2),
    "lex_feature": block(range(4, 7), 0.15),
    "neg_plane": {**block(range(3, 6), 0.2), **block(range(6, 9), 0.4)},
    "fmt_10": block(range(10, 13), 0.3),
}


def test_paper_like_pattern_gives_the_four_stages_in_order():
    assert run(PAPER_LIKE) == {
        "visual_grounding": (0, 2),
        "lexical_integration": (3, 5),  # layer 6: negation 0.4 beyond lexical 0.15 -> semantic
        "semantic_reasoning": (6, 9),  # runs up to the next onset
        "answer_decoding": (10, 12),
    }


def test_control_family_drop_suppresses_a_stage():
    """The same format drop at the last layers is no stage when a neutral edit drops as much there."""
    with_control = {**PAPER_LIKE, "ctl_suffix": block(range(10, 13), 0.3)}
    result = run(with_control)
    assert result["answer_decoding"] is None
    assert result["semantic_reasoning"] == (6, 12)
    # A smaller control drop leaves the stage: the format drop exceeds it by more than min_drop.
    assert run({**PAPER_LIKE, "ctl_suffix": block(range(10, 13), 0.1)})["answer_decoding"] == (10, 12)


def test_control_drop_must_be_exceeded_by_min_drop_not_just_matched():
    planted = {"lex_picture": block(range(5, 13), 0.2), "ctl_suffix": block(range(5, 13), 0.17)}
    assert run(planted)["lexical_integration"] is None
    assert run(planted)["visual_grounding"] == (0, 12)


def test_format_leading_a_persistent_negation_drop_is_answer_decoding():
    """Negation still reacts in the last layers; where format drops clearly more, decoding starts."""
    planted = {**PAPER_LIKE, "neg_plane": {**PAPER_LIKE["neg_plane"], **block(range(9, 13), 0.2)},
               "fmt_10": {10: 0.22, 11: 0.3, 12: 0.4}}
    result = run(planted)
    assert result["semantic_reasoning"] == (6, 10)  # layer 10: format 0.22 is not 0.05 beyond 0.2
    assert result["answer_decoding"] == (11, 12)


def test_no_reaction_means_grounding_everywhere():
    result = run({})
    assert result["visual_grounding"] == (0, 12)
    assert all(result[s] is None for s in STAGES[1:])


def test_insignificant_or_small_drops_do_not_react():
    planted = {"lex_picture": block(range(3, 13), 0.3), "neg_plane": block(range(6, 13), 0.04)}
    insignificant = {("lex_picture", layer): 0.2 for layer in range(3, 13)}
    result = run(planted, p=insignificant)
    assert result["lexical_integration"] is None  # p >= alpha
    assert result["semantic_reasoning"] is None  # 0.04 < min_drop
    assert result["visual_grounding"] == (0, 12)


def test_negation_no_larger_than_lexical_is_lexical_not_semantic():
    planted = {"lex_picture": block(range(4, 13), 0.3), "neg_plane": block(range(4, 13), 0.32)}
    result = run(planted)
    assert result["lexical_integration"] == (4, 12)
    assert result["semantic_reasoning"] is None


def test_format_only_before_lexical_opens_the_first_stage():
    """A format-only reaction before any lexical one starts lexical integration (format is a wording edit too)."""
    planted = {"fmt_10": block([2], 0.2), "lex_picture": block(range(4, 8), 0.2), "neg_plane": block(range(8, 13), 0.5)}
    result = run(planted)
    assert result["visual_grounding"] == (0, 1)
    assert result["lexical_integration"] == (2, 7)
    assert result["semantic_reasoning"] == (8, 12)
    assert result["answer_decoding"] is None


def test_layer_subsets_and_depth():
    layers = [0, 4, 8, 12, 16, 20, 24, 28, 32]
    planted = {"lex_picture": block([8, 12], 0.2), "neg_plane": block([16, 20, 24], 0.5), "fmt_10": block([28, 32], 0.3)}
    table = detect_stages(layer_reactions(metrics(planted, layers), MIN_DROP, ALPHA), num_layers=32)
    rows = {r["stage"]: r for r in table.iter_rows(named=True)}
    assert (rows["visual_grounding"]["start_layer"], rows["visual_grounding"]["end_layer"]) == (0, 4)
    assert rows["visual_grounding"]["end_depth"] == pytest.approx(4 / 32)
    assert (rows["semantic_reasoning"]["start_layer"], rows["semantic_reasoning"]["end_layer"]) == (16, 24)
    assert rows["answer_decoding"]["start_depth"] == pytest.approx(28 / 32)
    assert rows["answer_decoding"]["end_depth"] == 1.0
    assert rows["lexical_integration"]["layers"] == [8, 12] and rows["lexical_integration"]["support"] == 1.0


def test_detection_ignores_row_order():
    table = metrics(PAPER_LIKE)
    shuffled = table.sample(fraction=1.0, shuffle=True, seed=3)
    a = detect_stages(layer_reactions(table, MIN_DROP, ALPHA), 12)
    b = detect_stages(layer_reactions(shuffled, MIN_DROP, ALPHA), 12)
    assert a.equals(b)


def test_stages_table_runs_per_position_and_records_thresholds():
    table = pl.concat([metrics(PAPER_LIKE), metrics({}).with_columns(pl.lit("question_last").alias("position"))])
    result = stages_table(table, 12, MIN_DROP, ALPHA)
    assert result.height == 2 * len(STAGES)
    last = result.filter(pl.col("position") == "last", pl.col("stage") == "answer_decoding").row(0, named=True)
    assert (last["start_layer"], last["end_layer"], last["min_drop"], last["alpha"]) == (10, 12, MIN_DROP, ALPHA)
    question = result.filter(pl.col("position") == "question_last", pl.col("detected"))
    assert question["stage"].to_list() == ["visual_grounding"]


def test_stages_skip_the_image_pass():
    """The image pass's rows (no drop: no prompt can move them) get no stage analysis."""
    image = metrics({}).filter(pl.col("family") == "anchor").with_columns(
        pl.lit("image").alias("readout"), pl.lit("image_mean").alias("position"), pl.lit("image").alias("prompt"),
        pl.lit("image").alias("family"), pl.lit(None, pl.Float64).alias("drop"), pl.lit(None, pl.Float64).alias("drop_p"))
    result = stages_table(pl.concat([metrics(PAPER_LIKE), image]), 12, MIN_DROP, ALPHA)
    assert result["position"].unique().to_list() == ["last"]
    with pytest.raises(ValueError, match="no prompt-dependent metrics rows"):
        stages_table(image, 12, MIN_DROP, ALPHA)


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="drop_p"):
        layer_reactions(metrics({}).drop("drop_p"), MIN_DROP, ALPHA)
