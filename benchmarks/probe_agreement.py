"""Both probe solvers on a finished run's features, layer by layer: chosen C and test accuracy.

For every layer of one model of a run (`make run` or any config), both solvers fit the anchor
prompt's train features with the config's probe settings; the table lists, per layer and
position, the C each chose, the test accuracy of each (anchor prompt, test split), the
difference (goal: at most 0.01) and the time of each. Prints, never asserts.

Run: nice .venv/bin/python benchmarks/probe_agreement.py [--config config/config.yaml] [--model NAME]
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
    args = parser.parse_args()
    cfg = load_config(args.config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    model = args.model or next(n for n, m in cfg["models"].items() if m.get("enabled", True))
    anchor = cfg["prompts"]["anchor"]["id"]
    root = Path(cfg["results"]) / model / "embeddings"
    train_files = sorted((root / "train" / anchor).glob("layer*.parquet"), key=lambda p: int(p.stem[5:]))
    if not train_files:
        raise SystemExit(f"no train embeddings under {root / 'train' / anchor}: run the workflow first")
    print(f"{'layer':>5} {'position':<11}{'C sk':>7}{'C torch':>8}{'acc sk':>8}{'acc torch':>10}{'|diff|':>8}"
          f"{'s sk':>7}{'s torch':>8}")
    worst = 0.0
    for train in train_files:
        test = root / "test" / anchor / train.name
        for position in read_metadata(train)["positions"]:
            _, y, x = read_vectors(train, position)
            _, y_test, x_test = read_vectors(test, position)
            row = {}
            for solver in ("sklearn", "torch"):
                settings = ProbeSettings(**{**cfg["probe"], "solver": solver, "device": "cpu"})
                start = time.perf_counter()
                probe, report, _, _ = fit_probe_and_control(x, y, settings, cfg["seed"], args.threads)
                row[solver] = (report.C, float(np.mean(probe.predict(x_test) == y_test)),
                               time.perf_counter() - start)
            diff = abs(row["sklearn"][1] - row["torch"][1])
            worst = max(worst, diff)
            print(f"{train.stem[5:]:>5} {position:<11}{row['sklearn'][0]:>7g}{row['torch'][0]:>8g}"
                  f"{row['sklearn'][1]:>8.3f}{row['torch'][1]:>10.3f}{diff:>8.3f}{row['sklearn'][2]:>7.1f}"
                  f"{row['torch'][2]:>8.1f}", flush=True)
    print(f"largest test-accuracy difference: {worst:.3f} (goal <= 0.01)")


if __name__ == "__main__":
    main()
