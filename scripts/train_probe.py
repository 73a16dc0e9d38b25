"""Snakemake job: fit the anchor-prompt probe and its shuffled-label control for one model x layer."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)

from tqdm import tqdm

from stagelens.probe import fit_probe, save_probes, shuffled_labels
from stagelens.store import read_metadata, read_vectors

path = snakemake.input.embeddings
settings = dict(snakemake.params.probe)
seed = int(snakemake.params.seed)
meta = read_metadata(path)
if not meta.get("positions"):
    raise KeyError(f"{path}: metadata lists no `positions`")

probes, controls, fits = {}, {}, {}
for position in tqdm(meta["positions"], desc=f"probe layer {meta.get('layer')}", file=sys.stderr):
    sample_ids, labels, features = read_vectors(path, position)
    common = dict(Cs=settings["Cs"], cv_folds=settings["cv_folds"], max_iter=settings["max_iter"],
                  seed=seed, n_jobs=snakemake.threads)
    probes[position], real = fit_probe(features, labels, **common)
    # The control is the same probe (the C chosen for the real labels) on permuted labels, so
    # selectivity compares like with like; a C search on noise would only pick the strongest
    # regularisation, at four fifths of the job's cost.
    controls[position], control = fit_probe(features, shuffled_labels(labels, seed), **{**common, "Cs": [real.C]})
    fits[position] = {"probe": vars(real), "control": vars(control)}
    print(f"{position}: C={real.C} cv={real.cv_accuracy:.3f} control cv={control.cv_accuracy:.3f}", file=sys.stderr)

input_meta = {k: meta.get(k) for k in ("model_id", "model_name", "revision", "architecture", "dtype",
                                       "layer", "num_layers", "layer_convention", "prompt_id",
                                       "rendered_prompt", "split", "positions", "stagelens_version")}
for kind, out, chosen in (("probe", snakemake.output.probe, probes), ("control", snakemake.output.control, controls)):
    sidecar = {
        "kind": kind,
        "labels": "shuffled with the seed" if kind == "control" else "true",
        "method": "StandardScaler + multinomial LogisticRegression (lbfgs, L2); "
        + ("C fixed to the real probe's chosen C" if kind == "control" else "C by stratified K-fold CV on the train split"),
        "hyperparameters": {**settings, "seed": seed},
        "input": {"path": str(path), **input_meta},
        "fit": {pos: fit[kind] for pos, fit in fits.items()},
    }
    save_probes(chosen, out, sidecar)
