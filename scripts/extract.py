"""Snakemake job extract_{model}: one split x prompt through the model, every layer's file in one pass."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (injected by Snakemake)

import torch  # noqa: E402

from stagelens.extract import extract, read_split  # noqa: E402
from stagelens.adapters import load_adapter  # noqa: E402

sm = snakemake  # noqa: F821
model_cfg = dict(sm.params.model)
torch.set_num_threads(max(1, int(sm.threads)))
adapter = load_adapter(model_cfg, str(sm.params.model_path))
print(f"loaded {adapter.info}", file=sys.stderr)
summary = extract(
    adapter,
    read_split(sm.input.manifest, sm.params.split),
    dict(sm.params.prompt),
    list(sm.params.layers),
    list(sm.params.positions),
    int(model_cfg.get("batch_size", 1)),
    list(sm.output.embeddings),
    sm.output.answers,
    model_name=sm.params.model_name,
    split=sm.params.split,
    num_layers=model_cfg.get("num_layers"),
    vector_dtype=model_cfg.get("vector_dtype", "float32"),
)
print(f"wrote {summary['rows']} rows x {len(summary['layers'])} layers in {summary['seconds']:.1f} s", file=sys.stderr)
