"""Snakemake job: train the embedded model's projector on the training split (LM and vision frozen)."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)

import json
from pathlib import Path

import altair as alt
import polars as pl
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stagelens.atomic import atomic_path
from stagelens.adapters.efficientnet_vision import pretrained_state_dict
from stagelens.builders.embedded import assemble
from stagelens.builders.projector_training import TrainSettings, train_projector, vision_features

smk = snakemake  # noqa: F821
torch.set_num_threads(smk.threads)
settings = TrainSettings(**smk.params.settings)
lm_dir = Path(smk.input.lm)

manifest = pl.read_parquet(smk.input.manifest).filter(pl.col("split") == "train").sort("sample_id")
if manifest.height == 0:
    raise ValueError(f"{smk.input.manifest}: no rows with split == 'train'")
classes = manifest.select("label", "class_name").unique().sort("label")
class_names = dict(zip(classes["label"].to_list(), classes["class_name"].to_list()))
names = [class_names.get(i, "") for i in range(max(class_names) + 1)]

lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
model = assemble(lm, AutoTokenizer.from_pretrained(lm_dir), pretrained_state_dict(), seed=settings.seed)
images = [Image.open(path).convert("RGB") for path in manifest["path"].to_list()]
features = vision_features(model, images)
history = train_projector(model, features, names, manifest["label"].to_numpy(), settings)
history["manifest"] = str(smk.input.manifest)
history["class_names"] = names
print(f"final loss {history['final_loss']:.4f} in {history['train_seconds']:.1f} s", file=sys.stderr)


state = {name: tensor.detach().contiguous() for name, tensor in model.projector.state_dict().items()}
with atomic_path(smk.output.projector) as tmp:
    save_file(state, str(tmp))
with atomic_path(smk.output.training) as tmp:
    tmp.write_text(json.dumps(history, indent=2) + "\n")

curve = pl.DataFrame({"step": list(range(1, len(history["losses"]) + 1)), "loss": history["losses"]})
chart = (
    alt.Chart(curve.to_pandas())
    .mark_line()
    .encode(x=alt.X("step:Q", title="training step"), y=alt.Y("loss:Q", title="answer-token cross-entropy"))
    .properties(title="Embedded model: projector training loss", width=420, height=240)
)
for key in ("figure_png", "figure_svg"):
    with atomic_path(smk.output[key]) as tmp:
        chart.save(str(tmp), format=tmp.suffix[1:])
