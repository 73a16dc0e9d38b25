"""Extraction overhead and memory, printed as ratios (never asserted).

(a) wall time of `stagelens.extract.extract` (the code path of the extract rule: image loading,
    processor, hooks, Parquet writing for every layer) / wall time of a bare loop of
    `model(**inputs, logits_to_keep=1, use_cache=False)` over the same, pre-built inputs and
    batch size, without hooks. Goal <= 1.15. The image count is calibrated so that the bare
    forward takes --forward-seconds (default 20 s: at a few seconds, start-up costs and the
    neighbours' load move the ratio by 0.1-0.2); the two run alternately --repeats times and the
    median of the paired ratios is printed with its range.
(b) peak RSS of a fresh process extracting N images vs 4N images. Goal <= 1.1.

The model is a seeded tiny LLaVA (by default) made wider and deeper than the test models
(--hidden 512, --layers 8: ~25 M LM parameters) so that the forward pass, not Python
overhead, dominates as it does for real models. Runs offline on CPU:

    .venv/bin/python benchmarks/bench_extract.py [--forward-seconds 20] [--repeats 5] [--n 48] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

PROMPT = {"id": "anchor", "family": "anchor", "text": "Does this image show an animal? The answer must be always yes or no."}


def make_images(directory: Path, n: int) -> list[tuple[str, int, str]]:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = directory / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path)
        rows.append((f"c/img{i:04d}", i % 3, str(path)))
    return rows


def load(model_dir: str, threads: int):
    import torch

    from stagelens.adapters import load_adapter
    from stagelens.spec import ModelSpec

    torch.set_num_threads(threads)
    return load_adapter(ModelSpec("bench", str(model_dir), device="cpu"))


def run_extract(adapter, rows, batch_size: int, out: Path) -> float:
    from stagelens.extract import Sample, extract
    from stagelens.spec import ModelSpec

    spec = ModelSpec("bench", adapter.info.model_id, batch_size=batch_size, device="cpu")
    layers = spec.layers_of(adapter.info.num_layers)
    start = time.perf_counter()
    extract(adapter, spec, [Sample(*r) for r in rows], PROMPT, [out / f"layer{layer}.parquet" for layer in layers],
            out / "answers.parquet", split="test", progress=False)
    return time.perf_counter() - start


def run_bare(adapter, rows, batch_size: int) -> float:
    import torch

    images = [Image.open(r[2]).convert("RGB") for r in rows]
    batches = [
        adapter.model_kwargs(adapter.build_inputs(images[i : i + batch_size], PROMPT["text"]))
        for i in range(0, len(images), batch_size)
    ]
    start = time.perf_counter()
    with torch.inference_mode():
        for kwargs in batches:
            adapter.model(**kwargs, logits_to_keep=1, use_cache=False)
    return time.perf_counter() - start


def child(model_dir: str, image_dir: str, n: int, batch_size: int, threads: int) -> None:
    """Fresh process: extract the first n images, print peak RSS in MiB."""
    rows = sorted(Path(image_dir).glob("*.png"))[:n]
    adapter = load(model_dir, threads)
    with tempfile.TemporaryDirectory() as out:
        run_extract(adapter, [(f"c/{p.stem}", 0, str(p)) for p in rows], batch_size, Path(out))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny-llava")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--n", type=int, default=48, help="N of (b); the least images of (a)")
    parser.add_argument("--forward-seconds", type=float, default=20.0, help="bare forward time (a) is sized for")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    # One thread: on a shared, oversubscribed CPU, multi-threaded BLAS timings vary several-fold.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "IMAGE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.n, args.batch_size, args.threads)
        return

    from stagelens.builders.tiny import build

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build(args.recipe, tmp / "model", seed=0, hidden_size=args.hidden, num_layers=args.layers)
        rows = make_images(tmp / "images", 4 * args.n)
        adapter = load(str(model_dir), args.threads)
        n_params = sum(p.numel() for p in adapter.model.parameters())
        print(f"model: {args.recipe} hidden={args.hidden} layers={args.layers} params={n_params / 1e6:.1f} M; "
              f"batch={args.batch_size} threads={args.threads}")

        run_bare(adapter, rows[: args.batch_size], args.batch_size)  # warm-up
        per_batch = statistics.median(run_bare(adapter, rows[: args.batch_size], args.batch_size) for _ in range(3))
        n_batches = max(math.ceil(args.forward_seconds / per_batch), math.ceil(args.n / args.batch_size))
        images = [rows[i % len(rows)] for i in range(n_batches * args.batch_size)]
        images = [(f"c/img{i:05d}", label, path) for i, (_, label, path) in enumerate(images)]  # unique ids
        ratios, extract_times, bare_times = [], [], []
        for rep in range(args.repeats):  # alternate which runs first; pair each extract with its neighbour
            if rep % 2:
                bare_times.append(run_bare(adapter, images, args.batch_size))
            extract_times.append(run_extract(adapter, images, args.batch_size, tmp / f"out{rep}"))
            if not rep % 2:
                bare_times.append(run_bare(adapter, images, args.batch_size))
            ratios.append(extract_times[-1] / bare_times[-1])
        print(f"(a) {len(images)} images x {args.repeats} repeats: extract median {statistics.median(extract_times):.1f} s, "
              f"bare forward median {statistics.median(bare_times):.1f} s -> ratio median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}; goal <= 1.15)")

        rss = {}
        for n in (args.n, 4 * args.n):
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(model_dir), str(tmp / "images"), "--n", str(n),
                 "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                capture_output=True, text=True, check=True,
            )
            rss[n] = float(done.stdout.strip().splitlines()[-1])
        kept = (args.layers + 1) * 2 * adapter.info.hidden_size * 4 * 3 * args.n / 2**20
        print(f"(b) peak RSS: {args.n} images {rss[args.n]:.0f} MiB, {4 * args.n} images {rss[4 * args.n]:.0f} MiB "
              f"-> ratio {rss[4 * args.n] / rss[args.n]:.3f} (goal <= 1.1); "
              f"holding the extra {3 * args.n} images' vectors in memory would add {kept:.1f} MiB")


if __name__ == "__main__":
    main()
