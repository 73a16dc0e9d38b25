"""Snakemake job figures: accuracy, drop heatmap, answers and answer readout charts of one model."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.figures import model_charts, save_chart  # noqa: E402

charts = model_charts(pl.read_parquet(smk.input.metrics), pl.read_parquet(smk.input.behaviour), smk.wildcards.model,
                      float(smk.params.stages["alpha"]), float(smk.params.stages["min_drop"]),
                      pl.read_parquet(smk.input.answer_readout))
for name, chart in charts.items():
    save_chart(chart, Path(smk.output[name]).with_suffix(""))  # <name>.svg -> stem; every format is written
