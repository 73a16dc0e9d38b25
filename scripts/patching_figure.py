"""Snakemake job patching_figure: restored fraction by layer for one model's patched variants."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.figures import patching_chart, save_chart  # noqa: E402

title = f"{smk.wildcards.model}: activation patching between the anchor and each variant"
chart = patching_chart(pl.read_parquet(smk.input.curves), pl.read_parquet(smk.input.onsets), title)
save_chart(chart, Path(smk.output.svg).with_suffix(""))  # patching.svg -> stem; every format is written
