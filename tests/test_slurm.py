"""The workflow on a real (single-node, throwaway) Slurm through the project's Slurm profile.

The cluster is started by the `slurm` fixture (tests/slurm_cluster.py) and needs root plus
Debian's slurm-wlm and munge (.ci/run installs them). Without them the tests skip, except in CI
(CI=true), where they fail. The runs use profiles/slurm unchanged except for what a one-node
cluster without accounting needs: its core count, squeue for job status, no account, the debug
partition, and a short first status check. The node has one GPU without a device, so a job that
asks for a GPU is scheduled as on a GPU node and runs on the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import slurm_cluster
from test_workflow import CLASSES, images, job_counts, tiny_config, write_config  # noqa: F401 (images: fixture)

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run the Slurm tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node Slurm, stopped (only the daemons it started) after the module."""
    reason = slurm_cluster.unavailable_reason()
    if reason:
        _unavailable(reason)
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except RuntimeError as exc:
        _unavailable(f"could not start Slurm: {exc}")
    yield cluster
    slurm_cluster.stop(cluster)


def snakemake_cmd(workdir: Path, configfile: Path, profile: str, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "workflow" / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(configfile),
        "--replace-workflow-config",
        "--workflow-profile", str(REPO / "profiles" / profile),
        *args,
    ]  # fmt: skip


def slurm_args(cluster: slurm_cluster.SlurmCluster) -> list[str]:
    """Overrides of profiles/slurm for the test cluster (one small node, no accounting)."""
    return [
        "--cores", str(cluster.cpus),
        "--slurm-status-command", "squeue",
        "--slurm-no-account",
        "--default-resources", f"slurm_partition={cluster.partition}",
        "--slurm-init-seconds-before-status-checks", "1",
        "--seconds-between-status-checks", "2",  # the default 10 s per round dominates a tiny run
    ]  # fmt: skip


ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=900)


def submissions(output: str) -> list[str]:
    """The Slurm log folder of every submission: rule_<rule> or group_<group>_<rules>."""
    return re.findall(r"submitted with SLURM jobid \d+ \(log: \S*/slurm_logs/([^/\s]+)/", output)


def result_tables(results: Path) -> list[Path]:
    """Per-layer metrics and the aggregated tables, relative to the results folder."""
    files = sorted(results.glob("*/metrics/*/layer*.parquet"))
    files += sorted(results.glob("*/[mbs][ets]*.parquet"))  # metrics, behaviour, stages
    return [f.relative_to(results) for f in files]


