"""Altair charts of the per-model tables; data are aggregated in polars before plotting.

Every chart is saved as PNG, SVG (rendered by vl-convert, no browser) and Vega-Lite JSON.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import altair as alt
import polars as pl

from stagelens.atomic import atomic_path
from stagelens.positions import IMAGE_PASS

STAGE_COLORS = {
    "visual_grounding": "#9ecae1",
    "lexical_integration": "#a1d99b",
    "semantic_reasoning": "#fdae6b",
    "answer_decoding": "#bcbddc",
}
FAMILY_COLORS = {
    "anchor": "#000000",
    "lexical": "#2ca02c",
    "negation": "#d62728",
    "format": "#9467bd",
    "control": "#7f7f7f",
}
IMAGE_COLOR = "#17becf"  # the image pass's readout (its rows' family is stagelens.positions.IMAGE_PASS)
ANSWER_COLORS = {"yes": "#1f77b4", "no": "#d62728", "1": "#aec7e8", "0": "#ff9896", "other": "#c7c7c7"}
FORMATS = ("png", "svg", "vl.json")


def _series(table: pl.DataFrame) -> pl.DataFrame:
    """Add `series` = "prompt (family)" ("image tokens (<position>)" for the image pass, "prompt
    (family), image tokens" for the image tokens of a prompt with text before the image) and an
    order that puts the anchor first, then by family."""
    families = list(FAMILY_COLORS)
    series = pl.col("prompt") + " (" + pl.col("family") + ")"
    if "readout" in table.columns:  # metrics rows (behaviour rows are per prompt only)
        image = "image_position" if "image_position" in table.columns else "position"
        series = (
            pl.when(pl.col("readout") != "image").then(series)
            .when(pl.col("prompt") == IMAGE_PASS).then(pl.lit("image tokens (") + pl.col(image) + ")")
            .otherwise(series + ", image tokens")
        )
    return table.with_columns(
        series.alias("series"),
        pl.col("family")
        .map_elements(lambda f: families.index(f) if f in families else len(families), return_dtype=pl.Int64)
        .alias("family_rank"),
    )


def _series_order(table: pl.DataFrame) -> list[str]:
    return table.select("family_rank", "series").unique().sort("family_rank", "series")["series"].to_list()


def _series_colors(table: pl.DataFrame) -> alt.Scale:
    """Colour each prompt by its family; several prompts of one family get lighter/darker shades."""
    pairs = table.select("family_rank", "series", "family").unique().sort("family_rank", "series")
    palette = ["#1f77b4", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    seen: dict[str, int] = {}
    colors = []
    for series, family in zip(pairs["series"], pairs["family"]):
        k = seen.get(family, 0)
        seen[family] = k + 1
        base = {**FAMILY_COLORS, IMAGE_PASS: IMAGE_COLOR}.get(family, palette[len(seen) % len(palette)])
        colors.append(base if k == 0 else _shade(base, k))
    return alt.Scale(domain=pairs["series"].to_list(), range=colors)


def _shade(hex_color: str, k: int) -> str:
    """A lighter variant of a colour for the k-th extra prompt of a family."""
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    mix = min(0.25 * k, 0.75)
    return "#" + "".join(f"{round(c + (255 - c) * mix):02x}" for c in rgb)


def prompt_rows(metrics: pl.DataFrame) -> pl.DataFrame:
    """The prompt-dependent positions' rows (those stage detection reads)."""
    return metrics.filter(pl.col("readout") == "prompt")


def movable_rows(metrics: pl.DataFrame) -> pl.DataFrame:
    """The rows a prompt can move: the prompt rows, and the image-token rows of the prompts with
    text before the image (the image pass's rows have no drop)."""
    return metrics.filter((pl.col("readout") == "prompt") | (pl.col("prompt") != IMAGE_PASS))


def _with_image_reference(metrics: pl.DataFrame) -> pl.DataFrame:
    """The prompt rows, plus the image-token rows (the image pass's, and those of prompts with text
    before the image) copied into every prompt position's facet (one curve per image position and
    readout; its own position kept in `image_position`)."""
    prompts = prompt_rows(metrics).with_columns(pl.lit(None, pl.String).alias("image_position"))
    image = metrics.filter(pl.col("readout") == "image")
    copies = [
        image.with_columns(pl.col("position").alias("image_position"), pl.lit(position).alias("position"))
        for position in prompts["position"].unique(maintain_order=True).to_list()
    ]
    return pl.concat([prompts, *copies], how="diagonal_relaxed")


def accuracy_chart(metrics: pl.DataFrame, title: str) -> alt.Chart:
    """Probe accuracy vs layer per prompt with bootstrap CI bands, control probe and chance; the
    image-token readout (the image pass: the same for every prompt) as one reference curve, and
    that of each prompt with text before the image as a dashed curve of its own."""
    if "probe_converged" not in metrics.columns:  # tables written before fits were recorded
        metrics = metrics.with_columns(pl.lit(True).alias("probe_converged"))
    data = _series(_with_image_reference(metrics)).select(
        "readout", "position", "layer", "prompt", "family", "series", "family_rank", "accuracy",
        "accuracy_ci_low", "accuracy_ci_high", "control_accuracy", "chance", "n", "probe_converged",
    )
    color = alt.Color("series:N", title="prompt (family)", scale=_series_colors(data), sort=_series_order(data),
                      legend=alt.Legend(symbolType="stroke", symbolOpacity=1, symbolStrokeWidth=3))
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d"))
    y_scale = alt.Scale(domain=[0, 1])
    # The anchor is drawn wider so it shows where a variant's line lies on top of it; the image
    # readout dashed: a reference no prompt can move.
    width = alt.condition(alt.datum.family == "anchor", alt.value(4), alt.value(2))
    dash = alt.condition(alt.datum.readout == "image", alt.value([6, 3]), alt.value([1, 0]))
    # Every layer reads the one faceted data set (a layer with its own data would not be faceted).
    band = alt.Chart().mark_area(opacity=0.12).encode(
        x=x, y=alt.Y("accuracy_ci_low:Q", scale=y_scale), y2="accuracy_ci_high:Q", color=color
    )
    lines = alt.Chart().mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=x,
        y=alt.Y("accuracy:Q", title="probe accuracy (test)", scale=y_scale),
        color=color,
        strokeWidth=width,
        strokeDash=dash,
        tooltip=["series", "layer", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("accuracy_ci_low:Q", format=".3f"), alt.Tooltip("accuracy_ci_high:Q", format=".3f"), "n"],
    )
    control_line = (
        alt.Chart()
        .transform_filter(alt.datum.family == "anchor")
        .mark_line(color="#7f7f7f", strokeDash=[5, 3])
        .encode(x=x, y="control_accuracy:Q")
    )
    chance_rule = alt.Chart().mark_rule(color="#7f7f7f", strokeDash=[1, 3]).encode(y="mean(chance):Q")
    # A probe whose fit stopped at max_iter is drawn with a red cross on the anchor's line.
    unconverged = (
        alt.Chart()
        .transform_filter((alt.datum.family == "anchor") & ~alt.datum.probe_converged)
        .mark_point(shape="cross", color="#d62728", size=120, filled=True)
        .encode(x=x, y="accuracy:Q", tooltip=["layer", alt.Tooltip("probe_converged:N", title="probe fit converged")])
    )
    subtitle = ["bands: bootstrap CI; dashed colour: image tokens (read once per image, the same under every "
                "prompt without text before the image; a prompt with it: its own, in its colour); "
                "dashed grey: shuffled-label control probe; dotted: chance"]
    stuck = (
        metrics.filter(~pl.col("probe_converged"))
        .select(pl.when(pl.col("readout") == "image").then(pl.lit("image tokens ") + pl.col("position"))
                .otherwise(pl.col("position")).alias("where"), "layer")
        .unique().sort("where", "layer")
    )
    if len(stuck):
        listed = ", ".join(f"{where} layer {layer}" for where, layer in stuck.rows())
        subtitle.append(f"red cross: probe fit did not converge (max_iter reached): {listed}")
    return (
        alt.layer(band, lines, control_line, chance_rule, unconverged)
        .properties(width=320, height=240)
        .facet(column=alt.Column("position:N", title="token position"), data=data)
        .properties(title=alt.Title(title, subtitle=subtitle))
    )


