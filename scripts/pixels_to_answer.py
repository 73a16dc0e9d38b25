"""Snakemake job pixels_to_answer: one model's class-probe accuracy from the vision encoder's layers
through the projector to the LM's layers, above its answer readout by layer."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.figures import pixels_to_answer_chart, save_chart  # noqa: E402

metrics = pl.read_parquet(smk.input.metrics)
chart = pixels_to_answer_chart(metrics, pl.read_parquet(smk.input.vision_metrics), pl.read_parquet(smk.input.answer_readout),
                               f"{smk.wildcards.model} @ {metrics['revision'][0]}: from pixels to answer")
save_chart(chart, Path(smk.output.svg).with_suffix(""))  # <name>.svg -> stem; every format is written
