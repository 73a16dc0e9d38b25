"""Shared-prefix extraction (models.<m>.share_prefix) against one job per prompt, on the embedded
default model itself (printed, never asserted).

The same images and the config's prompts (anchor + variants) go through `extract` once per prompt
and through `extract_prompts` once, alternately, --repeats times; printed: the seconds of each,
the median ratio with its range, seconds per prompt pass, and the largest difference between the
two runs' vectors relative to the largest vector entry (float rounding of the cached continuation).
Needs the built checkpoint of a finished `make run` (or `snakemake results/models/effnet-smollm2`):

    .venv/bin/python benchmarks/bench_shared_prefix.py [--images 48] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from stagelens.adapters import load_adapter  # noqa: E402
from stagelens.extract import Sample, extract, extract_prompts  # noqa: E402
from stagelens.spec import ModelSpec  # noqa: E402
from stagelens.store import read_vectors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "results" / "models" / "effnet-smollm2")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(args.config.read_text())
    entry = next(iter(cfg["models"].values()))
    prompts = [cfg["prompts"]["anchor"], *cfg["prompts"].get("variants", [])]
    spec = ModelSpec(name="bench", checkpoint=str(args.model), dtype="float32", device="cpu",
                     batch_size=entry.get("batch_size", 8), num_layers=entry["num_layers"],
                     positions=("last", "question_last"))
    adapter = load_adapter(spec)
    files = sorted((REPO / cfg["dataset"]["root"]).glob("*/*.png"))[: args.images]
    samples = [Sample(str(f), i % 10, str(f)) for i, f in enumerate(files)]
    layers = spec.layers_of(adapter.info.num_layers)

    def paths(root: Path, prompt: dict) -> tuple[list[Path], Path, Path]:
        d = root / prompt["id"]
        return [d / f"layer{layer}.parquet" for layer in layers], d / "answers.parquet", d / "readout.parquet"

    per_prompt, shared, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            own_root, shared_root = Path(tmp) / f"own{r}", Path(tmp) / f"shared{r}"
            start = time.perf_counter()
            for prompt in prompts:
                emb, ans, readout = paths(own_root, prompt)
                extract(adapter, spec, samples, prompt, emb, ans, split="test", readout_path=readout, progress=False)
            per_prompt.append(time.perf_counter() - start)
            start = time.perf_counter()
            files_of = [paths(shared_root, p) for p in prompts]
            extract_prompts(adapter, spec, samples, prompts, [e for emb, _, _ in files_of for e in emb],
                            [a for _, a, _ in files_of], [o for _, _, o in files_of], split="test", progress=False)
            shared.append(time.perf_counter() - start)
            ratios.append(per_prompt[-1] / shared[-1])
            print(f"repeat {r}: per prompt {per_prompt[-1]:.1f} s, shared prefix {shared[-1]:.1f} s, "
                  f"ratio {ratios[-1]:.2f}", flush=True)
        worst = 0.0
        for prompt in prompts:
            for a, b in zip(paths(Path(tmp) / "own0", prompt)[0], paths(Path(tmp) / "shared0", prompt)[0]):
                for pos in spec.positions:
                    x, y = read_vectors(a, pos)[2], read_vectors(b, pos)[2]
                    worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
    passes = len(samples) * len(prompts)
    print(f"{len(prompts)} prompts x {len(samples)} images, {len(layers)} layers, batch {spec.batch_size}, "
          f"{args.threads} threads")
    print(f"per prompt: {statistics.median(per_prompt) / passes:.3f} s per prompt pass; shared prefix: "
          f"{statistics.median(shared) / passes:.3f} s")
    print(f"ratio (per prompt / shared prefix): median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"largest vector difference / largest entry: {worst:.1e}")


if __name__ == "__main__":
    main()