def drop_heatmap(metrics: pl.DataFrame, title: str, alpha: float, min_drop: float) -> alt.Chart:
    """Layer x prompt heatmap of the paired accuracy drop against the anchor; * = significant.
    Rows a prompt can move only: the image tokens only for prompts with text before the image."""
    data = _series(movable_rows(metrics).filter(pl.col("family") != "anchor")).with_columns(
        ((pl.col("drop_p") < alpha) & (pl.col("drop") >= min_drop)).alias("significant")
    ).select("position", "layer", "series", "family_rank", "drop", "drop_ci_low", "drop_ci_high", "drop_p", "significant")
    limit = max(0.05, float(data["drop"].abs().max() or 0.0))
    base = alt.Chart().encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("series:N", title=None, sort=_series_order(data)),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("drop:Q", title="accuracy drop vs anchor",
                        scale=alt.Scale(scheme="redblue", reverse=True, domain=[-limit, limit])),
        tooltip=["series", "layer", alt.Tooltip("drop:Q", format=".3f"), alt.Tooltip("drop_ci_low:Q", format=".3f"),
                 alt.Tooltip("drop_ci_high:Q", format=".3f"), alt.Tooltip("drop_p:Q", format=".2g")],
    )
    marks = base.mark_text(fontSize=11).encode(text=alt.Text("star:N")).transform_filter(
        alt.datum.significant
    ).transform_calculate(star="'*'")
    return (
        alt.layer(cells, marks)
        .properties(width=alt.Step(16), height=alt.Step(22))
        .facet(row=alt.Row("position:N", title="token position"), data=data)
        .properties(title=alt.Title(title, subtitle=f"red: variant lowers accuracy; *: p < {alpha:g} and drop >= {min_drop:g}"))
    )


