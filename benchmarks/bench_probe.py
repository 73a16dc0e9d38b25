"""One whole train_probe job (CV grid + refit + control, 2 positions) with both solvers, side by side.

Sizes: `default` (the embedded default: 10 classes x 50 train images, width 576) and `paper`
(120 classes x 50, width 4,096). Features are synthetic hidden states with the spectrum of real
ones: class means in a low-rank subspace, a power-law tail of shared directions, a few massive
activations and per-feature scales (see `hidden_states`); a test split of 30 per class measures
accuracy. Both jobs go through `train_layer_probes` (what scripts/train_probe.py runs) on a
Parquet embedding file, so I/O is included.

At the paper's size a whole scikit-learn job takes hours on 2 cores; with `--sklearn sample`
(default for `paper`) it fits, for the first position, fold 0 of the CV at every C and the refit
at torch's chosen C (each capped at `--sklearn-max-iter` iterations), and the job time is
extrapolated from them (printed with its formula): every fold costs what fold 0 costs, the 5
folds run `threads` at a time, the control costs what the refit costs, and the second position
what the first. A capped fit makes the estimate a lower bound (marked `>=`). `--sklearn full`
runs the whole job instead.

`--real <run>/<model>/embeddings/train/<anchor>/layer9.parquet ...` prints the calibration of
the synthetic features instead: their standardised spectrum and scikit-learn's iterations per C
beside the same of real layers.

Run: nice .venv/bin/python benchmarks/bench_probe.py [--sizes default paper] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

CS = [0.001, 0.01, 0.1, 1.0, 10.0]
SIZES = {"default": (10, 50, 576), "paper": (120, 50, 4096)}  # classes, train per class, width
POSITIONS = ("last", "image_mean")
TEST_PER_CLASS = 30


def hidden_states(n_classes: int, dim: int, per_class: dict[str, int], seed: int) -> dict[str, tuple]:
    """Synthetic (features, labels) per split, all splits drawn from one population.

    Shared directions with a power-law spectrum (what dominates the covariance of real hidden
    states) over a low noise floor, class means in the top 32 of them (the class signal of real
    states lies in their large directions: a probe at C = 0.001 already scores well above chance),
    four massive-activation features with a large mean, and log-normal per-feature scales.
    Calibrated on the embedded default's real last-token states (`--real`): after
    standardisation the top 10 directions hold 0.74-0.89 of the variance in real layers and
    ~0.9 here, and scikit-learn's lbfgs needs iteration counts of the same order.
    """
    rng = np.random.default_rng(seed)
    rank, shared = 32, 256
    mixing = rng.normal(size=(shared, dim)) / np.sqrt(shared)
    spectrum = 60.0 * np.arange(1, shared + 1) ** -1.0
    centres = (rng.normal(size=(n_classes, rank)) * spectrum[:rank]) @ mixing[:rank] * 0.4
    massive = 100 * rng.normal(size=4)
    scales = rng.lognormal(0, 0.5, size=dim)
    splits = {}
    for name, count in per_class.items():
        y = np.repeat(np.arange(n_classes), count)
        x = centres[y] + (rng.normal(size=(len(y), shared)) * spectrum) @ mixing + 0.1 * rng.normal(size=(len(y), dim))
        x[:, :4] += massive + 5 * rng.normal(size=(len(y), 4))
        splits[name] = ((x * scales).astype(np.float32), y.astype(np.int32))
    return splits


def spectrum_and_iterations(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> str:
    """What the calibration compares: the standardised spectrum's top-10 share, and scikit-learn's
    lbfgs iterations and test accuracy at each C (fits on all training rows, one thread)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(x)
    z, z_test = scaler.transform(x), scaler.transform(x_test)
    eig = np.linalg.svd(z, compute_uv=False) ** 2
    its, accs = [], []
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for C in CS:
            model = LogisticRegression(C=C, max_iter=5000, tol=1e-4).fit(z, y)
            its.append(int(model.n_iter_.max()))
            accs.append(f"{np.mean(model.predict(z_test) == y_test):.2f}")
    return f"top-10 share {eig[:10].sum() / eig.sum():.2f}; iterations {its}; test accuracy {accs}"


