"""Snakemake job train_projector: the embedded model's projector on the training split (LM, vision frozen)."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

import torch  # noqa: E402

from stagelens.builders.projector_training import TrainSettings, save_projector, train_from_manifest  # noqa: E402

torch.set_num_threads(smk.threads)
model, history = train_from_manifest(smk.input.lm, smk.input.manifest, TrainSettings(**smk.params.settings))
print(f"final loss {history['final_loss']:.4f} in {history['train_seconds']:.1f} s", file=sys.stderr)
save_projector(model, history, smk.output.projector, smk.output.training)
