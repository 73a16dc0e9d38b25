"""What a run of config/paper.yaml costs: GPU time, disk, and the CPU time of the probes.

Estimates, printed (never asserted):
- forward FLOPs per image ~ 2 x N_params x T (T = image tokens + prompt tokens), the image passes
  per model (train split x anchor + test split x every prompt), the GPU time at an effective
  throughput (default 250 TFLOP/s bf16: ~25% of an H100's dense peak);
- embedding disk: (L + 1) layers x positions x width x bytes per image pass, before and after
  the image pass (before: every prompt's files also held the image positions; after: the image
  positions once per image, the prompts' files only the prompt-dependent ones), and the GPU cost
  of the image pass itself (image tokens + the template's few tokens before them, per image), and
  the vision-layer files it also writes (vision_num_layers + 1 layers x positions x the tower's
  width, once per image);
- probe training: one job per layer fits, per position, the CV grid (folds x Cs), the refit and
  the shuffled-label control; with --measure-fit, one position is fitted with the torch solver
  (probe.solver: torch) on synthetic hidden states of the paper's size (6,000 x 4,096, 120
  classes; benchmarks/bench_probe.py) on --device, and multiplied by positions and jobs.
  bench_probe.py compares the solvers.

Run: .venv/bin/python benchmarks/paper_cost.py [--tflops 250] [--measure-fit [--device cuda]]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Total parameters (LM + vision tower + projector), width, and the image tokens of a typical
# 500 x 375 photo (Stanford Dogs / ImageNet median shape): 576 for LLaVA-1.5; LLaVA-NeXT's anyres
# count for that shape (2,144 of 1,176-2,928); Qwen2-VL 13 x 18 patches of 28 px (max_pixels 448^2).
MODELS = {
    "llava-hf/llava-1.5-7b-hf": {"params": 7.06e9, "image_tokens": 576},
    "llava-hf/llama3-llava-next-8b-hf": {"params": 8.36e9, "image_tokens": 2340},
    "Qwen/Qwen2-VL-7B-Instruct": {"params": 8.29e9, "image_tokens": 234},
    "llava-hf/llava-v1.6-vicuna-7b-hf": {"params": 7.06e9, "image_tokens": 2340},
}
WIDTH = {"llava-hf/llava-1.5-7b-hf": 4096, "llava-hf/llama3-llava-next-8b-hf": 4096,
         "Qwen/Qwen2-VL-7B-Instruct": 3584, "llava-hf/llava-v1.6-vicuna-7b-hf": 4096}
# The vision tower's width and its positions per vision layer (patch mean, and CLS where it has one).
VISION = {"llava-hf/llava-1.5-7b-hf": (1024, 2), "llava-hf/llama3-llava-next-8b-hf": (1024, 2),
          "Qwen/Qwen2-VL-7B-Instruct": (1280, 1), "llava-hf/llava-v1.6-vicuna-7b-hf": (1024, 2)}
PROMPT_TOKENS = 35  # template + question: 27-40 tokens for the paper prompts in the real vocabularies
PREFIX_TOKENS = 20  # template tokens before the last image token: 4 (LLaVA-1.5) to 20 (Qwen2-VL's system turn)
IMAGE_POSITIONS = ("image_mean",)  # stagelens.positions.IMAGE_POSITIONS (not imported: no install needed)
GIB = 1024**3


def load_paper() -> dict:
    return yaml.safe_load((REPO / "config" / "paper.yaml").read_text())


def n_classes(cfg: dict) -> int:
    with open(REPO / cfg["dataset"]["class_list"], encoding="utf-8", newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh, delimiter="\t"))


def passes_per_model(cfg: dict) -> tuple[int, int, int]:
    """(train passes, test passes, prompts): train = anchor only, test = every prompt."""
    classes = n_classes(cfg)
    prompts = 1 + len(cfg["prompts"].get("variants", []))
    return classes * cfg["dataset"]["train_per_class"], classes * cfg["dataset"]["test_per_class"] * prompts, prompts


def gpu_and_disk(cfg: dict, tflops: float, all_models: bool) -> None:
    train, test, prompts = passes_per_model(cfg)
    passes = train + test
    images = train + test // prompts
    print(f"image passes per model: {train} train (anchor) + {test} test ({prompts} prompts) = {passes}; "
          f"image pass: {images} images (train + test, once each)")
    print(f"{'model':<24}{'T':>6}{'TFLOP/img':>11}{'GPU h':>8}{'+image h':>9}{'GiB before':>11}{'GiB after':>10}"
          f"{'+vision GiB':>12}")
    total_h = total_image_h = total_before = total_after = total_vision = 0.0
    # A prompt with text before the image keeps its own image positions on the test split.
    own_image = sum(bool(v.get("before_image")) for v in cfg["prompts"].get("variants", [])) * (test // prompts)
    for name, m in cfg["models"].items():
        if not (m.get("enabled", True) or all_models):
            continue
        spec = MODELS[m["path"]]
        tokens = spec["image_tokens"] + PROMPT_TOKENS
        tflop = 2 * spec["params"] * tokens / 1e12
        hours = passes * tflop / tflops / 3600
        image_hours = images * 2 * spec["params"] * (spec["image_tokens"] + PREFIX_TOKENS) / 1e12 / tflops / 3600
        layers = len(m.get("layers") or range(m["num_layers"] + 1))
        nbytes = 2 if m.get("vector_dtype", "float32") == "float16" else 4
        positions = m.get("positions", ["last", "image_mean"])
        n_image = sum(p in IMAGE_POSITIONS for p in positions)
        vector = layers * WIDTH[m["path"]] * nbytes
        before = passes * len(positions) * vector / GIB
        after = (passes * (len(positions) - n_image) + (images + own_image) * n_image) * vector / GIB
        total_h, total_image_h = total_h + hours, total_image_h + (image_hours if n_image else 0.0)
        total_before, total_after = total_before + before, total_after + after
        vision_width, vision_positions = VISION[m["path"]]
        vision_layers = len(m.get("vision_layers") or range(m["vision_num_layers"] + 1)) if m.get("vision_num_layers") else 0
        vision = images * vision_layers * vision_positions * vision_width * nbytes / GIB
        total_vision += vision
        print(f"{name:<24}{tokens:>6}{tflop:>11.1f}{hours:>8.2f}{image_hours if n_image else 0.0:>9.2f}"
              f"{before:>11.1f}{after:>10.1f}{vision:>12.1f}")
    print(f"{'total':<24}{'':>6}{'':>11}{total_h:>8.2f}{total_image_h:>9.2f}{total_before:>11.1f}{total_after:>10.1f}"
          f"{total_vision:>12.1f}")
    print(f"(effective throughput {tflops:.0f} TFLOP/s; model loading, image decoding and padding not included; "
          "+image h: the image pass, which stops at the last image token)")


def probe_plan(cfg: dict) -> tuple[int, int, int, int]:
    """(positions, fits per probe job, samples, classes) of the paper config."""
    probe = cfg.get("probe", {})
    folds, cs = probe.get("cv_folds", 5), len(probe.get("Cs", [0.001, 0.01, 0.1, 1.0, 10.0]))
    # Every position is fitted once per layer: the prompt-dependent ones by train_probe, the image
    # positions by train_image_probe.
    positions = len(next(iter(cfg["models"].values())).get("positions", ["last", "image_mean"]))
    fits = positions * (folds * cs + 2)  # CV grid, refit, shuffled-label control
    train, _, _ = passes_per_model(cfg)
    return positions, fits, train, n_classes(cfg)


def measure_fit(classes: int, per_class: int, width: int, device: str, threads: int) -> tuple[float, int, bool]:
    """Seconds, solver iterations and convergence of one position of a probe job (CV grid,
    refit, control) with the torch solver on synthetic hidden states of the given size."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_probe import hidden_states

    from stagelens.probe_training import ProbeSettings, fit_probe_and_control

    x, y = hidden_states(classes, width, {"train": per_class}, seed=0)["train"]
    settings = ProbeSettings(Cs=[0.001, 0.01, 0.1, 1.0, 10.0], cv_folds=5, max_iter=1000, tol=1e-4,
                             solver="torch", device=device)
    start = time.perf_counter()
    _, real, _, control = fit_probe_and_control(x, y, settings, seed=0, threads=threads)
    seconds = time.perf_counter() - start
    iters = real.n_iter + control.n_iter + sum(sum(f["n_iter"]) for f in real.cv_fits.values())
    return seconds, iters, real.converged and control.converged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=250.0, help="effective bf16 TFLOP/s of the GPU")
    parser.add_argument("--all-models", action="store_true", help="include models with enabled: false")
    parser.add_argument("--measure-fit", action="store_true",
                        help="time one paper-size position of a probe job with the torch solver")
    parser.add_argument("--device", default="cpu", help="device of the timed probe fit (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the timed probe fit")
    args = parser.parse_args()
    cfg = load_paper()
    gpu_and_disk(cfg, args.tflops, args.all_models)

    positions, fits, n, classes = probe_plan(cfg)
    layers = sum(len(m.get("layers") or range(m["num_layers"] + 1))
                 for m in cfg["models"].values() if m.get("enabled", True) or args.all_models)
    vision_layers = sum(len(m.get("vision_layers") or range(m["vision_num_layers"] + 1))
                        for m in cfg["models"].values()
                        if m.get("vision_num_layers") and (m.get("enabled", True) or args.all_models))
    print(f"\nprobe jobs: {layers} train_probe + {layers} train_image_probe (one each per model x layer), "
          f"{fits} logistic-regression fits per layer over both ({n} samples, {classes} classes); "
          f"{vision_layers} train_vision_probe (one per model x vision layer, its tower's width)")
    if args.measure_fit:
        seconds, iters, converged = measure_fit(classes, n // classes, 4096, args.device, args.threads)
        per_job = positions * seconds
        print(f"  torch solver, one position at width 4096 on {args.device} ({args.threads} threads): "
              f"{seconds:.1f} s, {iters} L-BFGS iterations, all converged: {converged}")
        print(f"  ~{per_job:.0f} s per layer ({positions} positions), "
              f"~{layers * per_job / 3600:.1f} h for all {2 * layers} probe jobs on this device")


if __name__ == "__main__":
    main()
