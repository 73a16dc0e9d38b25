"""Cost of the vision-tower capture in the image pass of the embedded default's model, printed as
measured ratios (never asserted).

Side by side, repetition by repetition on the same batch (order alternated): the seconds of one
image pass as `make run` runs it without vision layers (`adapter.forward_image`, every LM layer's
image_mean) and with the vision layers 0..8 of the embedded default (EfficientNet-Lite0's stem, 7
stages and head, each averaged over its spatial positions). Prints the ratio and what the capture
adds to `make run`'s image passes (800 images: 2 splits x 10 classes x 50 + 30).

With --probes it also fits the probe and control of every vision layer as train_vision_probe does
(the default config's probe settings and seed) on the vision features of the default's 500
training images (the first 50 per class; the encoder alone computes them), and prints the seconds
per layer: what the vision probe jobs add to `make run`.

Same model as bench_patching.py (SmolLM2-135M dequantised from the GGUF + EfficientNet-Lite0 + a
seeded projector), or a built checkpoint with --model. Runs offline on CPU:

    .venv/bin/python benchmarks/bench_vision.py [--images 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from PIL import Image

from bench_patching import REPO, embedded_adapter

IMAGE_PASS_IMAGES = 800  # the embedded default's train + test images, each through the image pass once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per variant, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--model", default=None, help="a built embedded checkpoint (default: assembled here)")
    parser.add_argument("--probes", action="store_true", help="also time the vision probe fits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images = [Image.open(p).convert("RGB") for p in sorted((REPO / "resources" / "fashion_mnist").glob("*/*.png"))[::97]]
    images = images[: args.images]
    adapter = embedded_adapter(args.model)
    layers = list(range(adapter.info.num_layers + 1))
    vision_layers = list(range(adapter.vision.num_layers + 1))
    print(f"{len(images)} images, {len(layers)} LM layers (image_mean), {len(vision_layers)} vision layers, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    adapter.forward_image(images[:1], layers, vision_layers)  # warm-up
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    for repeat in range(args.repeats):
        for kind in ("without", "with") if repeat % 2 == 0 else ("with", "without"):
            start = time.perf_counter()
            adapter.forward_image(images, layers, vision_layers if kind == "with" else ())
            seconds[kind].append(time.perf_counter() - start)
    without, with_ = statistics.median(seconds["without"]), statistics.median(seconds["with"])
    for kind, median in (("without", without), ("with", with_)):
        print(f"image pass {kind:7} vision layers: {median / len(images):.4f} s/image (median of {args.repeats}: "
              f"{', '.join(f'{s:.3f}' for s in seconds[kind])} s per batch)")
    print(f"with / without: {with_ / without:.3f}")
    added = (with_ - without) / len(images) * IMAGE_PASS_IMAGES
    print(f"make run: {IMAGE_PASS_IMAGES} image-pass images x {(with_ - without) / len(images):+.4f} s = {added:+.1f} s "
          f"of vision capture (load average now {os.getloadavg()[0]:.2f})")
    encoder_only(adapter, images, vision_layers, args.repeats * 4)
    reductions_only(adapter, images, vision_layers, args.repeats * 4)
    if args.probes:
        probe_fits(adapter, vision_layers, args.threads)


def encoder_only(adapter, images, vision_layers: list[int], repeats: int) -> None:
    """The capture's cost isolated: the vision encoder alone with and without the hooks, interleaved
    (a short call, so many repetitions; the whole image pass above is at the mercy of the load)."""
    model = adapter.model
    pixels = model.pixel_values(images)
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    with torch.no_grad():
        for repeat in range(repeats):
            for kind in ("without", "with") if repeat % 2 == 0 else ("with", "without"):
                capture = adapter.vision.capture(vision_layers, len(images), {}, None)
                start = time.perf_counter()
                if kind == "with":
                    with capture.attached():
                        model.vision(pixels)
                    capture.vectors()
                else:
                    model.vision(pixels)
                seconds[kind].append(time.perf_counter() - start)
    without, with_ = statistics.median(seconds["without"]), statistics.median(seconds["with"])
    print(f"vision encoder alone: {without / len(images):.4f} s/image without the capture, {with_ / len(images):.4f} "
          f"with it (median of {repeats}); added {(with_ - without) / len(images):+.4f} s/image, "
          f"{(with_ - without) / len(images) * IMAGE_PASS_IMAGES:+.1f} s over make run's image passes "
          f"(load average now {os.getloadavg()[0]:.2f})")


def reductions_only(adapter, images, vision_layers: list[int], repeats: int) -> None:
    """The capture's arithmetic alone (the per-image means of the 9 kept maps), on the block outputs
    of one encoder run: what the hooks compute, without the forward around it."""
    model, blocks = adapter.model, adapter.vision.blocks
    outputs: list[torch.Tensor] = []  # the raw maps: the stem's (input of the first block), then each block's
    handles = [blocks[0].register_forward_pre_hook(lambda _m, args: outputs.append(args[0]))]
    handles += [block.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for block in blocks]
    try:
        with torch.no_grad():
            model.vision(model.pixel_values(images))
    finally:
        for handle in handles:
            handle.remove()
    reduce = adapter.vision.capture(vision_layers, len(images), {}, None).segments.reduce
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for hidden in outputs:
            reduce(hidden, "patch_mean")
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    print(f"the capture's reductions alone: {median / len(images) * 1e3:.2f} ms/image (median of {repeats}), "
          f"{median / len(images) * IMAGE_PASS_IMAGES:.1f} s over make run's image passes")


def probe_fits(adapter, vision_layers: list[int], threads: int) -> None:
    """Seconds of the probe + control fit per vision layer on the default's training images."""
    import numpy as np
    import yaml

    from stagelens.probe_training import ProbeSettings, fit_probe_and_control

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    per_class = config["dataset"]["train_per_class"]
    folders = sorted(p for p in (REPO / "resources" / "fashion_mnist").iterdir() if p.is_dir())
    paths = [(label, path) for label, folder in enumerate(folders) for path in sorted(folder.glob("*.png"))[:per_class]]
    model = adapter.model
    features: dict[int, list] = {v: [] for v in vision_layers}
    for start in range(0, len(paths), 50):
        chunk = paths[start : start + 50]
        capture = adapter.vision.capture(vision_layers, len(chunk), {}, None)
        with torch.no_grad(), capture.attached():
            model.vision(model.pixel_values([Image.open(p).convert("RGB") for _, p in chunk]))
        for v, array in zip(vision_layers, capture.vectors()["patch_mean"]):
            features[v].append(array)
    labels = np.asarray([label for label, _ in paths])
    settings = ProbeSettings(**config["probe"])
    total = 0.0
    for v in vision_layers:
        x = np.concatenate(features[v])
        start = time.perf_counter()
        probe, report, _, _ = fit_probe_and_control(x, labels, settings, int(config["seed"]), threads)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"vision layer {v}: {x.shape[1]:5d} wide, probe + control fit {seconds:6.2f} s, CV accuracy "
              f"{report.cv_accuracy:.3f} (C={report.C})")
    print(f"vision probe fits: {total:.1f} s for {len(vision_layers)} layers on {len(labels)} images "
          f"(load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