def answers_chart(behaviour: pl.DataFrame, title: str) -> alt.Chart:
    """Share of the model's own answers per prompt (case-folded), with agreement with the expected answer."""
    wide = _series(behaviour)
    long = wide.unpivot(
        index=["series", "family_rank", "expected", "agreement"],
        on=["share_yes", "share_no", "share_1", "share_0"],
        variable_name="answer",
        value_name="share",
    ).with_columns(pl.col("answer").str.replace("share_", ""))
    other = wide.select(
        "series", "family_rank", "expected", "agreement",
        (1.0 - pl.sum_horizontal("share_yes", "share_no", "share_1", "share_0")).clip(lower_bound=0.0).alias("share"),
    ).with_columns(pl.lit("other").alias("answer"))
    long = pl.concat([long, other.select(long.columns)]).with_columns(
        pl.col("answer").map_elements(list(ANSWER_COLORS).index, return_dtype=pl.Int64).alias("answer_rank")
    )
    order = _series_order(wide)
    y = alt.Y("series:N", title=None, sort=order)
    bars = alt.Chart(long).mark_bar().encode(
        x=alt.X("share:Q", title="share of answers", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=y,
        color=alt.Color("answer:N", title="answer", legend=alt.Legend(orient="bottom"),
                        scale=alt.Scale(domain=list(ANSWER_COLORS), range=list(ANSWER_COLORS.values()))),
        order=alt.Order("answer_rank:Q"),
        tooltip=["series", "answer", alt.Tooltip("share:Q", format=".1%")],
    )
    def percent(column: str) -> pl.Expr:
        return (pl.col(column) * 100).round(0).cast(pl.Int64).cast(pl.String) + "%"

    label = "expects " + pl.col("expected") + ": " + percent("agreement") + " agree"
    if "yes_to_no" in wide.columns:  # paired with the anchor: how many yes answers flipped to no
        label = label + pl.when(pl.col("family") == "anchor").then(pl.lit("")).otherwise(
            ", yes→no vs anchor " + percent("yes_to_no"))
    agreement = wide.with_columns(label.alias("label")).select("series", "label")
    text = alt.Chart(agreement).mark_text(align="left", dx=6, fontSize=11).encode(
        y=y, x=alt.value(320), text="label:N"
    )
    return alt.layer(bars, text).properties(width=320, height=alt.Step(24), title=alt.Title(
        title, subtitle="the model's own next-token answer per test image (case-folded)"))


# The prompts whose answer readout is drawn: where the class is asked, negated and reformatted.
READOUT_FAMILIES = ("anchor", "negation", "format")
# Readout probabilities are drawn on a log scale; smaller ones (float32 underflow) sit on this floor.
P_FLOOR = 1e-12


def answer_readout_chart(readout: pl.DataFrame, title: str) -> alt.HConcatChart:
    """The answer readout per layer for the anchor, negation and format prompts: the mean readout
    probability of each prompt's answer pair (yes / no, or 1 / 0 where it expects a digit) on a
    log scale, and the mean margin towards its expected answer (> 0: the layer favours it)."""
    data = _series(readout.filter(pl.col("family").is_in(READOUT_FAMILIES)))
    if data.is_empty():
        raise ValueError(f"no {', '.join(READOUT_FAMILIES)} prompt in the answer readout table")
    digits = pl.col("expected").is_in(["1", "0"])
    pairs = [
        data.with_columns(
            pl.when(digits).then(pl.lit(positive)).otherwise(pl.lit(word)).alias("answer"),
            pl.when(digits).then(pl.col(f"mean_p_{positive}")).otherwise(pl.col(f"mean_p_{word}")).alias("p"),
            pl.lit(role).alias("role"),
        )
        for word, positive, role in (("yes", "1", "yes / 1"), ("no", "0", "no / 0"))
    ]
    long = pl.concat(pairs).with_columns(pl.col("p").clip(lower_bound=P_FLOOR)).select(
        "series", "family_rank", "family", "layer", "answer", "role", "p")
    color = alt.Color("series:N", title="prompt (family)", scale=_series_colors(data), sort=_series_order(data),
                      legend=alt.Legend(symbolType="stroke", symbolOpacity=1, symbolStrokeWidth=3))
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d"))
    width = alt.condition(alt.datum.family == "anchor", alt.value(3), alt.value(2))
    probability = alt.Chart(long).mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        x=x,
        y=alt.Y("p:Q", title="mean readout probability", scale=alt.Scale(type="log")),
        color=color,
        # The subtitle says which dash is which (a dash legend renders without its strokes here).
        strokeDash=alt.StrokeDash("role:N", scale=alt.Scale(domain=["yes / 1", "no / 0"], range=[[1, 0], [5, 3]]),
                                  legend=None),
        strokeWidth=width,
        detail="answer:N",
        tooltip=["series", "layer", "answer", alt.Tooltip("p:Q", format=".3g")],
    )
    margin_data = data.select("series", "family_rank", "family", "layer", "expected", "mean_margin", "share_expected_ahead")
    margin = alt.Chart(margin_data).mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        x=x,
        y=alt.Y("mean_margin:Q", title="mean margin: log P(expected) − log P(opposite)"),
        color=color,
        strokeWidth=width,
        tooltip=["series", "layer", "expected", alt.Tooltip("mean_margin:Q", format=".2f"),
                 alt.Tooltip("share_expected_ahead:Q", format=".0%", title="images favouring the expected answer")],
    )
    zero = alt.Chart(pl.DataFrame({"y": [0.0]})).mark_rule(color="#7f7f7f", strokeDash=[1, 3]).encode(y="y:Q")
    subtitle = ["the model's own final norm and unembedding applied to each layer's last-token state (test images); "
                "the last layer is the model's own answer",
                "left: solid yes (1 for format prompts), dashed no (0), log scale; right: > 0 where the layer "
                "favours the prompt's expected answer (negation expects no, format 1)"]
    return alt.hconcat(
        probability.properties(width=320, height=240),
        alt.layer(margin, zero).properties(width=320, height=240),
    ).resolve_scale(color="shared").properties(title=alt.Title(title, subtitle=subtitle))


