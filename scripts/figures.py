"""Snakemake job: the per-model figures (rule figures) or the cross-model depth panel (rule depth_panel)."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)

from pathlib import Path

import polars as pl

from stagelens.figures import accuracy_chart, answers_chart, depth_panel, drop_heatmap, save_chart


def stem(path: str) -> str:
    """results/figures/x.png -> results/figures/x (save_chart adds every format)."""
    return str(Path(path).with_suffix(""))


params = snakemake.params
if snakemake.rule == "depth_panel":
    metrics = pl.concat([pl.read_parquet(p) for p in snakemake.input.metrics], how="diagonal_relaxed")
    stages = pl.concat([pl.read_parquet(p) for p in snakemake.input.stages], how="diagonal_relaxed")
    positions = metrics["position"].unique().to_list()
    position = "last" if "last" in positions else sorted(positions)[0]
    save_chart(depth_panel(metrics, stages, position), stem(snakemake.output.svg))
else:
    model = snakemake.wildcards.model
    metrics = pl.read_parquet(snakemake.input.metrics)
    behaviour = pl.read_parquet(snakemake.input.behaviour)
    revision = metrics["revision"][0]
    save_chart(accuracy_chart(metrics, f"{model} @ {revision}: class-probe accuracy by layer"),
               stem(snakemake.output.accuracy))
    save_chart(drop_heatmap(metrics, f"{model} @ {revision}: accuracy drop against the anchor",
                            float(params.stages["alpha"]), float(params.stages["min_drop"])),
               stem(snakemake.output.drop_heatmap))
    save_chart(answers_chart(behaviour, f"{model} @ {revision}: the model's own answers"),
               stem(snakemake.output.answers))