def compare_with_real(train_files: list[str]) -> None:
    """The calibration: real layers (train files of a finished run; the test split beside them)
    against the synthetic features of the default size, position `last`."""
    from stagelens.store import read_vectors

    print(f"scikit-learn at C = {CS}, tol 1e-4, on standardised features, position last")
    for train in train_files:
        _, y, x = read_vectors(train, "last")
        _, y_test, x_test = read_vectors(train.replace("/train/", "/test/"), "last")
        print(f"real {train}: {spectrum_and_iterations(x, y, x_test, y_test)}", flush=True)
    classes, per_class, dim = SIZES["default"]
    data = hidden_states(classes, dim, {"train": per_class, "test": TEST_PER_CLASS}, 0)
    print(f"synthetic {classes} classes x {per_class}, width {dim}: "
          f"{spectrum_and_iterations(*data['train'], *data['test'])}")


def write_layer(root: Path, size: str, seed: int) -> tuple[Path, dict]:
    """A train embedding file with both positions, and the test features per position."""
    from stagelens.store import write_embeddings

    classes, per_class, dim = SIZES[size]
    data = {pos: hidden_states(classes, dim, {"train": per_class, "test": TEST_PER_CLASS}, seed + i)
            for i, pos in enumerate(POSITIONS)}
    y = data[POSITIONS[0]]["train"][1]
    path = write_embeddings(
        root / f"{size}.parquet", [f"s{i}" for i in range(len(y))], y,
        {pos: d["train"][0] for pos, d in data.items()},
        {"model_name": "synthetic", "layer": 0, "positions": list(POSITIONS), "split": "train"})
    return path, {pos: d["test"] for pos, d in data.items()}


def settings(solver: str, device: str) -> dict:
    return {"Cs": CS, "cv_folds": 5, "max_iter": 1000, "tol": 1e-4, "solver": solver, "device": device}


def run_job(path: Path, solver: str, device: str, threads: int):
    from stagelens.probe_training import train_layer_probes

    start = time.perf_counter()
    fitted = train_layer_probes(path, settings(solver, device), seed=0, threads=threads)
    return time.perf_counter() - start, fitted


def iterations(fitted) -> int:
    """Solver iterations of the whole job: every CV fit, the refits and the controls."""
    total = 0
    for kind in ("probe", "control"):
        for fit in getattr(fitted, f"{kind}_sidecar")["fit"].values():
            total += fit["n_iter"] + sum(sum(f["n_iter"]) for f in fit["cv_fits"].values())
    return total


def test_accuracy(probes, test) -> dict[str, float]:
    return {pos: float(np.mean(probes[pos].predict(x) == y)) for pos, (x, y) in test.items()}


