"""A one-screen text summary of a finished run, printed at the end of `make run`:
per model, the best anchor-probe layer per token position (and per vision-encoder position where
the vision tower was probed), the detected stages, the model's own
answer shares per prompt, the layer from which the answer readout favours each prompt's expected
answer, and where the report and figures are.

    python -m stagelens.summary results [results/report.html]
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from stagelens.positions import IMAGE_PASS, VISION_PASS
from stagelens.results import Results, ResultsError, load_results


def best_layers(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per model x position, the layer where the anchor probe (for the image positions: the image
    pass's probe; for a vision_metrics table: the vision layer's) is most accurate (the shallowest on ties)."""
    anchor = metrics.filter(pl.col("family").is_in(["anchor", IMAGE_PASS, VISION_PASS]))
    return (
        anchor.sort("model", "position", pl.col("accuracy"), pl.col("layer"), descending=[False, False, True, False])
        .group_by("model", "position", maintain_order=True)
        .first()
        .select("model", "position", "layer", "num_layers", "accuracy", "accuracy_ci_low", "accuracy_ci_high")
    )


def _stage_text(stages: pl.DataFrame) -> str:
    found = stages.filter(pl.col("detected")).sort("order")
    if found.is_empty():
        return "none detected"
    return ", ".join(f"{r['stage'].replace('_', ' ')} {r['start_layer']}-{r['end_layer']}" for r in found.iter_rows(named=True))


def answer_leads_from(readout: pl.DataFrame) -> int | None:
    """First layer of one prompt's answer readout from which the expected answer leads its opposite
    on average (mean margin > 0) at every later layer; None where it does not lead at the last layer."""
    margins = readout.sort("layer").select("layer", "mean_margin").rows()
    onset = None
    for layer, margin in margins:
        if margin is not None and margin > 0:
            onset = layer if onset is None else onset
        else:
            onset = None
    return onset


def _readout_text(readout: pl.DataFrame, num_layers: int) -> str:
    parts = []
    for (prompt,), part in readout.group_by("prompt", maintain_order=True):
        onset = answer_leads_from(part)
        parts.append(f"{prompt} {'-' if onset is None else onset}/{num_layers}")
    return ", ".join(parts)


def summary_text(res: Results, report: str | None = None) -> str:
    """The summary of every model of the runs (one block per model)."""
    metrics, stages, behaviour = res.metrics, res.stages, res.behaviour
    try:
        answer_readout = res.table("answer_readout")
    except ResultsError:  # runs made before the answer readout existed
        answer_readout = None
    best = best_layers(metrics)
    try:
        vision = best_layers(res.table("vision_metrics"))
    except ResultsError:  # no model of the runs probed its vision tower
        vision = None
    lines: list[str] = []
    for model in best["model"].unique(maintain_order=True).to_list():
        lines.append(f"== {model}")
        for row in best.filter(pl.col("model") == model).iter_rows(named=True):
            lines.append(
                f"   best anchor probe, {row['position']:<10}: layer {row['layer']:>2}/{row['num_layers']}"
                f"  accuracy {row['accuracy']:.3f} [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]"
            )
        for row in (vision.filter(pl.col("model") == model).iter_rows(named=True) if vision is not None else ()):
            lines.append(
                f"   best vision probe, {row['position']:<10}: layer {row['layer']:>2}/{row['num_layers']}"
                f"  accuracy {row['accuracy']:.3f} [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]"
            )
        for position in stages.filter(pl.col("model") == model)["position"].unique(maintain_order=True).to_list():
            part = stages.filter((pl.col("model") == model) & (pl.col("position") == position))
            lines.append(f"   stages ({position}): {_stage_text(part)}")
        lines.append("   the model's answers:        yes    no     1     0   agrees")
        for row in behaviour.filter(pl.col("model") == model).iter_rows(named=True):
            shares = "  ".join(f"{row[f'share_{w}']:>4.0%}" for w in ("yes", "no", "1", "0"))
            lines.append(f"     {row['prompt']:<14} ({row['expected']:>3})  {shares}   {row['agreement']:>4.0%}")
        readout = answer_readout.filter(pl.col("model") == model) if answer_readout is not None else None
        if readout is not None and not readout.is_empty():
            num_layers = int(metrics.filter(pl.col("model") == model)["num_layers"].max())
            lines.append(f"   expected answer leads the readout from layer: {_readout_text(readout, num_layers)}")
    roots = sorted({str(p) for p in res.runs.values()})
    lines.append(f"Tables: {', '.join(f'{r}/<model>/{{metrics,stages,behaviour,answer_readout,vision_metrics}}.parquet' for r in roots)}")
    lines.append(f"Figures: {', '.join(f'{r}/figures/' for r in roots)}")
    if report:
        lines.append(f"Report: {report}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = argv[1] if len(argv) == 2 and Path(argv[1]).exists() else None
    print(summary_text(load_results(argv[0]), report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
