"""Snakemake job build_model: a seeded tiny checkpoint of a real MLLM architecture (offline)."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

from stagelens.builders.tiny import build_atomic  # noqa: E402

out = build_atomic(smk.params.recipe, smk.output[0], seed=int(smk.params.seed), num_layers=int(smk.params.num_layers))
print(f"built {smk.params.recipe} into {out}", file=sys.stderr)
