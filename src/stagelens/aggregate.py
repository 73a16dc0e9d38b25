"""Per-model tables: tidy metrics, the model's own answers per prompt, the detected stages, the
answer readout per prompt x layer, and the vision-encoder probe metrics per vision layer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import polars as pl

from stagelens.adapters.base import ANSWER_WORDS
from stagelens.atomic import atomic_path
from stagelens.causal import patching_tables
from stagelens.stages import detect_stages, layer_reactions

# The answers a prompt can expect: ANSWER_WORDS case-folded ("Yes" counts as "yes"), in order.
ANSWER_CLASSES = tuple(dict.fromkeys(word.lower() for word in ANSWER_WORDS))
# The answers-file probability columns of each class, e.g. yes -> (p_yes, p_Yes).
_PROBABILITY_COLUMNS = {c: tuple(f"p_{w}" for w in ANSWER_WORDS if w.lower() == c) for c in ANSWER_CLASSES}
KEYS = ("model", "position", "layer", "prompt")
# The probing stage each variant family opens (stages.STAGE_LABEL, read by family), set beside
# that family's causal onset; the probing stages are read at the last token, where patching acts.
FAMILY_STAGE = {"lexical": "lexical_integration", "negation": "semantic_reasoning", "format": "answer_decoding"}
# Identifying columns first, metrics after, in the order a reader scans a row.
LEADING = ("model", "model_id", "revision", "readout", "position", "layer", "num_layers", "depth", "prompt", "family",
           "expected")


def metrics_table(rows: Iterable[pl.DataFrame], num_layers: int) -> pl.DataFrame:
    """Concatenate per-job metric rows, add depth = layer / num_layers, sort by the keys."""
    table = pl.concat(list(rows), how="diagonal_relaxed")
    duplicated = table.select(list(KEYS)).is_duplicated()
    if duplicated.any():
        raise ValueError(f"duplicate metrics rows for {table.filter(duplicated).select(list(KEYS)).head(3).rows()}")
    table = table.with_columns((pl.col("layer") / num_layers).alias("depth")).sort(list(KEYS))
    first = [c for c in LEADING if c in table.columns]
    return table.select(*first, pl.exclude(first))


def fit_table(probe_sidecars: Iterable[Mapping], control_sidecars: Iterable[Mapping]) -> pl.DataFrame:
    """Whether each layer's probe and control fit converged, from the probes' JSON sidecars.

    One row per position x layer: probe_converged, probe_n_iter, control_converged. A fit that
    stopped at max_iter is still used (its accuracy is what it is) but must not pass unnoticed.
    """
    rows: dict[tuple[str, int], dict[str, object]] = {}
    for kind, sidecars in (("probe", probe_sidecars), ("control", control_sidecars)):
        for sidecar in sidecars:
            layer = int(sidecar["input"]["layer"])
            for position, fit in sidecar["fit"].items():
                row = rows.setdefault((position, layer), {"position": position, "layer": layer})
                row[f"{kind}_converged"] = bool(fit["converged"])
                row[f"{kind}_n_iter"] = int(fit["n_iter"])
    columns = {"position": pl.String, "layer": pl.Int64, "probe_converged": pl.Boolean, "probe_n_iter": pl.Int64,
               "control_converged": pl.Boolean, "control_n_iter": pl.Int64}
    return pl.DataFrame(list(rows.values()), schema=columns).sort("position", "layer")


def read_fits(probe_sidecars: Sequence[str | os.PathLike], control_sidecars: Sequence[str | os.PathLike]) -> pl.DataFrame:
    """`fit_table` of the probes' and controls' JSON sidecar files."""
    def read(paths: Sequence[str | os.PathLike]) -> list[Mapping]:
        return [json.loads(Path(path).read_text()) for path in paths]

    return fit_table(read(probe_sidecars), read(control_sidecars))


def read_by_prompt(prompts: Sequence[Mapping[str, str]], paths: Sequence[str | os.PathLike]) -> dict[str, pl.DataFrame]:
    """Each prompt's Parquet table by prompt id; `paths` come in the prompts' order (the rule's inputs)."""
    if len(prompts) != len(paths):
        raise ValueError(f"{len(prompts)} prompts but {len(paths)} files: {[str(p) for p in paths]}")
    return {prompt["id"]: pl.read_parquet(path) for prompt, path in zip(prompts, paths)}


def with_fits(metrics: pl.DataFrame, fits: pl.DataFrame) -> pl.DataFrame:
    """The metrics table with each row's probe convergence columns (every row must find its fit)."""
    joined = metrics.join(fits, on=["position", "layer"], how="left")
    missing = joined.filter(pl.col("probe_converged").is_null()).select("position", "layer").unique()
    if len(missing):
        raise ValueError(f"no probe fit record for (position, layer) {missing.sort('position', 'layer').rows()}")
    return joined


def fit_warnings(fits: pl.DataFrame) -> list[str]:
    """One line per position x layer whose probe or control fit stopped at max_iter."""
    stuck = fits.filter(~pl.col("probe_converged") | ~pl.col("control_converged"))
    return [
        f"WARNING: layer {row['layer']} ({row['position']}): fit did not converge (max_iter reached): "
        f"probe converged={row['probe_converged']}, control converged={row['control_converged']}"
        for row in stuck.iter_rows(named=True)
    ]


def behaviour_row(
    answers: pl.DataFrame, prompt: Mapping[str, str], anchor_answers: pl.DataFrame | None = None
) -> dict[str, object]:
    """What the model itself answered to one prompt: shares of yes/no/1/0 and agreement.

    Answers are case-folded ("Yes" counts as "yes"); agreement is the share equal to the
    prompt's expected answer. With the anchor's answers (paired by sample_id), also the share
    of images whose answer changed and the share that went from yes to no (the flip a
    negation should cause).
    """
    if "answer" not in answers.columns:
        raise ValueError(f"answers of prompt {prompt['id']!r} lack the `answer` column")
    folded = answers["answer"].str.to_lowercase()
    n = len(answers)
    row: dict[str, object] = {
        "prompt": prompt["id"],
        "family": prompt["family"],
        "expected": prompt["expected"],
        "n": n,
    }
    for word in ANSWER_CLASSES:
        row[f"share_{word}"] = float((folded == word).mean()) if n else None
    row["agreement"] = float((folded == prompt["expected"].lower()).mean()) if n else None
    for word, columns in _PROBABILITY_COLUMNS.items():
        present = [c for c in columns if c in answers.columns]
        row[f"mean_p_{word}"] = float(answers.select(pl.sum_horizontal(present)).to_series().mean()) if present and n else None
    if anchor_answers is not None:
        paired = answers.select("sample_id", pl.col("answer").str.to_lowercase()).join(
            anchor_answers.select("sample_id", pl.col("answer").str.to_lowercase().alias("anchor")), on="sample_id"
        )
        if len(paired) != n or len(anchor_answers) != n:
            raise ValueError(f"answers of prompt {prompt['id']!r} and the anchor's cover different images")
        row["changed_vs_anchor"] = float((paired["answer"] != paired["anchor"]).mean()) if n else None
        row["yes_to_no"] = float(((paired["anchor"] == "yes") & (paired["answer"] == "no")).mean()) if n else None
    return row


def answer_readout_table(readout: pl.DataFrame, prompt: Mapping[str, str], num_layers: int) -> pl.DataFrame:
    """One prompt's answer readout (extraction's per image x layer file) summarised per layer.

    mean_p_<answer>: mean readout probability of each answer, case variants summed; mean_p_expected:
    that of the prompt's expected answer; mean_margin: mean log P(expected) - log P(opposite);
    share_expected_ahead: share of images whose margin is > 0 (the expected answer outweighs its
    opposite at that layer).
    """
    missing = [c for c in ("sample_id", "layer", "margin", *(f"p_{w}" for w in ANSWER_WORDS)) if c not in readout.columns]
    if missing:
        raise ValueError(f"answer readout of prompt {prompt['id']!r} lacks columns {missing}")
    expected = prompt["expected"].lower()
    classes = [pl.sum_horizontal(columns).alias(f"p_{c}") for c, columns in _PROBABILITY_COLUMNS.items()]
    return (
        readout.select("layer", "margin", *classes)
        .group_by("layer")
        .agg(
            pl.len().alias("n"),
            *(pl.col(f"p_{c}").mean().alias(f"mean_p_{c}") for c in ANSWER_CLASSES),
            pl.col(f"p_{expected}").mean().alias("mean_p_expected"),
            pl.col("margin").mean().alias("mean_margin"),
            (pl.col("margin") > 0).mean().alias("share_expected_ahead"),
        )
        .with_columns(
            pl.lit(prompt["id"]).alias("prompt"), pl.lit(prompt["family"]).alias("family"),
            pl.lit(prompt["expected"]).alias("expected"), (pl.col("layer") / num_layers).alias("depth"),
        )
        .select("prompt", "family", "expected", "layer", "depth", pl.exclude("prompt", "family", "expected", "layer", "depth"))
        .sort("layer")
    )


def stages_table(metrics: pl.DataFrame, num_layers: int, min_drop: float, alpha: float) -> pl.DataFrame:
    """Detected stages for every prompt-dependent token position of one model's metrics table
    (the image pass's rows have no drop: no prompt can move them)."""
    frames = []
    prompt_rows = metrics.filter(pl.col("readout") == "prompt")
    if prompt_rows.is_empty():
        raise ValueError("no prompt-dependent metrics rows: nothing to detect stages from")
    for (model, position), part in prompt_rows.group_by("model", "position", maintain_order=True):
        stages = detect_stages(layer_reactions(part, min_drop, alpha), num_layers)
        frames.append(
            stages.with_columns(
                pl.lit(model).alias("model"), pl.lit(position).alias("position"),
                pl.lit(num_layers).alias("num_layers"), pl.lit(min_drop).alias("min_drop"),
                pl.lit(alpha).alias("alpha"),
            )
        )
    return pl.concat(frames).select("model", "position", pl.exclude("model", "position"))



def model_tables(
    metric_rows: Iterable[pl.DataFrame],
    answers: Mapping[str, pl.DataFrame],
    prompts: Sequence[Mapping[str, str]],
    anchor_id: str,
    model_name: str,
    min_drop: float,
    alpha: float,
    fits: pl.DataFrame | None = None,
    answer_readouts: Mapping[str, pl.DataFrame] | None = None,
) -> dict[str, pl.DataFrame]:
    """The aggregate job: one model's metrics, behaviour and stages tables (and answer readout).

    metric_rows: the evaluate jobs' tables; answers: each prompt's test-split answers by prompt
    id; prompts: the row order of the behaviour table; the anchor is found by its id; fits
    (`fit_table`): the probes' convergence, joined onto the metrics rows; answer_readouts: each
    prompt's test-split answer readout by prompt id (`answer_readout_table` per prompt).
    """
    rows = list(metric_rows)
    found = {int(n) for frame in rows for n in frame["num_layers"].unique()}
    if len(found) != 1:
        raise ValueError(f"metrics files of model {model_name!r} disagree on num_layers: {sorted(found)}")
    num_layers = found.pop()
    metrics = metrics_table(rows, num_layers)
    if fits is not None:
        metrics = with_fits(metrics, fits)
    missing = sorted({p["id"] for p in prompts} - set(answers))
    if missing or anchor_id not in answers:
        raise ValueError(f"no answers for prompts {missing or [anchor_id]} of model {model_name!r}")
    behaviour = pl.DataFrame([behaviour_row(answers[p["id"]], p, answers[anchor_id]) for p in prompts])
    behaviour = behaviour.with_columns(pl.lit(model_name).alias("model")).select("model", pl.exclude("model"))
    tables = {
        "metrics": metrics,
        "behaviour": behaviour,
        "stages": stages_table(metrics, num_layers, float(min_drop), float(alpha)),
    }
    if answer_readouts is not None:
        missing = sorted({p["id"] for p in prompts} - set(answer_readouts))
        if missing:
            raise ValueError(f"no answer readout for prompts {missing} of model {model_name!r}")
        readout = pl.concat([answer_readout_table(answer_readouts[p["id"]], p, num_layers) for p in prompts])
        tables["answer_readout"] = readout.with_columns(pl.lit(model_name).alias("model")).select("model", pl.exclude("model"))
    return tables


def vision_metrics_table(rows: Iterable[pl.DataFrame], model_name: str, fits: pl.DataFrame | None = None) -> pl.DataFrame:
    """One model's vision-encoder probe metrics: a row per position (patch_mean, cls) x vision layer,
    depth = layer / the encoder's block count, with the probes' convergence where `fits` is given."""
    table = pl.concat(list(rows), how="diagonal_relaxed")
    if set(table["readout"].unique()) != {"vision"}:
        raise ValueError(f"vision metrics of model {model_name!r} hold rows of readout {sorted(set(table['readout']))}")
    if table["num_layers"].n_unique() != 1:
        raise ValueError(f"vision metrics of model {model_name!r} disagree on num_layers: {sorted(set(table['num_layers']))}")
    duplicated = table.select("position", "layer").is_duplicated()
    if duplicated.any():
        raise ValueError(f"duplicate vision metrics rows for {table.filter(duplicated).select('position', 'layer').rows()}")
    table = table.with_columns((pl.col("layer") / pl.col("num_layers")).alias("depth")).sort("position", "layer")
    if fits is not None:
        table = with_fits(table, fits)
    first = [c for c in LEADING if c in table.columns]
    return table.select(*first, pl.exclude(first))


def write_table(table: pl.DataFrame, path: str | os.PathLike) -> None:
    """A Parquet table (zstd), written whole or not at all."""
    with atomic_path(path) as tmp:
        table.write_parquet(tmp, compression="zstd")


def patching_summary(
    scores: Sequence[tuple[pl.DataFrame, int]],
    prompts: Sequence[Mapping[str, str]],
    stages: pl.DataFrame,
    model: str,
    *,
    n_bootstrap: int,
    ci: float,
    seed: int,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(restored-fraction curves, causal onsets) of one model's patching files, each (table, num_layers).

    Each onset row carries the probing stage its family opens (FAMILY_STAGE) at the last token:
    its first layer, and `readings_agree` = that layer lies within the causal onset's CI
    (null when either reading has no onset).
    """
    if len(scores) != len(prompts):
        raise ValueError(f"{len(scores)} patching files for {len(prompts)} prompts")
    curves, onsets = [], []
    for (table, num_layers), prompt in zip(scores, prompts):
        curve, onset = patching_tables(table, dict(prompt), num_layers, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        curves.append(curve)
        onsets.append(onset)
    probing = stages.filter((pl.col("position") == "last") & pl.col("detected")).select(
        pl.col("stage").alias("probing_stage"), pl.col("start_layer").alias("probing_onset_layer")
    )
    onset_table = (
        pl.concat(onsets, how="diagonal_relaxed")
        .with_columns(pl.col("family").replace_strict(FAMILY_STAGE, default=None).alias("probing_stage"))
        .join(probing, on="probing_stage", how="left")
        .with_columns(
            pl.when(pl.col("onset_ci_low").is_null() | pl.col("probing_onset_layer").is_null())
            .then(None)
            .otherwise(
                (pl.col("probing_onset_layer") >= pl.col("onset_ci_low"))
                & (pl.col("probing_onset_layer") <= pl.col("onset_ci_high").fill_null(float("inf")))
            )
            .alias("readings_agree"),
            pl.lit(model).alias("model"),
        )
    )
    curve_table = pl.concat(curves, how="diagonal_relaxed").with_columns(pl.lit(model).alias("model"))
    return (curve_table.select("model", pl.exclude("model")).sort("prompt", "position", "direction", "layer"),
            onset_table.select("model", pl.exclude("model")).sort("prompt", "position", "direction"))
