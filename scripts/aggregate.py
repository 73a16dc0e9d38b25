"""Snakemake job: one model's tidy metrics, behaviour (its own answers) and detected stages."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)


import polars as pl

from stagelens.atomic import atomic_path
from stagelens.aggregate import behaviour_row, metrics_table, stages_table


def write(table: pl.DataFrame, path: str) -> None:
    with atomic_path(path) as tmp:
        table.write_parquet(tmp, compression="zstd")


params = snakemake.params
rows = [pl.read_parquet(path) for path in snakemake.input.metrics]
found = {int(n) for frame in rows for n in frame["num_layers"].unique()}
if len(found) != 1:
    raise ValueError(f"metrics files of model {params.model_name!r} disagree on num_layers: {sorted(found)}")
num_layers = found.pop()
metrics = metrics_table(rows, num_layers)

prompts = list(params.prompts)
if len(prompts) != len(snakemake.input.answers):
    raise ValueError(f"{len(prompts)} prompts but {len(snakemake.input.answers)} answers files")
answers = [pl.read_parquet(path) for path in snakemake.input.answers]
anchor = answers[0]  # params.prompts is config.all_prompts: the anchor first
behaviour = pl.DataFrame(
    [behaviour_row(frame, prompt, anchor) for prompt, frame in zip(prompts, answers)]
).with_columns(pl.lit(params.model_name).alias("model"))
behaviour = behaviour.select("model", pl.exclude("model"))

stages = stages_table(metrics, num_layers, float(params.stages["min_drop"]), float(params.stages["alpha"]))
print(stages.filter(pl.col("detected")).select("position", "stage", "start_layer", "end_layer"), file=sys.stderr)

write(metrics, snakemake.output.metrics)
write(behaviour, snakemake.output.behaviour)
write(stages, snakemake.output.stages)
