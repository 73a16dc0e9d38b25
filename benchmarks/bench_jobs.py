"""Per-job cost of the analysis DAG, and the dry-run time of a paper-scale DAG.

Prints (never asserts) medians of:
- an evaluation job: scripts/evaluate.py as a subprocess on paper-like synthetic inputs
  (120 classes x 20 test images = 2,400 images, width 4,096 as LLaVA-1.5 / LLaMA-3-8B,
  positions last + image_mean, 1,000 bootstrap resamples), and with the single `last` position;
- a probe-training job: scripts/train_probe.py as a subprocess on a reduced problem (stated below;
  a paper-scale fit takes minutes to tens of minutes and says nothing more about per-job overhead);
- the Python floors: interpreter + the evaluation job's imports, and the imports of the preamble
  Snakemake puts in front of every `script:` (paid by every job, whatever the script does);
- `snakemake --dry-run` of a generated paper-scale config: 3 models x 33 layers x 6 prompts.

Run: .venv/bin/python benchmarks/bench_jobs.py [--repeats N] [--skip-dry-run]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from script_job import run_script  # noqa: E402  (the same stand-in the tests use)

from stagelens.probe import Probe, save_probes  # noqa: E402
from stagelens.store import write_embeddings  # noqa: E402

N_CLASSES, TEST_PER_CLASS, WIDTH = 120, 20, 4096
TRAIN = {"classes": 120, "per_class": 10, "width": 512,
         "probe": {"cv_folds": 5, "Cs": [0.001, 0.01, 0.1, 1.0, 10.0], "max_iter": 1000}}  # the default recipe


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def embeddings(path: Path, n_classes: int, per_class: int, width: int, positions, prompt: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.int32)
    centers = rng.normal(size=(n_classes, width)).astype(np.float32) * 0.3
    vectors = {pos: centers[labels] + rng.normal(size=(len(labels), width)).astype(np.float32) for pos in positions}
    meta = {"model_name": "bench", "revision": "main", "layer": 16, "num_layers": 32,
            "positions": list(positions), "prompt_id": prompt}
    ids = [f"c{y}/img{i}" for i, y in enumerate(labels)]
    return write_embeddings(path, ids, labels, vectors, meta)


def random_probe(rng: np.random.Generator, n_classes: int, width: int) -> Probe:
    return Probe(weight=rng.normal(size=(n_classes, width)).astype(np.float32) * 0.01,
                 bias=np.zeros(n_classes, np.float32), mean=np.zeros(width, np.float32),
                 scale=np.ones(width, np.float32), classes=np.arange(n_classes, dtype=np.int64))


def bench_evaluate(root: Path, positions: tuple[str, ...], repeats: int,
                   n_classes: int = N_CLASSES, per_class: int = TEST_PER_CLASS, width: int = WIDTH) -> float:
    rng = np.random.default_rng(0)
    tag = "_".join(positions) + f"_{n_classes}x{per_class}x{width}"
    anchor = embeddings(root / f"anchor_{tag}.parquet", n_classes, per_class, width, positions, "anchor", 1)
    variant = embeddings(root / f"variant_{tag}.parquet", n_classes, per_class, width, positions, "lex", 2)
    save_probes({p: random_probe(rng, n_classes, width) for p in positions}, root / f"probe_{tag}.safetensors", {})
    save_probes({p: random_probe(rng, n_classes, width) for p in positions}, root / f"control_{tag}.safetensors", {})
    job = dict(
        input={"probe": root / f"probe_{tag}.safetensors", "control": root / f"control_{tag}.safetensors",
               "variant": variant, "anchor": anchor},
        output={"metrics": root / f"metrics_{tag}.parquet"},
        params={"model_name": "bench", "prompt": {"id": "lex", "family": "lexical", "expected": "yes"},
                "evaluate": {"n_bootstrap": 1000, "ci": 0.95}, "seed": 0},
        log=root / "evaluate.log",
    )
    run_script("evaluate.py", **job)  # warm the page cache once
    return median_time(lambda: run_script("evaluate.py", **job), repeats)


def bench_train(root: Path, repeats: int) -> float:
    train = embeddings(root / "train.parquet", TRAIN["classes"], TRAIN["per_class"], TRAIN["width"], ("last",), "anchor", 3)
    job = dict(
        input={"embeddings": train},
        output={"probe": root / "probe_train.safetensors", "control": root / "control_train.safetensors"},
        params={"probe": TRAIN["probe"], "seed": 0},
        log=root / "train.log",
    )
    return median_time(lambda: run_script("train_probe.py", **job), repeats)


def bench_python(code: str, repeats: int) -> float:
    return median_time(lambda: subprocess.run([sys.executable, "-c", code], check=True), repeats)


def bench_dry_run(root: Path, repeats: int) -> tuple[float, str]:
    images = root / "images"
    for k in range(N_CLASSES):
        (images / f"n{k:08d}").mkdir(parents=True, exist_ok=True)
    variants = [
        {"id": "lex_picture", "family": "lexical", "text": "Does this picture show an animal? The answer must be always yes or no.", "expected": "yes"},
        {"id": "lex_feature", "family": "lexical", "text": "Does this image feature an animal? The answer must be always yes or no.", "expected": "yes"},
        {"id": "neg_plane", "family": "negation", "text": "Does this image show a plane? The answer must be always yes or no.", "expected": "no"},
        {"id": "fmt_10", "family": "format", "text": "Does this image show an animal? The answer must be always 1 or 0.", "expected": "1"},
        {"id": "ctl_suffix", "family": "control", "text": "Does this image show an animal? The answer must be always yes or no. Thanks.", "expected": "yes"},
    ]
    config = {
        "seed": 0,
        "dataset": {"root": str(images), "train_per_class": 50, "test_per_class": 20},
        "models": {
            name: {"path": path, "num_layers": 32, "device": "cuda", "dtype": "bfloat16"}
            for name, path in (("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf"),
                               ("llava-next-8b", "llava-hf/llama3-llava-next-8b-hf"),
                               ("llava-1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf"))
        },
        "prompts": {"anchor": {"id": "anchor", "family": "anchor", "text": "Does this image show an animal? The answer must be always yes or no.", "expected": "yes"},
                    "variants": variants},
    }
    configfile = root / "paper_scale.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(root / "work"),
           "--configfile", str(configfile), "--replace-workflow-config", "--workflow-profile", "none",
           "--dry-run", "--quiet", "rules"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("total"))
    stats = "\n".join(lines[start : end + 1])
    return median_time(lambda: subprocess.run(cmd, check=True, capture_output=True), repeats), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-dry-run", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        floor = bench_python("import numpy, pyarrow.parquet, safetensors.numpy, stagelens.metrics, stagelens.store", args.repeats)
        preamble = bench_python("import pickle, snakemake.script; from snakemake.logging import logger; "
                                "from snakemake.iocontainers import Snakemake", args.repeats)
        eval_two = bench_evaluate(root, ("last", "image_mean"), args.repeats)
        # First read of one vector column in a fresh process: pq.read_table (what store.read_vectors
        # uses) imports pyarrow.dataset on first call; ParquetFile.read does not.
        sample = root / f"anchor_last_image_mean_{N_CLASSES}x{TEST_PER_CLASS}x{WIDTH}.parquet"
        read_table = bench_python(f"import pyarrow.parquet as pq; pq.read_table('{sample}', columns=['sample_id', 'label', 'last'])", args.repeats)
        read_file = bench_python(f"import pyarrow.parquet as pq; pq.ParquetFile('{sample}').read(columns=['sample_id', 'label', 'last'])", args.repeats)
        eval_one = bench_evaluate(root, ("last",), args.repeats)
        # The embedded default (config/config.yaml): 10 classes x 30 test images, SmolLM2 width 576.
        eval_small = bench_evaluate(root, ("last", "image_mean"), args.repeats, n_classes=10, per_class=30, width=576)
        train = bench_train(root, max(1, args.repeats // 2))
        n_test = N_CLASSES * TEST_PER_CLASS
        print(f"python + evaluation imports (numpy, pyarrow, safetensors, stagelens): {floor:.3f} s")
        print(f"Snakemake script preamble imports (every script job):             {preamble:.3f} s")
        print(f"fresh process, import + read one {n_test} x {WIDTH} column: pq.read_table {read_table:.3f} s, "
              f"pq.ParquetFile(...).read {read_file:.3f} s")
        print(f"evaluate job, {n_test} test images x D={WIDTH}, {N_CLASSES} classes, 2 positions: {eval_two:.3f} s (median of {args.repeats})")
        print(f"evaluate job, {n_test} test images x D={WIDTH}, {N_CLASSES} classes, 1 position:  {eval_one:.3f} s (median of {args.repeats})")
        print(f"evaluate job, 300 test images x D=576, 10 classes, 2 positions (embedded default): {eval_small:.3f} s (median of {args.repeats})")
        print(f"train_probe job, {TRAIN['classes'] * TRAIN['per_class']} train images x D={TRAIN['width']}, "
              f"{TRAIN['classes']} classes, 1 position, Cs={TRAIN['probe']['Cs']}, {TRAIN['probe']['cv_folds']}-fold CV, "
              f"probe + control: {train:.3f} s (median of {max(1, args.repeats // 2)})")
        print(f"ratio train_probe / evaluate (2 positions): {train / eval_two:.1f}x; evaluate goal <= 0.3 s: "
              f"{'met' if eval_two <= 0.3 else 'NOT met'} (2 positions), {'met' if eval_one <= 0.3 else 'NOT met'} (1 position)")
        if not args.skip_dry_run:
            dry, stats = bench_dry_run(root, max(1, args.repeats // 2))
            print(f"snakemake --dry-run, 3 models x 33 layers x 6 prompts: {dry:.2f} s (median of {max(1, args.repeats // 2)}); "
                  f"goal <= 10 s: {'met' if dry <= 10 else 'NOT met'}")
            print(stats)


if __name__ == "__main__":
    main()
