"""Snakemake job aggregate_patching: restored-fraction curves and causal onsets of one model."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

import polars as pl  # noqa: E402

from stagelens.aggregate import patching_summary, write_table  # noqa: E402
from stagelens.store import read_metadata  # noqa: E402

scores = [(pl.read_parquet(path), int(read_metadata(path)["num_layers"])) for path in smk.input.scores]
curves, onsets = patching_summary(
    scores, smk.params.prompts, pl.read_parquet(smk.input.stages), smk.params.model_name,
    n_bootstrap=int(smk.params.evaluate["n_bootstrap"]), ci=float(smk.params.evaluate["ci"]), seed=int(smk.params.seed),
)
print(onsets.select("prompt", "position", "direction", "gap", "onset_layer", "onset_ci_low", "onset_ci_high",
                    "probing_stage", "probing_onset_layer", "readings_agree"), file=sys.stderr)
write_table(curves, smk.output.curves)
write_table(onsets, smk.output.onsets)
