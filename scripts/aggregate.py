"""Snakemake job aggregate: one model's metrics, behaviour (its own answers), stages and answer
readout tables."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.aggregate import fit_table, fit_warnings, model_tables, write_table  # noqa: E402

prompts = list(smk.params.prompts)
if len(prompts) != len(smk.input.answers):
    raise ValueError(f"{len(prompts)} prompts but {len(smk.input.answers)} answers files")
answers = {prompt["id"]: pl.read_parquet(path) for prompt, path in zip(prompts, smk.input.answers)}
readouts = {prompt["id"]: pl.read_parquet(path) for prompt, path in zip(prompts, smk.input.answer_readout)}
fits = fit_table([json.loads(Path(p).read_text()) for p in smk.input.probe_fits],
                 [json.loads(Path(p).read_text()) for p in smk.input.control_fits])
print("\n".join(fit_warnings(fits)), file=sys.stderr)
tables = model_tables([pl.read_parquet(path) for path in smk.input.metrics], answers, prompts,
                      smk.params.anchor, smk.params.model_name, smk.params.stages["min_drop"], smk.params.stages["alpha"],
                      fits=fits, answer_readouts=readouts)
print(tables["stages"].filter(pl.col("detected")).select("position", "stage", "start_layer", "end_layer"), file=sys.stderr)
for name, table in tables.items():
    write_table(table, smk.output[name])
