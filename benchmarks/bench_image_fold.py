"""What folding the image pass into a prompt job saves (share_prefix), on the embedded default's model.

Side by side, alternately, --repeats times on the same train images: (a) the anchor's prompt pass,
then the image pass (image positions + every vision layer) as its own forward, as two jobs do
without share_prefix; (b) the anchor's prompt pass writing the image pass's files from its own
forward, as extract_<model> does with share_prefix. Printed (never asserted): the seconds of
each and the ratio of the fastest runs. Needs a built embedded checkpoint (a finished `make run`):

    .venv/bin/python benchmarks/bench_image_fold.py --model results/models/effnet-smollm2 \\
        --manifest results/data/manifest.parquet [--images 48] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from stagelens.adapters import load_adapter
from stagelens.extract import extract, extract_image, read_split
from stagelens.spec import ModelSpec

ANCHOR = {"id": "anchor", "family": "anchor", "expected": "yes",
          "text": "Does this image show a piece of clothing? The answer must be always yes or no."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec("effnet-smollm2", args.model, dtype="float32", device="cpu", batch_size=8,
                     positions=("last", "question_last", "image_mean"), vision_num_layers=8)
    adapter = load_adapter(spec)
    samples = read_split(args.manifest, "train")[: args.images]
    layers, vision_layers = spec.layers_of(adapter.info.num_layers), spec.vision_layers_of()

    def files(root: Path):
        return ([root / f"prompt{l}.parquet" for l in layers], root / "answers.parquet", root / "readout.parquet",
                [root / f"image{l}.parquet" for l in layers], [root / f"vision{v}.parquet" for v in vision_layers])

    def separate(root: Path) -> None:
        prompt, answers, readout, image, vision = files(root)
        extract(adapter, spec, samples, ANCHOR, prompt, answers, split="train", readout_path=readout, progress=False)
        extract_image(adapter, spec, samples, image, split="train", vision_paths=vision, progress=False)

    def folded(root: Path) -> None:
        prompt, answers, readout, image, vision = files(root)
        extract(adapter, spec, samples, ANCHOR, prompt, answers, split="train", readout_path=readout, progress=False,
                image_paths=image, vision_paths=vision)

    runs = {"(a) prompt pass, then the image pass": separate, "(b) prompt pass writing the image files": folded}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for i, (name, run) in enumerate(runs.items()):
                root = Path(tmp) / f"{rep}-{i}"
                root.mkdir()
                start = time.perf_counter()
                run(root)
                seconds[name].append(time.perf_counter() - start)
    for name, times in seconds.items():
        print(f"{name}: {', '.join(f'{t:.1f}' for t in times)} s ({len(samples)} train images, batch 8, "
              f"{args.threads} threads, {len(layers)} LM and {len(vision_layers)} vision layers)")
    best = [min(times) for times in seconds.values()]
    print(f"(a) / (b), fastest of each: {best[0] / best[1]:.2f}")


if __name__ == "__main__":
    main()
