"""Both probe solvers on a finished run's features, layer by layer: chosen C and test accuracy.

For every layer of one model of a run (`make run` or any config), both solvers fit the anchor
prompt's train features with the config's probe settings; the table lists, per layer and
position, the C each chose, the test accuracy of each (anchor prompt, test split), the
difference (goal: at most 0.01) and the time of each. Prints, never asserts.

Where CV scores of two Cs are within a few held-out rows, where each solver stops inside its
tolerance decides the C: scikit-learn at tol 1e-4 and at 1e-8 then disagree with each other as
much as with torch. `--sklearn-tol 1e-8 --torch-tol 1e-6` compares both solved close to the
optimum (torch's float32 fits are flagged unconverged there when they stall short of 1e-6).

Run: nice .venv/bin/python benchmarks/probe_agreement.py [--config config/config.yaml] [--model NAME]
     [--sklearn-tol T] [--torch-tol T] [--max-iter N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from stagelens.config import load_config
    from stagelens.probe_training import ProbeSettings, fit_probe_and_control
    from stagelens.store import read_metadata, read_vectors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--model", help="model name (default: the first enabled one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sklearn-tol", type=float, help="scikit-learn's tol (default: the config's probe.tol)")
    parser.add_argument("--torch-tol", type=float, help="torch's tol (default: the config's probe.tol)")
    parser.add_argument("--max-iter", type=int, help="both solvers' max_iter (default: the config's)")
    args = parser.parse_args()
    cfg = load_config(args.config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    model = args.model or next(n for n, m in cfg["models"].items() if m.get("enabled", True))
    anchor = cfg["prompts"]["anchor"]["id"]
    root = Path(cfg["results"]) / model / "embeddings"
    train_files = sorted((root / "train" / anchor).glob("layer*.parquet"), key=lambda p: int(p.stem[5:]))
    if not train_files:
        raise SystemExit(f"no train embeddings under {root / 'train' / anchor}: run the workflow first")
    tols = {"sklearn": args.sklearn_tol or cfg["probe"]["tol"], "torch": args.torch_tol or cfg["probe"]["tol"]}
    max_iter = args.max_iter or cfg["probe"]["max_iter"]
    print(f"model {model}; tol sklearn {tols['sklearn']:g}, torch {tols['torch']:g}; max_iter {max_iter}")
    print(f"{'layer':>5} {'position':<11}{'C sk':>7}{'C torch':>8}{'acc sk':>8}{'acc torch':>10}{'|diff|':>8}"
          f"{'s sk':>7}{'s torch':>8}")
    worst, rows, differ = 0.0, 0, 0
    for train in train_files:
        test = root / "test" / anchor / train.name
        for position in read_metadata(train)["positions"]:
            _, y, x = read_vectors(train, position)
            _, y_test, x_test = read_vectors(test, position)
            row = {}
            for solver in ("sklearn", "torch"):
                settings = ProbeSettings(**{**cfg["probe"], "solver": solver, "device": "cpu", "tol": tols[solver],
                                             "max_iter": max_iter})
                start = time.perf_counter()
                probe, report, _, _ = fit_probe_and_control(x, y, settings, cfg["seed"], args.threads)
                row[solver] = (report.C, float(np.mean(probe.predict(x_test) == y_test)),
                               time.perf_counter() - start)
            diff = abs(row["sklearn"][1] - row["torch"][1])
            rows += 1
            differ += row["sklearn"][0] != row["torch"][0]
            worst = max(worst, diff)
            print(f"{train.stem[5:]:>5} {position:<11}{row['sklearn'][0]:>7g}{row['torch'][0]:>8g}"
                  f"{row['sklearn'][1]:>8.3f}{row['torch'][1]:>10.3f}{diff:>8.3f}{row['sklearn'][2]:>7.1f}"
                  f"{row['torch'][2]:>8.1f}", flush=True)
    print(f"largest test-accuracy difference: {worst:.3f} (goal <= 0.01); Cs chosen differently: {differ} of {rows}")


if __name__ == "__main__":
    main()
