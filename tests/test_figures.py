"""Figures: all three formats are written and the Vega-Lite specs plot what they claim."""

from __future__ import annotations

import json

import polars as pl
import pytest

from stagelens.aggregate import stages_table
from stagelens.figures import (
    P_FLOOR,
    accuracy_chart,
    answer_readout_chart,
    answers_chart,
    depth_panel,
    depth_panel_chart,
    drop_heatmap,
    loss_chart,
    model_charts,
    pixels_to_answer_chart,
    save_chart,
)

PROMPTS = {"anchor": "anchor", "lex_picture": "lexical", "neg_plane": "negation", "fmt_10": "format",
           "ctl_suffix": "control"}


def _metrics(model: str, num_layers: int) -> pl.DataFrame:
    """Prompt rows at last and question_last, and the image pass's rows at image_mean (no drop)."""
    rows = []
    readouts = [("last", PROMPTS), ("question_last", PROMPTS), ("image_mean", {"image": "image"})]
    for position, prompts in readouts:
        for layer in range(num_layers + 1):
            for prompt, family in prompts.items():
                drop = 0.3 if family == "negation" and layer > num_layers // 2 else 0.0
                accuracy = 0.8 - drop
                image = family == "image"
                rows.append({
                    "model": model, "revision": "main", "readout": "image" if image else "prompt",
                    "position": position, "layer": layer,
                    "num_layers": num_layers, "depth": layer / num_layers, "prompt": prompt, "family": family,
                    "n": 200, "chance": 0.1, "accuracy": accuracy, "accuracy_ci_low": accuracy - 0.05,
                    "accuracy_ci_high": accuracy + 0.05, "control_accuracy": 0.11,
                    "drop": None if image else drop, "drop_ci_low": None if image else drop - 0.04,
                    "drop_ci_high": None if image else drop + 0.04,
                    "drop_p": None if image else 1e-9 if drop else 0.6,
                })
    return pl.DataFrame(rows)


def _behaviour() -> pl.DataFrame:
    return pl.DataFrame([
        {"prompt": p, "family": f, "expected": "no" if f == "negation" else "yes", "n": 200,
         "share_yes": 0.7, "share_no": 0.2, "share_1": 0.05, "share_0": 0.0, "agreement": 0.7}
        for p, f in PROMPTS.items()
    ])


def _answer_readout(num_layers: int = 4) -> pl.DataFrame:
    """The aggregate's answer_readout table: p(yes) rises with depth, p(1) = 0.5 everywhere, p(no) underflows at layer 0."""
    rows = []
    for p, f in PROMPTS.items():
        expected = {"negation": "no", "format": "1"}.get(f, "yes")
        for layer in range(num_layers + 1):
            yes = 0.1 * layer
            rows.append({"model": "m", "prompt": p, "family": f, "expected": expected, "layer": layer,
                         "depth": layer / num_layers, "n": 10, "mean_p_yes": yes, "mean_p_no": 0.0 if layer == 0 else 0.05,
                         "mean_p_1": 0.5, "mean_p_0": 0.25, "mean_p_expected": yes, "mean_margin": layer - 2.0,
                         "share_expected_ahead": 0.5})
    return pl.DataFrame(rows)


def _spec_layers(spec: dict) -> list[dict]:
    """Every unit spec (those with a mark) inside a facet/layer/concat spec."""
    found = []
    for key in ("spec", "layer", "vconcat", "hconcat", "concat"):
        inner = spec.get(key)
        for part in inner if isinstance(inner, list) else [inner] if inner else []:
            found += _spec_layers(part)
    return found + ([spec] if "mark" in spec else [])


def _mark(unit: dict) -> str:
    return unit["mark"] if isinstance(unit["mark"], str) else unit["mark"]["type"]


def _fields(unit: dict) -> dict[str, str]:
    return {channel: enc.get("field") or enc.get("aggregate", "") for channel, enc in unit["encoding"].items()
            if isinstance(enc, dict)}


def _save_and_load(chart, tmp_path, name: str) -> dict:
    written = save_chart(chart, tmp_path / name)
    assert [p.name for p in written] == [f"{name}.png", f"{name}.svg", f"{name}.vl.json"]
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / f"{name}.svg").read_text()[:500]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary left behind
    return json.loads((tmp_path / f"{name}.vl.json").read_text())