VISION_COLOR = "#8c564b"  # the vision encoder's layers (patch mean solid, CLS lighter)


def pixels_to_answer_data(metrics: pl.DataFrame, vision_metrics: pl.DataFrame) -> pl.DataFrame:
    """Class-probe accuracy on one axis from pixels to answer: `step` 0..V the vision layers, then
    V+1+l the LM's layer l: the image tokens' mean (layer 0: the projector's output as the LM gets
    it) and the anchor at its last token (`last` where kept, else the first prompt position)."""
    columns = ["series", "step", "layer", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "control_accuracy", "chance"]
    V = int(vision_metrics["num_layers"][0])
    vision = vision_metrics.with_columns((pl.lit("vision encoder (") + pl.col("position") + pl.lit(")")).alias("series"),
                                         pl.col("layer").alias("step"))
    # The image pass's rows (a prompt with text before the image has image-token rows of its own).
    image = metrics.filter((pl.col("readout") == "image") & (pl.col("prompt") == IMAGE_PASS)
                           & (pl.col("position") == "image_mean"))
    anchor = metrics.filter((pl.col("readout") == "prompt") & (pl.col("family") == "anchor"))
    positions = anchor["position"].unique().to_list()
    anchor = anchor.filter(pl.col("position") == ("last" if "last" in positions else sorted(positions)[0]))
    lm = pl.concat([
        image.with_columns(pl.lit("LM image tokens (image_mean)").alias("series")),
        anchor.with_columns((pl.lit("LM anchor prompt (") + pl.col("position") + pl.lit(")")).alias("series")),
    ], how="diagonal_relaxed").with_columns((pl.col("layer") + V + 1).alias("step"))
    return pl.concat([vision.select(columns), lm.select(columns)], how="vertical_relaxed").sort("series", "step")


