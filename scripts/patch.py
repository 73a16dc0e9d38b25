"""Snakemake job patch: activation patching between the anchor and one variant, every layer in one job."""

from stagelens.job import load_model, start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

from stagelens.extract import read_split  # noqa: E402
from stagelens.patching import PatchRequest, patch_subset, run_patching  # noqa: E402

settings = smk.params.patching
spec, adapter = load_model(smk)
samples = patch_subset(read_split(smk.input.manifest, "test"), settings["images"], settings["seed"])
request = PatchRequest(dict(smk.params.anchor), dict(smk.params.variant), tuple(spec.layers_of(adapter.info.num_layers)),
                       tuple(settings["positions"]), spec.batch_size, settings["max_rows"])
summary = run_patching(adapter, samples, request, smk.output.scores,
                       extra_metadata={"model_name": spec.name, "seed": settings["seed"], "images_per_class": settings["images"]})
print("patched " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
