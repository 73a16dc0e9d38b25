"""Snakemake job projector_figure: the loss curve of the projector an embedded model uses (shipped or trained here)."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from stagelens.figures import loss_chart, save_chart  # noqa: E402

record = json.loads(Path(smk.input.training).read_text())
title = f"{smk.wildcards.model}: projector training loss ({smk.params.source} projector)"
save_chart(loss_chart(record["losses"], title), Path(smk.output.svg).with_suffix(""))  # every format