def _layer_ticks(last: int, every: int) -> list[int]:
    """0..last in steps of `every` (fewer when there are many layers), the last layer always included."""
    step = max(every, (last + 11) // 12)
    return sorted(set(range(0, last + 1, step)) | {last})


def pixels_to_answer_chart(metrics: pl.DataFrame, vision_metrics: pl.DataFrame, answer_readout: pl.DataFrame,
                           title: str) -> alt.VConcatChart:
    """Where the class is readable from pixels to answer (class-probe accuracy along the vision
    encoder's layers, the projector, the LM's layers; chance dotted, each series' shuffled-label
    control dashed) above where the answer appears (`answer_readout_chart`)."""
    data = pixels_to_answer_data(metrics, vision_metrics)
    V = int(vision_metrics["num_layers"][0])
    series = data["series"].unique(maintain_order=True).to_list()
    palette = {"vision encoder (patch_mean)": VISION_COLOR, "vision encoder (cls)": _shade(VISION_COLOR, 2),
               "LM image tokens (image_mean)": IMAGE_COLOR}
    color = alt.Color("series:N", title="probed vectors", scale=alt.Scale(
        domain=series, range=[palette.get(s, FAMILY_COLORS["anchor"]) for s in series]),
        legend=alt.Legend(symbolType="stroke", symbolOpacity=1, symbolStrokeWidth=3))
    labels = f"datum.value <= {V} ? 'V' + datum.value : 'L' + (datum.value - {V + 1})"
    last = int(data["step"].max())
    # Ticks on the steps that exist (LM 0 included), not on a 'nice' grid that would label a
    # layer past the last one; every vision layer, the LM's every ~5th.
    ticks = _layer_ticks(V, 1) + [V + 1 + layer for layer in _layer_ticks(last - V - 1, 5)]
    x = alt.X("step:Q", title=f"vision layer V0..V{V} | projector -> LM layer 0 | LM layers",
              axis=alt.Axis(values=ticks, format="d", labelExpr=labels, labelOverlap=False), scale=alt.Scale(domain=[0, last], nice=False))
    y_scale = alt.Scale(domain=[0, 1])
    base = alt.Chart(data)
    band = base.mark_area(opacity=0.12).encode(x=x, y=alt.Y("accuracy_ci_low:Q", scale=y_scale), y2="accuracy_ci_high:Q",
                                               color=color, detail="series:N")
    lines = base.mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=x, y=alt.Y("accuracy:Q", title="class-probe accuracy (test)", scale=y_scale), color=color,
        tooltip=["series", "layer", alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip("control_accuracy:Q", format=".3f")],
    )
    control = base.mark_line(strokeDash=[5, 3], opacity=0.6, strokeWidth=1).encode(x=x, y="control_accuracy:Q", color=color)
    chance = base.mark_rule(color="#7f7f7f", strokeDash=[1, 3]).encode(y="mean(chance):Q")
    boundary = alt.Chart(pl.DataFrame({"x": [V + 0.5], "label": ["projector"]})).mark_rule(color="#7f7f7f").encode(x="x:Q")
    boundary_text = alt.Chart(pl.DataFrame({"x": [V + 0.5], "label": ["projector"]})).mark_text(
        align="left", dx=3, dy=-110, color="#7f7f7f").encode(x="x:Q", text="label:N")
    upper = alt.layer(band, lines, control, chance, boundary, boundary_text).properties(
        width=660, height=240,
        title=alt.Title("where the class is readable", subtitle=[
            "bands: bootstrap CI; dashed: each series' shuffled-label control probe; dotted: chance; "
            "LM 0 of the image tokens is the projector's output as the LM receives it"]))
    lower = answer_readout_chart(answer_readout, "where the answer appears")
    return alt.vconcat(upper, lower).resolve_scale(color="independent").properties(title=title)


