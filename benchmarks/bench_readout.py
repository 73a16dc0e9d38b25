"""Cost of the answer readout per layer on the embedded default's model, printed as measured ratios (never asserted).

Side by side, repetition by repetition on the same batch: the seconds of one extraction forward
(`adapter.forward`, every layer, the anchor, the readout included) and the seconds of the readout
alone (`adapter.readout.log_probs` on the same batch's last-token states of every layer: the final
norm and the (hidden x vocabulary) unembedding per layer, softmax over the vocabulary). Prints the
readout's share of the extraction forward and what it adds to `make run`'s extraction (2,600 image
passes in the embedded default).

Same model as bench_patching.py (SmolLM2-135M dequantised from the GGUF + EfficientNet-Lite0 + a
seeded projector), or a built checkpoint with --model. Runs offline on CPU:

    .venv/bin/python benchmarks/bench_readout.py [--images 8] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml
from PIL import Image

from bench_patching import REPO, embedded_adapter

IMAGE_PASSES = 2600  # extraction image passes of the embedded default (README, "The embedded default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--images", 8), ("--repeats", 3), ("--threads", 2)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--model", default=None, help="a built embedded checkpoint (default: assembled here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    anchor = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["prompts"]["anchor"]["text"]
    images = [Image.open(p).convert("RGB") for p in sorted((REPO / "resources" / "fashion_mnist").glob("*/*.png"))[::97]]
    images = images[: args.images]
    adapter = embedded_adapter(args.model)
    layers = list(range(adapter.info.num_layers + 1))
    vocab, hidden = adapter.readout.unembedding.weight.shape
    print(f"model: {adapter.info.num_layers} blocks, hidden {hidden}, vocabulary {vocab}; {len(images)} images, "
          f"{len(layers)} layers read out, {args.threads} threads")

    adapter.forward(images[:1], anchor, layers, ["last"])  # warm-up
    forward_s, readout_s = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = adapter.forward(images, anchor, layers, ["last"])
        forward_s.append(time.perf_counter() - start)
        states = torch.from_numpy(out.vectors["last"])
        start = time.perf_counter()
        adapter.readout.log_probs(states)
        readout_s.append(time.perf_counter() - start)
    fwd, ro = statistics.median(forward_s), statistics.median(readout_s)
    flops = 2 * len(layers) * hidden * vocab
    print(f"extraction forward (readout included): {fwd / len(images):.3f} s/image (median of {args.repeats}: "
          f"{', '.join(f'{s:.2f}' for s in forward_s)} s per batch)")
    print(f"readout alone:                         {ro / len(images):.4f} s/image (median of {args.repeats}: "
          f"{', '.join(f'{s:.3f}' for s in readout_s)} s per batch; {flops / 1e9:.2f} GFLOP/image)")
    print(f"readout / extraction forward without it: {ro / (fwd - ro):.1%}")
    print(f"make run: {IMAGE_PASSES} image passes x {ro / len(images):.4f} s = ~{IMAGE_PASSES * ro / len(images) / 60:.1f} min "
          "of readout")


if __name__ == "__main__":
    main()