def test_workflow_on_slurm_matches_a_local_run(slurm, images, tmp_path):
    cfg = tiny_config(images)
    # The submissions counted below are those of the LM probes (the vision probes join the same groups).
    cfg["models"]["tiny-llava"]["vision_num_layers"] = None
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    local_dir.mkdir()
    slurm_dir.mkdir()
    # The local run (default profile) goes on while the Slurm run waits on the queue.
    local_cmd = snakemake_cmd(local_dir, write_config(local_dir, cfg), "default", "--cores", str(slurm.cpus))
    local = subprocess.Popen(local_cmd, cwd=local_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    on_slurm = run(snakemake_cmd(slurm_dir, write_config(slurm_dir, cfg), "slurm", *slurm_args(slurm)), slurm_dir)
    local_out, _ = local.communicate(timeout=900)
    assert local.returncode == 0, local_out[-5000:]
    out = on_slurm.stdout + on_slurm.stderr
    assert on_slurm.returncode == 0, out[-8000:]

    # Every job but `all` went through sbatch; the profile's groups bundled the light ones.
    sent = submissions(out)
    assert sorted(s for s in sent if s.startswith("rule_")) == sorted([
        "rule_prepare_dataset",
        "rule_build_model",
        *["rule_extract_tiny_llava"] * 3,  # train/anchor, test/anchor, test/lex_picture
        *["rule_image_pass_tiny_llava"] * 2,  # train, test
    ]), out[-5000:]  # fmt: skip
    # 3 + 3 probe trainings, 6 + 3 evaluations and 3 report jobs; how many submissions carry
    # them depends on when jobs become ready, the rules each group ran do not.
    grouped = [s for s in sent if s.startswith("group_")]
    assert set(grouped) <= {
        "group_probes_train_probe", "group_probes_train_image_probe", "group_probes_train_image_probe_train_probe",
        "group_evaluate_evaluate", "group_evaluate_evaluate_image", "group_evaluate_evaluate_evaluate_image",
        "group_report_aggregate_depth_panel_figures",
    }, grouped  # fmt: skip
    assert len(grouped) < 18, grouped
    ran = {rule for folder in grouped for rule in ("train_image_probe", "evaluate_image", "train_probe", "evaluate")
           if folder.endswith(rule) or f"_{rule}_" in folder}
    assert ran == {"train_probe", "train_image_probe", "evaluate", "evaluate_image"}, grouped

    tables = result_tables(local_dir / "results")
    assert len(tables) == 3 * 3 + 3  # layers x (anchor, lex_picture, image readout) + 3 model tables
    assert result_tables(slurm_dir / "results") == tables
    for rel in tables:
        expected = pq.read_table(local_dir / "results" / rel)
        got = pq.read_table(slurm_dir / "results" / rel)
        assert got.equals(expected, check_metadata=True), rel


def slurm_job_ids(output: str, log_folder: str) -> list[str]:
    """Slurm job ids of the submissions logged under slurm_logs/<log_folder>/."""
    return re.findall(rf"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/{log_folder}/", output)


def tres_per_job(job_id: str) -> str:
    """What a job asked for beyond CPUs and memory (e.g. gres/gpu:1), from slurmctld."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    match = re.search(r"TresPerJob=(\S+)", shown)
    return match.group(1) if match else ""


def test_failed_slurm_job_names_its_log_and_a_rerun_does_only_the_rest(slurm, images, tmp_path):
    broken_images = tmp_path / "images"
    shutil.copytree(images, broken_images)
    broken = broken_images / CLASSES[0] / f"{CLASSES[0]}_0.png"
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"not a PNG")
    cfg = tiny_config(broken_images)
    # 5 + 3 = every image of a class, so the broken one is always read.
    cfg["dataset"].update(train_per_class=5, test_per_class=3, on_broken_image="error")
    # device auto: extraction asks Slurm for a GPU (the test node has one without a device;
    # without CUDA the job runs on the CPU).
    cfg["models"]["tiny-llava"]["device"] = "auto"
    workdir = tmp_path / "run"
    workdir.mkdir()
    configfile = write_config(workdir, cfg)
    targets = ("results/models/tiny-llava", "results/tiny-llava/answers/train/anchor.parquet")
    cmd = snakemake_cmd(workdir, configfile, "slurm", *slurm_args(slurm), *targets)

    failed = run(cmd, workdir)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out[-5000:]
    assert "Error in rule prepare_dataset" in out
    assert "logs/prepare_dataset.log" in out  # the rule's log, named in the error
    slurm_log = re.search(r"\S*/slurm_logs/rule_prepare_dataset/\d+\.log", out)
    assert slurm_log, out[-5000:]
    assert Path(slurm_log.group(0)).is_file()
    reason = f"unreadable image {CLASSES[0]}/{broken.name}"
    assert reason in (workdir / "logs" / "prepare_dataset.log").read_text()
    assert reason in out  # the profile's show-failed-logs prints it
    # keep-going: the independent model build finished on Slurm despite the failure.
    assert (workdir / "results" / "models" / "tiny-llava" / "config.json").is_file()
    assert not (workdir / "results" / "data" / "manifest.parquet").exists()

    broken.write_bytes(good_bytes)
    rerun = run(cmd, workdir)
    assert job_counts(rerun) == {"prepare_dataset": 1, "extract_tiny_llava": 1}
    out = rerun.stdout + rerun.stderr
    assert sorted(submissions(out)) == ["rule_extract_tiny_llava", "rule_prepare_dataset"]
    assert (workdir / "results" / "tiny-llava" / "answers" / "train" / "anchor.parquet").is_file()
    [extract_job] = slurm_job_ids(out, "rule_extract_tiny_llava")
    [prepare_job] = slurm_job_ids(out, "rule_prepare_dataset")
    assert re.fullmatch(r"gres/gpu:1|gres:gpu:1", tres_per_job(extract_job))
    assert "gpu" not in tres_per_job(prepare_job)
