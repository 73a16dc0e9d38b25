"""Stage detection: which prompt family moves the probe at which layer, and the four stages from that.

The rule (also in the README):
1. A variant *reacts* at a layer when its paired drop against the anchor is significant
   (exact McNemar p < alpha), at least `min_drop`, and exceeds the largest drop of the neutral
   `control` variants at that layer by at least `min_drop` (a drop any edit would cause is no stage).
2. Each layer gets one label: `format` when a format variant reacts and either no lexical or
   negation variant reacts or the format drop exceeds the largest lexical and negation drops by
   `min_drop` (the answer's form matters most there); else `semantic` when a negation variant
   reacts and its drop exceeds the larger of the lexical and control drops by `min_drop`; else
   `lexical` when a lexical variant reacts; else `none`.
3. Visual grounding = the layers before the first labelled layer. Then, in the paper's order,
   each stage's onset is its first labelled layer at or after the previous stage's onset; a stage
   runs from its onset to the layer before the next found onset (the last to the last layer),
   and the first found stage starts at the first labelled layer.
"""

from __future__ import annotations

import polars as pl

STAGES = ("visual_grounding", "lexical_integration", "semantic_reasoning", "answer_decoding")
# The per-layer label whose onset opens each stage after visual grounding.
STAGE_LABEL = {"lexical_integration": "lexical", "semantic_reasoning": "semantic", "answer_decoding": "format"}
FAMILIES = ("lexical", "negation", "format")
CONTROL_FAMILY = "control"
REQUIRED = ("layer", "prompt", "family", "drop", "drop_p")


def layer_reactions(metrics: pl.DataFrame, min_drop: float, alpha: float) -> pl.DataFrame:
    """One row per layer: the control baseline, each family's largest drop and reaction, the label.

    `metrics` holds one row per layer x prompt (one token position) with at least
    layer, prompt, family, drop, drop_p. Anchor rows are ignored.
    """
    missing = [c for c in REQUIRED if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}")
    layers = metrics.select(pl.col("layer").unique().sort())
    control = (
        metrics.filter(pl.col("family") == CONTROL_FAMILY)
        .group_by("layer")
        .agg(pl.col("drop").max().clip(lower_bound=0.0).alias("control_drop"))
    )
    table = layers.join(control, on="layer", how="left").with_columns(pl.col("control_drop").fill_null(0.0))
    variants = metrics.filter(pl.col("family").is_in(FAMILIES)).join(
        table.select("layer", "control_drop"), on="layer"
    )
    variants = variants.with_columns(
        (
            (pl.col("drop_p") < alpha)
            & (pl.col("drop") >= min_drop)
            & (pl.col("drop") - pl.col("control_drop") >= min_drop)
        ).alias("reacts")
    )
    per_family = variants.group_by("layer", "family").agg(
        pl.col("drop").max().alias("max_drop"), pl.col("reacts").any().alias("reacts")
    )
    for family in FAMILIES:
        rows = per_family.filter(pl.col("family") == family).select(
            "layer", pl.col("max_drop").alias(f"{family}_drop"), pl.col("reacts").alias(f"{family}_reacts")
        )
        table = table.join(rows, on="layer", how="left").with_columns(
            pl.col(f"{family}_drop").fill_null(0.0), pl.col(f"{family}_reacts").fill_null(False)
        )
    semantic = pl.col("negation_reacts") & (
        pl.col("negation_drop") - pl.max_horizontal("lexical_drop", "control_drop") >= min_drop
    )
    # Late layers often still react to negation (the answer flips); format is read as the
    # stage's signal where it reacts alone or clearly more than every other family.
    format_led = pl.col("format_reacts") & (
        (~pl.col("lexical_reacts") & ~pl.col("negation_reacts"))
        | (pl.col("format_drop") - pl.max_horizontal("lexical_drop", "negation_drop") >= min_drop)
    )
    label = (
        pl.when(format_led)
        .then(pl.lit("format"))
        .when(semantic)
        .then(pl.lit("semantic"))
        .when(pl.col("lexical_reacts"))
        .then(pl.lit("lexical"))
        .otherwise(pl.lit("none"))
    )
    return table.with_columns(label.alias("label")).sort("layer")


def detect_stages(reactions: pl.DataFrame, num_layers: int) -> pl.DataFrame:
    """The four stages as layer ranges (and depth = layer / num_layers) from `layer_reactions`.

    Deterministic: depends only on the per-layer labels. Stages without evidence have
    detected = False and null ranges.
    """
    layers = reactions["layer"].to_list()
    labels = reactions["label"].to_list()
    labelled = [i for i, label in enumerate(labels) if label != "none"]
    first = labelled[0] if labelled else len(layers)
    onsets: dict[str, int] = {}
    previous = first
    for stage in STAGES[1:]:
        hit = next((i for i in range(previous, len(layers)) if labels[i] == STAGE_LABEL[stage]), None)
        if hit is not None:
            onsets[stage] = hit
            previous = hit
    found = list(onsets)
    if found:
        onsets[found[0]] = first  # the first found stage opens at the first reacting layer
    spans: dict[str, tuple[int, int] | None] = {"visual_grounding": (0, first - 1) if first > 0 else None}
    for k, stage in enumerate(found):
        end = onsets[found[k + 1]] - 1 if k + 1 < len(found) else len(layers) - 1
        spans[stage] = (onsets[stage], end)
    rows = []
    for order, stage in enumerate(STAGES):
        span = spans.get(stage)
        expected_label = STAGE_LABEL.get(stage, "none")
        if span is None:
            rows.append(
                {"stage": stage, "order": order, "detected": False, "start_layer": None, "end_layer": None,
                 "start_depth": None, "end_depth": None, "n_layers": 0, "support": None, "layers": []}
            )
            continue
        lo, hi = span
        members = [layers[i] for i in range(lo, hi + 1) if labels[i] == expected_label]
        rows.append(
            {
                "stage": stage,
                "order": order,
                "detected": True,
                "start_layer": layers[lo],
                "end_layer": layers[hi],
                "start_depth": layers[lo] / num_layers,
                "end_depth": layers[hi] / num_layers,
                "n_layers": hi - lo + 1,
                "support": len(members) / (hi - lo + 1),
                "layers": members,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "stage": pl.String, "order": pl.Int32, "detected": pl.Boolean, "start_layer": pl.Int64,
            "end_layer": pl.Int64, "start_depth": pl.Float64, "end_depth": pl.Float64,
            "n_layers": pl.Int64, "support": pl.Float64, "layers": pl.List(pl.Int64),
        },
    )
