"""Snakemake job build_embedded_model: vision encoder + trained projector + LM + tokenizer, one checkpoint."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

from stagelens.builders.embedded import build_checkpoint  # noqa: E402

out = build_checkpoint(smk.input.lm, smk.input.projector, smk.input.training, smk.output[0])
print(f"wrote {out}", file=sys.stderr)
