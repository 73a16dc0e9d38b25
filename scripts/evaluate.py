"""Snakemake job evaluate: frozen probes of one model x layer on one prompt's test vectors."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

from stagelens.evaluate import evaluate_layer, write_rows  # noqa: E402
from stagelens.metrics import EvalSettings  # noqa: E402

settings = EvalSettings(n_bootstrap=int(smk.params.evaluate["n_bootstrap"]), ci=float(smk.params.evaluate["ci"]),
                        seed=int(smk.params.seed))
rows = evaluate_layer(smk.input.probe, smk.input.control, smk.input.variant, smk.input.anchor,
                      smk.params.prompt, smk.params.model_name, settings)
write_rows(rows, smk.output.metrics)