def test_accuracy_chart_has_bands_lines_control_and_chance(tmp_path):
    spec = _save_and_load(accuracy_chart(_metrics("m", 4), "m: accuracy"), tmp_path, "accuracy")
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    assert spec["facet"]["column"]["field"] == "position"
    units = _spec_layers(spec)
    by_mark = {_mark(u): _fields(u) for u in units}
    assert by_mark["area"] == {"x": "layer", "y": "accuracy_ci_low", "y2": "accuracy_ci_high", "color": "series"}
    assert by_mark["rule"]["y"] == "chance"
    lines = [_fields(u) for u in units if _mark(u) == "line"]
    assert any(f["x"] == "layer" and f["y"] == "accuracy" and f["color"] == "series" for f in lines)
    assert any(f["y"] == "control_accuracy" for f in lines)
    rows = list(spec["datasets"].values())[0]
    # prompt positions x layers x (prompts + the image reference), aggregated before plotting
    assert len(rows) == 2 * 5 * (len(PROMPTS) + 1)
    image = [r for r in rows if r["readout"] == "image"]
    assert {r["position"] for r in image} == {"last", "question_last"}  # the reference in every facet
    assert {r["series"] for r in image} == {"image tokens (image_mean)"}
    assert {r["position"] for r in rows} == {"last", "question_last"}  # no image_mean facet


def test_drop_heatmap_encodes_drop_per_layer_and_prompt(tmp_path):
    spec = _save_and_load(drop_heatmap(_metrics("m", 4), "m: drop", 0.05, 0.05), tmp_path, "drop_heatmap")
    units = {_mark(u): _fields(u) for u in _spec_layers(spec)}
    assert units["rect"]["x"] == "layer" and units["rect"]["y"] == "series" and units["rect"]["color"] == "drop"
    assert "text" in units
    rows = list(spec["datasets"].values())[0]
    assert {r["series"] for r in rows} == {f"{p} ({f})" for p, f in PROMPTS.items() if f != "anchor"}
    assert {r["position"] for r in rows} == {"last", "question_last"}  # no rows that cannot move
    assert sum(r["significant"] for r in rows) == 2 * 2  # negation at layers 3, 4 in both positions


def _with_text_before_the_image(metrics: pl.DataFrame) -> pl.DataFrame:
    """Plus the image-token rows of a prompt with text before the image (paired with the image
    pass: a drop of its own, significant from the middle layer on)."""
    own = metrics.filter(pl.col("prompt") == "image").with_columns(
        pl.lit("look_first").alias("prompt"), pl.lit("control").alias("family"),
        drop=pl.when(pl.col("layer") >= 2).then(0.2).otherwise(0.0),
    ).with_columns(drop_ci_low=pl.col("drop") - 0.04, drop_ci_high=pl.col("drop") + 0.04,
                   drop_p=pl.when(pl.col("drop") > 0).then(1e-6).otherwise(0.5), accuracy=0.8 - pl.col("drop"))
    return pl.concat([metrics, own], how="diagonal_relaxed")


def test_image_tokens_of_a_prompt_with_text_before_the_image_are_drawn_as_its_own(tmp_path):
    """Its image-token curve beside the image pass's reference in every facet; its heatmap row in
    an image_mean facet of its own (the image pass's rows never: they cannot move)."""
    metrics = _with_text_before_the_image(_metrics("m", 4))
    rows = list(_save_and_load(accuracy_chart(metrics, "m"), tmp_path, "accuracy")["datasets"].values())[0]
    image = [r for r in rows if r["readout"] == "image"]
    assert {r["series"] for r in image} == {"image tokens (image_mean)", "look_first (control), image tokens"}
    assert {(r["position"], r["series"]) for r in image if r["prompt"] == "look_first"} == {
        ("last", "look_first (control), image tokens"), ("question_last", "look_first (control), image tokens")}
    rows = list(_save_and_load(drop_heatmap(metrics, "m", 0.05, 0.05), tmp_path, "heatmap")["datasets"].values())[0]
    assert {r["series"] for r in rows if r["position"] == "image_mean"} == {"look_first (control), image tokens"}
    assert sorted(r["layer"] for r in rows if r["position"] == "image_mean" and r["significant"]) == [2, 3, 4]
    assert not [r for r in rows if r["series"].startswith("image tokens")]


def test_answers_chart_stacks_answer_shares(tmp_path):
    spec = _save_and_load(answers_chart(_behaviour(), "m: answers"), tmp_path, "answers")
    units = {_mark(u): _fields(u) for u in _spec_layers(spec)}
    assert units["bar"]["x"] == "share" and units["bar"]["color"] == "answer"
    bars = next(d for d in spec["datasets"].values() if "share" in d[0])
    other = [r["share"] for r in bars if r["answer"] == "other"]
    assert other == pytest.approx([0.05] * len(PROMPTS))


