"""Snakemake job: fit the anchor-prompt probe and its shuffled-label control for one model x layer."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)

from stagelens.probe_training import train_layer_probes

fitted = train_layer_probes(snakemake.input.embeddings, dict(snakemake.params.probe),  # noqa: F821
                            seed=int(snakemake.params.seed), threads=snakemake.threads)  # noqa: F821
fitted.save(snakemake.output.probe, snakemake.output.control)  # noqa: F821