def patching_chart(curves: pl.DataFrame, onsets: pl.DataFrame, title: str) -> alt.Chart:
    """Restored fraction of the anchor-variant answer gap by patched layer, per variant (colour),
    one panel per direction (columns) and patched position (rows); CI bands; the onset threshold
    dashed; each variant's causal onset as a triangle."""
    keys = ["prompt", "position", "direction"]
    data = _series(curves.join(onsets.select(*keys, "onset_layer"), on=keys, how="left"))
    color = alt.Color("series:N", title="variant (family)", scale=_series_colors(data), sort=_series_order(data))
    x = alt.X("layer:Q", title="patched layer", axis=alt.Axis(tickMinStep=1, format="d"))
    band = alt.Chart().mark_area(opacity=0.15).encode(x=x, y="restored_ci_low:Q", y2="restored_ci_high:Q", color=color)
    lines = alt.Chart().mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=x,
        y=alt.Y("restored:Q", title="share of the answer gap restored"),
        color=color,
        tooltip=["series", "direction", "layer", alt.Tooltip("restored:Q", format=".2f"),
                 alt.Tooltip("restored_ci_low:Q", format=".2f"), alt.Tooltip("restored_ci_high:Q", format=".2f"), "n"],
    )
    # Every layer reads the one faceted data set; the onset is the row whose layer is its onset.
    onset = alt.Chart().transform_filter("datum.layer === datum.onset_layer").mark_point(
        shape="triangle-down", size=140, filled=True, yOffset=-10
    ).encode(x=x, y="restored:Q", color=color, tooltip=["series", "direction", alt.Tooltip("onset_layer:Q", title="causal onset")])
    threshold = alt.Chart().mark_rule(color="#555555", strokeDash=[5, 3]).encode(y=alt.datum(float(onsets["threshold"][0])))
    zero = alt.Chart().mark_rule(color="#bbbbbb").encode(y=alt.datum(0.0))
    chart = alt.layer(band, lines, onset, threshold, zero).properties(width=280, height=200).facet(
        column=alt.Column("direction:N", title="patched direction (source_to_target)"),
        row=alt.Row("position:N", title="patched position"),
        data=data,
    )
    return chart.properties(title=alt.Title(title, subtitle=_onset_subtitle(onsets)))


