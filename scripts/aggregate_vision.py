"""Snakemake job aggregate_vision: one model's vision-encoder probe metrics (every vision layer)."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.aggregate import fit_warnings, read_fits, vision_metrics_table, write_table  # noqa: E402

fits = read_fits(smk.input.probe_fits, smk.input.control_fits)
print("\n".join(fit_warnings(fits)), file=sys.stderr)
table = vision_metrics_table([pl.read_parquet(path) for path in smk.input.metrics], smk.params.model_name, fits)
print(table.select("position", "layer", "accuracy", "control_accuracy", "chance"), file=sys.stderr)
write_table(table, smk.output.vision_metrics)
