"""Cost of activation patching on the embedded default's model, printed as measured ratios (never asserted).

(a) seconds per image of `stagelens.patching.patch_batch` (anchor <-> one variant, every layer,
    both directions, last token: each prompt once up to its last token with a KV cache, every
    layer's patched copy, the last token alone, in one batch) / seconds per image of one
    extraction forward pass (`adapter.forward`, every layer, the anchor): what a patched image
    costs in units of an extracted one.
(b) seconds per image of the naive sweep (the full prompt for every patched copy, no cache,
    layers still batched) / (a)'s seconds per image: the saving of the cache.
Then the time `make run` adds with config/config.yaml's `patching` section, from (a).

The model is SmolLM2-135M (dequantised from the GGUF, as rule export_lm does) + EfficientNet-Lite0
+ a seeded untrained projector (the cost does not depend on the projector's training), or a built
checkpoint given with --model. Runs offline on CPU:

    .venv/bin/python benchmarks/bench_patching.py [--images 8] [--naive-images 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def embedded_adapter(model_dir: str | None):
    from stagelens.adapters.base import ModelInfo
    from stagelens.adapters.embedded import EmbeddedAdapter, load_embedded_adapter

    if model_dir:
        from stagelens.spec import ModelSpec

        return load_embedded_adapter(ModelSpec("bench", model_dir, device="cpu"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stagelens.adapters.efficientnet_vision import pretrained_state_dict
    from stagelens.builders.embedded import assemble
    from stagelens.builders.smollm2_export import export_dequantised

    lm_dir = Path(tempfile.mkdtemp(prefix="bench_patching_lm_"))
    export_dequantised(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    model = assemble(lm, AutoTokenizer.from_pretrained(lm_dir), pretrained_state_dict(), seed=0)
    cfg = model.config
    return EmbeddedAdapter(model, ModelInfo("bench", "local", "embedded", "float32", "cpu", cfg.num_layers, cfg.lm_hidden_size))


def naive_sweep(adapter, images, anchor: str, variant: str, layers: list[int]) -> None:
    """The same sweep without prefix reuse: every patched copy runs the whole prompt."""
    from stagelens.adapters.residual_patch import overwrite_residuals, record_residuals

    model, n, k = adapter.model, len(images), len(layers)
    pixels = model.pixel_values(images)
    runs = {}
    for name, question in (("anchor", anchor), ("variant", variant)):
        ids = model.tokenizer(adapter.render_prompt(question), add_special_tokens=False, return_tensors="pt")["input_ids"]
        embeds = model.inputs_embeds(ids.repeat(n, 1), pixels)
        last = torch.tensor([embeds.shape[1] - 1])
        with record_residuals(adapter.blocks, layers, last) as kept:
            model.lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
        runs[name] = (embeds, last, dict(kept))
    for source, target in (("anchor", "variant"), ("variant", "anchor")):
        embeds, last, _ = runs[target]
        writes = {layer: (torch.arange(n) * k + j, runs[source][2][layer]) for j, layer in enumerate(layers)}
        with overwrite_residuals(adapter.blocks, writes, last):
            model.lm(inputs_embeds=embeds.repeat_interleave(k, dim=0), use_cache=False, logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--naive-images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a built embedded checkpoint (default: assembled here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from stagelens.patching import PatchCounts, patch_batch

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    prompts = {p["id"]: p for p in [cfg["prompts"]["anchor"], *cfg["prompts"]["variants"]]}
    anchor, variant = prompts["anchor"]["text"], prompts["neg_animal"]["text"]
    paths = sorted((REPO / "resources" / "fashion_mnist").glob("*/*.png"))[:: 97][: args.images]
    images = [Image.open(p).convert("RGB") for p in paths]

    start = time.perf_counter()
    adapter = embedded_adapter(args.model)
    print(f"model ready in {time.perf_counter() - start:.1f} s ({adapter.info.num_layers} blocks)")
    layers = list(range(adapter.info.num_layers + 1))

    with torch.inference_mode():
        adapter.forward(images[:1], anchor, layers, ["last"])  # warm-up
        start = time.perf_counter()
        adapter.forward(images, anchor, layers, ["last"])
        extract_s = (time.perf_counter() - start) / len(images)

    counts = PatchCounts()
    start = time.perf_counter()
    patch_batch(adapter, images, anchor, variant, layers, "last", ("yes", "no"), counts)
    patch_s = (time.perf_counter() - start) / len(images)

    few = images[: args.naive_images]
    with torch.inference_mode():
        start = time.perf_counter()
        naive_sweep(adapter, few, anchor, variant, layers)
        naive_s = (time.perf_counter() - start) / len(few)

    print(f"extraction forward: {extract_s:.2f} s/image ({len(images)} images, one batch, every layer)")
    print(f"patching sweep:     {patch_s:.2f} s/image = {1 / patch_s:.3f} images/s "
          f"({len(layers)} layers x 2 directions; {counts.model_calls} model calls, {counts.sequences} sequences, "
          f"{counts.tokens} tokens; naive: {counts.naive_forwards} full forwards, {counts.naive_tokens} tokens)")
    print(f"naive sweep:        {naive_s:.2f} s/image ({len(few)} images, full prompt per patched copy)")
    print(f"(a) patching / extraction per image: {patch_s / extract_s:.1f}")
    print(f"(b) naive / patching per image:      {naive_s / patch_s:.2f}")
    patching = cfg["patching"]
    n_classes = sum(1 for line in (REPO / cfg["dataset"]["class_list"]).read_text().splitlines()[1:] if line.strip())
    n_images = n_classes * patching["images"] * len(patching["positions"])
    added = len(patching["variants"]) * n_images * patch_s
    print(f"make run adds ~{added / 60:.1f} min of patching ({len(patching['variants'])} variants x {n_images} images, "
          f"plus a model load per job)")


if __name__ == "__main__":
    main()
