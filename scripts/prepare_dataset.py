"""Snakemake script of rule prepare_dataset: the image dataset (any dataset.format) -> results/data/manifest.parquet."""

from stagelens.job import start

smk = start(snakemake)  # noqa: F821 (injected by Snakemake)

import sys  # noqa: E402

from tqdm import tqdm  # noqa: E402

from stagelens.dataset import manifest_from_config, manifest_metadata, manifest_report, write_manifest  # noqa: E402

table = manifest_from_config(smk.params.dataset, smk.params.seed,
                             progress=lambda images: tqdm(images, desc="checking images", unit="image", file=sys.stderr))
write_manifest(table, smk.output.manifest)
print("\n".join(manifest_report(table, manifest_metadata(smk.output.manifest))), file=sys.stderr)
