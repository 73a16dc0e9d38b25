"""Snakemake job extract_{model}: one split x prompt through the model, every layer's file in one pass."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

import torch  # noqa: E402

from stagelens.adapters import load_adapter  # noqa: E402
from stagelens.extract import extract, read_split  # noqa: E402
from stagelens.spec import ModelSpec  # noqa: E402

spec = ModelSpec.from_config(smk.params.model_name, smk.params.model, str(smk.params.model_path))
torch.set_num_threads(max(1, int(smk.threads)))
adapter = load_adapter(spec)
print(f"loaded {adapter.info}", file=sys.stderr)
summary = extract(adapter, spec, read_split(smk.input.manifest, smk.params.split), dict(smk.params.prompt),
                  list(smk.output.embeddings), smk.output.answers, split=smk.params.split)
print(f"wrote {summary['rows']} rows x {len(summary['layers'])} layers in {summary['seconds']:.1f} s", file=sys.stderr)
