"""Where a finished `make run` (or any run) spent its time, from the files the run itself wrote.

Prints, per rule: jobs, summed job seconds (Snakemake's benchmark files, benchmarks/<rule>/...tsv)
and the median job; the extraction jobs' own pass time (the "in X s" their logs end with: image
reading, forward passes and writing, without start-up and model loading; bench_extract.py puts it
at ~1.1x the bare forward); and, given the run's wall time, the ratio wall / extraction passes
(goal <= 1.3).

Run in the run's working directory after it finished, e.g.

    start=$(date +%s); nice make run; echo $(( $(date +%s) - start )) > wall.txt
    .venv/bin/python benchmarks/run_breakdown.py --wall "$(cat wall.txt)"
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

# "wrote 500 rows x 31 layers (+ 9 vision layers) in 80.7 s" (the vision part since the vision-tower jobs)
EXTRACT_LOG = re.compile(r"wrote (\d+) rows x (\d+) layers(?: \(\+ \d+ vision layers\))? in ([0-9.]+) s")


def job_seconds(bench_root: Path) -> dict[str, list[float]]:
    """rule -> seconds of each of its jobs (the `s` column of every benchmark TSV under the rule's folder)."""
    found: dict[str, list[float]] = defaultdict(list)
    for path in sorted(bench_root.rglob("*.tsv")):
        rel = path.relative_to(bench_root)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                found[rule].append(float(row["s"]))
    return found


def forward_seconds(log_root: Path, pattern: str) -> tuple[float, int]:
    """Summed pass time of the extraction jobs whose logs match `pattern` and the rows they wrote."""
    seconds, rows = 0.0, 0
    for path in log_root.glob(pattern):
        match = EXTRACT_LOG.search(path.read_text(errors="replace"))
        if match:
            rows += int(match.group(1))
            seconds += float(match.group(3))
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--wall", type=float, help="wall seconds of the whole run (make run), if measured")
    args = parser.parse_args()
    jobs = job_seconds(args.workdir / "benchmarks")
    if not jobs:
        raise SystemExit(f"no benchmark files under {args.workdir / 'benchmarks'}; has a run finished there?")
    print(f"{'rule':<28}{'jobs':>6}{'sum s':>10}{'median s':>10}")
    for rule, times in sorted(jobs.items(), key=lambda item: -sum(item[1])):
        print(f"{rule:<28}{len(times):>6}{sum(times):>10.1f}{statistics.median(times):>10.1f}")
    total = sum(sum(t) for t in jobs.values())
    print(f"{'all jobs (summed, not wall)':<28}{sum(len(t) for t in jobs.values()):>6}{total:>10.1f}")
    forward, rows = forward_seconds(args.workdir / "logs", "extract_*/**/*.log")
    image, image_rows = forward_seconds(args.workdir / "logs", "image_pass_*/**/*.log")
    if forward:
        print(f"prompt passes: {forward:.1f} s for {rows} prompt passes ({forward / rows:.3f} s each)")
    if image:
        print(f"image passes: {image:.1f} s for {image_rows} images ({image / image_rows:.3f} s each)")
    if args.wall and forward:
        print(f"wall {args.wall:.0f} s = {args.wall / 60:.1f} min -> wall / prompt passes = {args.wall / forward:.2f}, "
              f"wall / all extraction passes = {args.wall / (forward + image):.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