def _onset_subtitle(onsets: pl.DataFrame) -> list[str]:
    """One line per variant x direction x position: the causal onset with its CI, the probing onset beside it."""
    lines = ["bands: bootstrap CI over images; dashed: the onset threshold (half the gap)"]
    for row in onsets.sort("prompt", "position", "direction").iter_rows(named=True):
        if row["onset_layer"] is None:
            text = "no onset" if row["has_gap"] else "no gap (the variant does not move the answer)"
        else:
            high = "beyond L" if row["onset_ci_high"] is None else f"{row['onset_ci_high']:g}"
            text = f"causal onset layer {row['onset_layer']} (CI {row['onset_ci_low']:g}-{high})"
        probing = row.get("probing_onset_layer")
        if row.get("probing_stage"):
            text += f"; probing {row['probing_stage']}: " + ("not detected" if probing is None else f"layer {probing}")
        lines.append(f"{row['prompt']} {row['direction']} [{row['position']}]: {text}")
    return lines


def depth_panel(metrics: pl.DataFrame, stages: pl.DataFrame, position: str,
                onsets: pl.DataFrame | None = None) -> alt.VConcatChart:
    """Drop vs normalised depth per model (one row each), the detected stages shaded behind; with
    `onsets`, each patched variant's causal onset (anchor_to_variant, last token) as a vertical
    rule in the variant's colour, its CI as a bar along the top. Prompt-dependent rows only."""
    metrics = prompt_rows(metrics)
    variants = _series(metrics.filter((pl.col("position") == position) & (pl.col("family") != "anchor")))
    color = alt.Color("series:N", title="prompt (family)", scale=_series_colors(variants), sort=_series_order(variants))
    # One y range for all models (comparable rows), never narrower than -0.05..0.1.
    y_scale = alt.Scale(domain=[min(-0.05, float(variants["drop"].min() or 0.0)),
                                max(0.1, float(variants["drop"].max() or 0.0))], nice=True)
    rows = []
    for model in metrics["model"].unique().sort().to_list():
        part = _series(metrics.filter((pl.col("model") == model) & (pl.col("position") == position)
                                       & (pl.col("family") != "anchor")))
        if part.is_empty():
            continue
        num_layers = int(part["num_layers"][0])
        bands = stages.filter((pl.col("model") == model) & (pl.col("position") == position) & pl.col("detected")).select(
            "stage", "start_layer", "end_layer",
            ((pl.col("start_layer") - 0.5) / num_layers).clip(0.0, 1.0).alias("x0"),
            ((pl.col("end_layer") + 0.5) / num_layers).clip(0.0, 1.0).alias("x1"),
        )
        shade = alt.Chart(bands).mark_rect(opacity=0.45).encode(
            x=alt.X("x0:Q", title="normalised depth (layer / L)", scale=alt.Scale(domain=[0, 1])),
            x2="x1:Q",
            fill=alt.Fill("stage:N", title="detected stage", sort=list(STAGE_COLORS),
                          scale=alt.Scale(domain=list(STAGE_COLORS), range=list(STAGE_COLORS.values()))),
            tooltip=["stage", "start_layer", "end_layer"],
        )
        lines = alt.Chart(part.select("depth", "layer", "series", "family", "drop")).mark_line(
            point=alt.OverlayMarkDef(size=14)
        ).encode(
            x=alt.X("depth:Q", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("drop:Q", title="accuracy drop vs anchor", scale=y_scale),
            color=color,
            tooltip=["series", "layer", alt.Tooltip("depth:Q", format=".2f"), alt.Tooltip("drop:Q", format=".3f")],
        )
        zero = alt.Chart(pl.DataFrame({"y": [0.0]})).mark_rule(color="#555555").encode(y="y:Q")
        layers = [shade, zero, lines]
        if onsets is not None:
            causal = _series(onsets.filter(
                (pl.col("model") == model) & (pl.col("position") == "last")
                & (pl.col("direction") == "anchor_to_variant") & pl.col("onset_layer").is_not_null()
            )).with_columns(
                (pl.col("onset_layer") / num_layers).alias("onset"),
                (pl.col("onset_ci_low") / num_layers).alias("ci0"),
                (pl.col("onset_ci_high").fill_null(float(num_layers)) / num_layers).alias("ci1"),
            ).select("series", "onset_layer", "onset", "ci0", "ci1", "probing_stage", "probing_onset_layer")
            if not causal.is_empty():
                rule_color = alt.Color("series:N", scale=_series_colors(variants), sort=_series_order(variants), legend=None)
                tooltip = ["series", "onset_layer", "probing_stage", "probing_onset_layer"]
                layers.append(alt.Chart(causal).mark_rule(strokeDash=[6, 2], strokeWidth=2).encode(
                    x="onset:Q", color=rule_color, tooltip=tooltip))
                layers.append(alt.Chart(causal).mark_rule(strokeWidth=5, opacity=0.6).encode(
                    x="ci0:Q", x2="ci1:Q", y=alt.datum(y_scale.domain[1]), color=rule_color, tooltip=tooltip))
        rows.append(alt.layer(*layers).properties(
            width=460, height=150, title=f"{model} (L = {num_layers}, position {position})"))
    if not rows:
        raise ValueError(f"no metrics rows for position {position!r}")
    subtitle = ["shaded: detected stages (probing); x: layer / number of decoder blocks"]
    if onsets is not None:
        subtitle.append("dashed rules: causal onsets (patching the anchor into the variant at the last token "
                        "restores half the answer gap from there on); bars on top: their CIs")
    return alt.vconcat(*rows).properties(
        title=alt.Title("Accuracy drop against the anchor across models", subtitle=subtitle)
    )


def model_charts(metrics: pl.DataFrame, behaviour: pl.DataFrame, model: str, alpha: float, min_drop: float,
                 answer_readout: pl.DataFrame | None = None) -> dict[str, alt.TopLevelMixin]:
    """The figures job: one model's charts by figure name (accuracy, drop_heatmap, answers, and
    answer_readout where its table is given)."""
    revision = metrics["revision"][0]
    charts = {
        "accuracy": accuracy_chart(metrics, f"{model} @ {revision}: class-probe accuracy by layer"),
        "drop_heatmap": drop_heatmap(metrics, f"{model} @ {revision}: accuracy drop against the anchor", alpha, min_drop),
        "answers": answers_chart(behaviour, f"{model} @ {revision}: the model's own answers"),
    }
    if answer_readout is not None:
        charts["answer_readout"] = answer_readout_chart(answer_readout, f"{model} @ {revision}: the answer readout by layer")
    return charts


def depth_panel_chart(
    metrics: Sequence[pl.DataFrame], stages: Sequence[pl.DataFrame], onsets: Sequence[pl.DataFrame] = ()
) -> alt.VConcatChart:
    """The depth_panel job: every model's drop on normalised depth, at the `last` position if probed
    (else the first prompt-dependent one: the stages tables hold only those); with the models'
    causal onsets tables where patching ran."""
    metrics_all = pl.concat(list(metrics), how="diagonal_relaxed")
    stages_all = pl.concat(list(stages), how="diagonal_relaxed")
    onsets_all = pl.concat(list(onsets), how="diagonal_relaxed") if onsets else None
    positions = stages_all["position"].unique().to_list()
    return depth_panel(metrics_all, stages_all, "last" if "last" in positions else sorted(positions)[0], onsets_all)


def loss_chart(losses: Sequence[float], title: str) -> alt.Chart:
    """A training loss curve by step (the embedded model's projector training)."""
    curve = pl.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": list(losses)})
    return (
        alt.Chart(curve.to_pandas())
        .mark_line()
        .encode(x=alt.X("step:Q", title="training step"), y=alt.Y("loss:Q", title="answer-token cross-entropy"))
        .properties(title=title, width=420, height=240)
    )


def save_chart(chart: alt.TopLevelMixin, stem: str | os.PathLike, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write `<stem>.<format>` for each of `formats` (default png, svg, vl.json), each atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(target) as tmp:
            if fmt == "vl.json":
                tmp.write_text(chart.to_json(indent=2) + "\n")
            elif fmt == "png":
                chart.save(str(tmp), format="png", scale_factor=2)
            else:
                chart.save(str(tmp), format=fmt)
        written.append(target)
    return written
