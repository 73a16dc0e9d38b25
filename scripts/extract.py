"""Snakemake job extract_{model}: one split x prompt through the model, every layer's file in one pass."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (injected by Snakemake)

import torch  # noqa: E402

from stagelens.extract import extract, read_split  # noqa: E402
from stagelens.adapters import load_adapter  # noqa: E402
from stagelens.spec import ModelSpec  # noqa: E402

sm = snakemake  # noqa: F821
spec = ModelSpec.from_config(sm.params.model_name, sm.params.model, str(sm.params.model_path))
torch.set_num_threads(max(1, int(sm.threads)))
adapter = load_adapter(spec)
print(f"loaded {adapter.info}", file=sys.stderr)
summary = extract(adapter, spec, read_split(sm.input.manifest, sm.params.split), dict(sm.params.prompt),
                  list(sm.output.embeddings), sm.output.answers, split=sm.params.split)
print(f"wrote {summary['rows']} rows x {len(summary['layers'])} layers in {summary['seconds']:.1f} s", file=sys.stderr)
