"""Snakemake jobs evaluate (one prompt's test vectors), evaluate_image (the image pass's: no anchor
to compare with, so no drop) and evaluate_prompt_image (the image tokens of a prompt with text
before the image, paired with the image pass's): frozen probes of one model x layer."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

from stagelens.evaluate import evaluate_layer, write_rows  # noqa: E402
from stagelens.metrics import EvalSettings  # noqa: E402

settings = EvalSettings(n_bootstrap=int(smk.params.evaluate["n_bootstrap"]), ci=float(smk.params.evaluate["ci"]),
                        seed=int(smk.params.seed))
rows = evaluate_layer(smk.input.probe, smk.input.control, smk.input.variant, smk.input.anchor,
                      smk.params.prompt, smk.params.model_name, settings, readout=smk.params.readout)
write_rows(rows, smk.output.metrics)