def test_answer_readout_chart_draws_each_prompts_answer_pair_and_margin(tmp_path):
    spec = _save_and_load(answer_readout_chart(_answer_readout(), "m: readout"), tmp_path, "answer_readout")
    assert len(spec["hconcat"]) == 2
    units = [_fields(u) | {"mark": _mark(u)} for u in _spec_layers(spec)]
    assert {"mark": "line", "x": "layer", "y": "p", "color": "series", "strokeDash": "role", "detail": "answer"}.items() \
        <= next(u for u in units if u.get("y") == "p").items()
    assert any(u["mark"] == "line" and u["y"] == "mean_margin" for u in units)
    assert any(u["mark"] == "rule" and u["y"] == "y" for u in units)  # the zero line
    probability = next(u for u in _spec_layers(spec) if _fields(u).get("y") == "p")
    assert probability["encoding"]["y"]["scale"]["type"] == "log"
    rows = next(d for d in spec["datasets"].values() if "role" in d[0])
    # Only the anchor, negation and format prompts; the format prompt's pair is 1 / 0.
    assert {r["series"] for r in rows} == {"anchor (anchor)", "neg_plane (negation)", "fmt_10 (format)"}
    by = {(r["series"], r["layer"], r["answer"]): r["p"] for r in rows}
    assert by[("fmt_10 (format)", 3, "1")] == 0.5 and by[("fmt_10 (format)", 3, "0")] == 0.25
    assert by[("neg_plane (negation)", 3, "yes")] == pytest.approx(0.3) and by[("neg_plane (negation)", 3, "no")] == 0.05
    assert by[("anchor (anchor)", 0, "no")] == P_FLOOR  # an underflowed probability sits on the log scale's floor
    with pytest.raises(ValueError, match="no anchor, negation, format prompt"):
        answer_readout_chart(_answer_readout().filter(pl.col("family") == "control"), "m")


def _vision_metrics(vision_layers: int = 3) -> pl.DataFrame:
    """The vision_metrics table: accuracy rises along the encoder (patch mean), CLS a little lower."""
    return pl.DataFrame([
        {"model": "m", "readout": "vision", "position": position, "layer": v, "num_layers": vision_layers,
         "prompt": "vision", "family": "vision", "n": 200, "chance": 0.1, "accuracy": 0.3 + 0.1 * v - offset,
         "accuracy_ci_low": 0.25 + 0.1 * v - offset, "accuracy_ci_high": 0.35 + 0.1 * v - offset, "control_accuracy": 0.12}
        for position, offset in (("patch_mean", 0.0), ("cls", 0.05)) for v in range(vision_layers + 1)
    ])


def test_pixels_to_answer_puts_vision_projector_and_lm_layers_on_one_axis(tmp_path):
    # A prompt with text before the image has image-token rows of its own: not the projector's output.
    own = _metrics("m", 4).filter(pl.col("readout") == "image").with_columns(
        pl.lit("look_first").alias("prompt"), pl.lit("lexical").alias("family"), pl.lit(0.05).alias("accuracy"))
    metrics = pl.concat([_metrics("m", 4), own], how="diagonal_relaxed")
    spec = _save_and_load(pixels_to_answer_chart(metrics, _vision_metrics(3), _answer_readout(4), "m"),
                          tmp_path, "pixels_to_answer")
    upper, lower = spec["vconcat"]
    assert len(lower["hconcat"]) == 2  # the answer readout panel under it
    units = [_fields(u) | {"mark": _mark(u)} for u in _spec_layers(upper)]
    assert any(u["mark"] == "line" and u["x"] == "step" and u["y"] == "accuracy" for u in units)
    assert any(u["mark"] == "line" and u["y"] == "control_accuracy" for u in units)
    assert any(u["mark"] == "rule" and u.get("y") == "chance" for u in units)
    rows = next(d for d in spec["datasets"].values() if d and "step" in d[0])
    by = {(r["series"], r["step"]): r["accuracy"] for r in rows}
    # Vision layers 0..3 at steps 0..3; LM layer l at step 4 + l (layer 0 of the image tokens: the projector).
    assert by[("vision encoder (patch_mean)", 3)] == pytest.approx(0.6)
    assert by[("vision encoder (cls)", 0)] == pytest.approx(0.25)
    assert {s for s, step in by if step >= 4} == {"LM image tokens (image_mean)", "LM anchor prompt (last)"}
    assert max(step for _, step in by) == 4 + 4 and len(rows) == 2 * 4 + 2 * 5
    assert by[("LM anchor prompt (last)", 4 + 3)] == pytest.approx(0.8)
    # Ticks on existing steps only: every vision layer, LM 0 (the projector's output), the last LM layer.
    axis = next(u["encoding"]["x"]["axis"] for u in _spec_layers(upper) if "axis" in u.get("encoding", {}).get("x", {}))
    assert axis["values"] == [0, 1, 2, 3, 4, 8]


