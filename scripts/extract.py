"""Snakemake jobs extract_{model} (one split x prompt: the prompt-dependent positions, the
answers and the answer readout per layer), shared_extract_{model} (every test prompt, the shared
prefix once) and image_pass_{model} (one split: the image positions, read once per image). With
share_prefix the first two also write the image pass's files of their split."""

from stagelens.job import load_model, start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

from stagelens.extract import extract, extract_image, extract_prompts, read_split  # noqa: E402

spec, adapter = load_model(smk)
samples, split, embeddings = read_split(smk.input.manifest, smk.params.split), smk.params.split, list(smk.output.embeddings)
# With share_prefix the prompt jobs also write the image pass's files (no image_pass_<model> job).
folded = {"image_paths": list(getattr(smk.output, "image_embeddings", [])), "vision_paths": list(getattr(smk.output, "vision", []))}
if hasattr(smk.params, "prompts"):  # shared_extract_<model>
    summary = extract_prompts(adapter, spec, samples, [dict(p) for p in smk.params.prompts], embeddings,
                              list(smk.output.answers), list(smk.output.answer_readout), split=split, **folded)
elif hasattr(smk.params, "prompt"):  # extract_<model>; image_pass_<model> has no prompt
    summary = extract(adapter, spec, samples, dict(smk.params.prompt), embeddings, smk.output.answers, split=split,
                      readout_path=smk.output.answer_readout, **folded)
else:
    vision = list(getattr(smk.output, "vision", []))  # the vision layers' files, where the model reads them
    summary = extract_image(adapter, spec, samples, embeddings, split=split, vision_paths=vision)
print(f"wrote {summary['rows']} rows x {len(summary['layers'])} layers (+ {len(summary['vision_layers'])} vision "
      f"layers) in {summary['seconds']:.1f} s", file=sys.stderr)
