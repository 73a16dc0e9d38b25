"""Snakemake job aggregate: one model's metrics, behaviour (its own answers), stages and answer
readout tables."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.aggregate import fit_warnings, model_tables, read_by_prompt, read_fits, write_table  # noqa: E402

prompts, stages = list(smk.params.prompts), smk.params.stages
fits = read_fits(smk.input.probe_fits, smk.input.control_fits)
print("\n".join(fit_warnings(fits)), file=sys.stderr)
tables = model_tables([pl.read_parquet(path) for path in smk.input.metrics], read_by_prompt(prompts, smk.input.answers),
                      prompts, smk.params.anchor, smk.params.model_name, stages["min_drop"], stages["alpha"], fits=fits,
                      answer_readouts=read_by_prompt(prompts, smk.input.answer_readout))
print(tables["stages"].filter(pl.col("detected")).select("position", "stage", "start_layer", "end_layer"), file=sys.stderr)
for name, table in tables.items():
    write_table(table, smk.output[name])