def test_depth_panel_has_one_row_per_model_with_stage_bands(tmp_path):
    metrics = pl.concat([_metrics("a", 4), _metrics("b", 8)])
    stages = pl.concat([stages_table(_metrics("a", 4), 4, 0.05, 0.05), stages_table(_metrics("b", 8), 8, 0.05, 0.05)])
    spec = _save_and_load(depth_panel(metrics, stages, "last"), tmp_path, "depth_panel")
    assert len(spec["vconcat"]) == 2
    units = [_fields(u) | {"mark": _mark(u)} for u in _spec_layers(spec)]
    rects = [u for u in units if u["mark"] == "rect"]
    assert all(u["x"] == "x0" and u["x2"] == "x1" and u["fill"] == "stage" for u in rects) and len(rects) == 2
    assert sum(u["mark"] == "line" and u["x"] == "depth" and u["y"] == "drop" for u in units) == 2
    band_rows = [r for d in spec["datasets"].values() for r in d if "stage" in r]
    assert {r["stage"] for r in band_rows} == {"visual_grounding", "semantic_reasoning"}
    assert all(0.0 <= r["x0"] < r["x1"] <= 1.0 for r in band_rows)


def test_job_functions_name_their_charts():
    charts = model_charts(_metrics("m", 4), _behaviour(), "m", 0.05, 0.05, _answer_readout())
    assert list(charts) == ["accuracy", "drop_heatmap", "answers", "answer_readout"]
    assert "m @ main:" in json.dumps(charts["accuracy"].to_dict()["title"])
    metrics = [_metrics("a", 4), _metrics("b", 8).filter(pl.col("position") != "last")]
    stages = [stages_table(m, n, 0.05, 0.05) for m, n in zip(metrics, (4, 8))]
    spec = depth_panel_chart(metrics, stages).to_dict()
    assert len(spec["vconcat"]) == 1  # "last" where probed: model b has only question_last (and image_mean)
    curve = loss_chart([3.0, 2.0, 1.5], "loss").to_dict()
    values = next(iter(curve["datasets"].values()))
    assert [v["loss"] for v in values] == [3.0, 2.0, 1.5] and [v["step"] for v in values] == [1, 2, 3]


def test_patching_chart_and_depth_panel_mark_causal_onsets(tmp_path):
    from stagelens.aggregate import patching_summary
    from test_patching import synthetic_scores

    from stagelens.figures import patching_chart

    stages = stages_table(_metrics("a", 4), 4, 0.05, 0.05)
    curves, onsets = patching_summary([(synthetic_scores([0.0, 0.1, 0.2, 0.9, 1.0]), 4)],
                                      [{"id": "neg_plane", "family": "negation", "expected": "no"}], stages, "a",
                                      n_bootstrap=100, ci=0.95, seed=0)
    spec = _save_and_load(patching_chart(curves, onsets, "patching"), tmp_path, "patching")
    units = [_fields(u) | {"mark": _mark(u)} for u in _spec_layers(spec)]
    assert any(u["mark"] == "line" and u["x"] == "layer" and u["y"] == "restored" for u in units)
    onset_units = [u for u in _spec_layers(spec) if u.get("transform") and "onset_layer" in json.dumps(u["transform"])]
    assert len(onset_units) == 1 and _mark(onset_units[0]) == "point"
    assert any("causal onset layer 3" in line for line in spec["title"]["subtitle"])
    panel = _save_and_load(depth_panel(_metrics("a", 4), stages, "last", onsets), tmp_path, "depth_panel")
    rules = [_fields(u) for u in _spec_layers(panel) if _mark(u) == "rule" and "x" in u.get("encoding", {})]
    assert {"onset"} <= {r["x"] for r in rules}
    rows = [r for d in panel["datasets"].values() for r in d if "onset" in r]
    assert [r["onset"] for r in rows] == [0.75]