def sklearn_sample(path: Path, torch_fitted, threads: int, max_iter: int) -> tuple[float, int, dict, dict, bool]:
    """Fold 0 at every C and the refit at torch's chosen C with scikit-learn (first position), timed;
    the job extrapolated. The last item says whether a fit hit max_iter (then a lower bound)."""
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from stagelens.probe_training import stratified_folds
    from stagelens.store import read_vectors

    template = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, tol=1e-4))
    total_s, total_iter, refits, detail, capped = 0.0, 0, {}, {}, False
    for pos in POSITIONS[:1]:
        _, y, x = read_vectors(path, pos)
        train, _ = stratified_folds(y, 5, 0)[0]
        chosen = torch_fitted.probe_sidecar["fit"][pos]["C"]
        fold_s, fold_iter = 0.0, 0
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for C in CS:
                start = time.perf_counter()
                model = clone(template).set_params(logisticregression__C=C).fit(x[train], y[train])
                fold_s += time.perf_counter() - start
                fold_iter += int(model[1].n_iter_.max())
                capped |= int(model[1].n_iter_.max()) >= max_iter
            start = time.perf_counter()
            refit = clone(template).set_params(logisticregression__C=chosen).fit(x, y)
            refit_s = time.perf_counter() - start
        refit_iter = int(refit[1].n_iter_.max())
        capped |= refit_iter >= max_iter
        # 5 folds like fold 0, run `threads` at a time; the control costs what the refit costs;
        # both positions cost the same.
        total_s += len(POSITIONS) * (5 * fold_s / min(threads, 5) + 2 * refit_s)
        total_iter += len(POSITIONS) * (5 * fold_iter + 2 * refit_iter)
        refits[pos] = refit
        detail[pos] = (f"fold 0 over {len(CS)} Cs {fold_s:.0f} s ({fold_iter} it), refit {refit_s:.0f} s "
                       f"({refit_iter} it); job = {len(POSITIONS)} x (5 x fold 0 / {min(threads, 5)} + 2 x refit)")
    return total_s, total_iter, refits, detail, capped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--threads", type=int, default=2, help="the job's threads (torch threads, sklearn n_jobs)")
    parser.add_argument("--device", default="cpu", help="probe.device of the torch job")
    parser.add_argument("--sklearn", choices=["full", "sample", "auto"], default="auto",
                        help="full job, or fold 0 + refit extrapolated (auto: sample at the paper size)")
    parser.add_argument("--sklearn-max-iter", type=int, default=1000, help="iteration cap of the sampled fits")
    parser.add_argument("--real", nargs="+", metavar="TRAIN_PARQUET",
                        help="instead: compare real layers of a finished run with the synthetic features")
    args = parser.parse_args()
    if args.real:
        return compare_with_real(args.real)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; torch device {args.device}, "
          f"{args.threads} threads")
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path, test = write_layer(Path(tmp), size, seed=0)
            t_torch, torch_fit = run_job(path, "torch", args.device, args.threads)
            acc_torch = test_accuracy(torch_fit.probes, test)
            mode = args.sklearn if args.sklearn != "auto" else ("sample" if size == "paper" else "full")
            if mode == "full":
                t_sk, sk_fit = run_job(path, "sklearn", "cpu", args.threads)
                it_sk, acc_sk = iterations(sk_fit), test_accuracy(sk_fit.probes, test)
                c_sk = {p: f["C"] for p, f in sk_fit.probe_sidecar["fit"].items()}
                note = "measured"
            else:
                t_sk, it_sk, refits, detail, capped = sklearn_sample(path, torch_fit, args.threads,
                                                                     args.sklearn_max_iter)
                acc_sk = {pos: float(np.mean(refits[pos].predict(test[pos][0]) == test[pos][1])) for pos in refits}
                c_sk = {p: "(torch's)" for p in refits}
                note = ("extrapolated" + (", a LOWER BOUND (a sampled fit hit the cap)" if capped else "") + ": "
                        + "; ".join(f"{p}: {d}" for p, d in detail.items()))
            c_torch = {p: f["C"] for p, f in torch_fit.probe_sidecar["fit"].items()}
            converged = all(f["converged"] for f in torch_fit.probe_sidecar["fit"].values())
            rows.append((size, t_sk, t_torch, it_sk, iterations(torch_fit), acc_sk, acc_torch, c_sk, c_torch,
                         converged, note))
            print(f"[{size}] done", flush=True)
    print(f"\n{'size':<8}{'sklearn s':>11}{'torch s':>9}{'ratio':>7}{'sk iters':>10}{'torch iters':>12}"
          f"{'max |acc diff|':>16}  chosen C sklearn / torch")
    for size, t_sk, t_t, it_sk, it_t, acc_sk, acc_t, c_sk, c_t, converged, note in rows:
        diff = max(abs(acc_sk[p] - acc_t[p]) for p in acc_sk)
        print(f"{size:<8}{t_sk:>11.1f}{t_t:>9.1f}{t_sk / t_t:>7.1f}{it_sk:>10}{it_t:>12}{diff:>16.4f}  "
              f"{c_sk} / {c_t}")
        print(f"         test accuracy sklearn {acc_sk}, torch {acc_t}; torch fits all converged: {converged}")
        print(f"         sklearn time {note}")


if __name__ == "__main__":
    main()
