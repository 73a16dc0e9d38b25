"""Snakemake job depth_panel: every model's drop against the anchor on normalised depth."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.figures import depth_panel_chart, save_chart  # noqa: E402

chart = depth_panel_chart([pl.read_parquet(p) for p in smk.input.metrics], [pl.read_parquet(p) for p in smk.input.stages],
                          [pl.read_parquet(p) for p in smk.input.get("onsets", [])])
save_chart(chart, Path(smk.output.svg).with_suffix(""))  # depth_panel.svg -> stem; every format is written
