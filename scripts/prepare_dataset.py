"""Snakemake script of rule prepare_dataset: the image dataset (any dataset.format) -> results/data/manifest.parquet."""

from stagelens.job import start

start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

from tqdm import tqdm  # noqa: E402

from stagelens.dataset import build_manifest, manifest_metadata, write_manifest  # noqa: E402

dataset = snakemake.params.dataset  # noqa: F821
table = build_manifest(
    root=dataset["root"],
    seed=snakemake.params.seed,  # noqa: F821
    train_per_class=dataset["train_per_class"],
    test_per_class=dataset["test_per_class"],
    class_list=dataset["class_list"],
    on_broken_image=dataset["on_broken_image"],
    format=dataset["format"],
    image_column=dataset["image_column"],
    label_column=dataset["label_column"],
    class_names=dataset["class_names"],
    labels=dataset["labels"],
    progress=lambda images: tqdm(images, desc="checking images", unit="image", file=sys.stderr),
)
write_manifest(table, snakemake.output.manifest)  # noqa: F821

meta = manifest_metadata(snakemake.output.manifest)  # noqa: F821
print(f"{len(meta['classes'])} classes, {table.num_rows} images; skipped {meta['n_skipped_broken']} broken image(s)", file=sys.stderr)
for item in meta["skipped_broken"]:
    print(f"skipped broken image {item['path']}: {item['error']}", file=sys.stderr)
