rule prepare_dataset:
    """Deterministic per-class train/test split of the image dataset (any dataset.format) -> manifest.parquet."""
    input:
        unpack(dataset_inputs),
    output:
        manifest=manifest_path(),
    params:
        dataset=config["dataset"],
        seed=config["seed"],
    log:
        log_path("prepare_dataset"),
    benchmark:
        benchmark_path("prepare_dataset")
    threads: 1
    resources:
        mem_mb=1024,
        runtime=estimate.prepare_dataset_runtime(n_classes()),
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/prepare_dataset.py"
