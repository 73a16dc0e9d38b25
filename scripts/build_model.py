"""Snakemake job build_model: a seeded tiny checkpoint of a real MLLM architecture (offline)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (injected by Snakemake)

from stagelens.builders.tiny import build_atomic  # noqa: E402

sm = snakemake  # noqa: F821
out = build_atomic(
    sm.params.recipe,
    sm.output[0],
    seed=int(sm.params.seed),
    num_layers=int(sm.params.num_layers),
)
print(f"built {sm.params.recipe} into {out}", file=sys.stderr)
