"""Snakemake job train_probe: the anchor-prompt probe and its shuffled-label control for one model x layer."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

from stagelens.probe_training import train_layer_probes  # noqa: E402

fitted = train_layer_probes(smk.input.embeddings, dict(smk.params.probe), seed=int(smk.params.seed),
                            threads=smk.threads)
fitted.save(smk.output.probe, smk.output.control)
