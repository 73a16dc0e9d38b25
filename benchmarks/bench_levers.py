"""The levers of `make run`'s wall time, measured on the embedded default model itself (printed, never asserted).

- per-job start-up: a fresh interpreter importing what an extraction job imports (torch,
  transformers, stagelens) and loading the embedded checkpoint, against a bare interpreter;
- extraction: seconds per image pass through `stagelens.extract.extract` on Fashion-MNIST images
  at each batch size x torch thread count (the default config runs batch 8, 4 threads asked,
  `--cores` permitting);
- projector training: seconds per step of the recipe (batch 8), the cost `projector: shipped` saves.

The model is the real one with a freshly initialised projector (speed does not depend on its
weights). It needs the exported LM:
    .venv/bin/snakemake --cores 2 results/cache/smollm2-135m-instruct-fp32
    .venv/bin/python benchmarks/bench_levers.py [--images 32] [--batch-sizes 1 4 8 16] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = {"id": "anchor", "family": "anchor", "expected": "yes",
          "text": "Does this image show a piece of clothing? The answer must be always yes or no."}


def timed_subprocess(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_checkpoint(lm_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stagelens.adapters.efficientnet_vision import pretrained_state_dict
    from stagelens.builders.embedded import assemble

    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    model = assemble(lm, AutoTokenizer.from_pretrained(lm_dir), pretrained_state_dict(), seed=0)
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=REPO / "results" / "cache" / "smollm2-135m-instruct-fp32")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="projector steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.lm.is_dir():
        raise SystemExit(f"{args.lm} missing: run `.venv/bin/snakemake --cores 2 results/cache/smollm2-135m-instruct-fp32` first")

    import numpy as np
    import torch

    from stagelens.adapters import load_adapter
    from stagelens.builders.projector_training import TrainSettings, train_projector, vision_features
    from stagelens.extract import Sample, extract, load_image
    from stagelens.image_sources import list_images
    from stagelens.spec import ModelSpec

    root = REPO / "resources" / "fashion_mnist"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(c, rel) for c in classes for rel in list_images(root / c)[: args.images // len(classes) + 1]][: args.images]
    samples = [Sample(f"{c}/{Path(rel).stem}", classes.index(c), str(root / c / rel)) for c, rel in files]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = build_checkpoint(args.lm, tmp / "model")
        bare = timed_subprocess("pass", args.repeats)
        imports = timed_subprocess("import torch, transformers, stagelens.extract, stagelens.adapters", args.repeats)
        loading = timed_subprocess(
            "from stagelens.adapters import load_adapter; from stagelens.spec import ModelSpec; "
            f"load_adapter(ModelSpec('m', {str(checkpoint)!r}, device='cpu'))", args.repeats)
        print(f"job start-up (median of {args.repeats}): interpreter {bare:.2f} s, + imports {imports:.2f} s, "
              f"+ loading the embedded checkpoint {loading:.2f} s")

        print(f"extraction, {len(samples)} images, 31 layers x 2 positions (s per image pass):")
        print("threads " + "".join(f"{'batch ' + str(b):>10}" for b in args.batch_sizes))
        for threads in args.threads:
            torch.set_num_threads(threads)
            cells = []
            for batch in args.batch_sizes:
                spec = ModelSpec("m", str(checkpoint), device="cpu", batch_size=batch)
                adapter = load_adapter(spec)
                layers = spec.layers_of(adapter.info.num_layers)
                out = tmp / f"out-{threads}-{batch}"
                extract(adapter, spec, samples[:batch], PROMPT, [out / "warm" / f"l{x}.parquet" for x in layers],
                        out / "warm" / "a.parquet", split="test", progress=False)  # warm-up
                summary = extract(adapter, spec, samples, PROMPT, [out / f"l{x}.parquet" for x in layers],
                                  out / "a.parquet", split="test", progress=False)
                cells.append(summary["seconds"] / len(samples))
            print(f"{threads:>7} " + "".join(f"{c:>10.3f}" for c in cells))

        torch.set_num_threads(max(args.threads))
        adapter = load_adapter(ModelSpec("m", str(checkpoint), device="cpu"))
        model = adapter.model
        features = vision_features(model, [load_image(s.path) for s in samples])
        labels = np.array([s.label for s in samples])
        settings = TrainSettings()
        history = train_projector(model, features, classes, labels, settings, stop_after=args.steps)
        per_step = history["train_seconds"] / args.steps
        print(f"projector training ({max(args.threads)} threads): {per_step:.1f} s per step of {settings.batch_size} "
              f"-> the {settings.steps}-step recipe ~{per_step * settings.steps / 60:.1f} min")


if __name__ == "__main__":
    main()
