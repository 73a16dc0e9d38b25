"""Fault injection on the real workflow: SIGKILL of Snakemake's whole process group mid-run.

One tiny config is run twice: cleanly, and as a run killed three times (while an extraction job
is writing its files, while a probe is being trained, while the figures of the report stage are
being written), each time followed by `snakemake --unlock` and the same command again, as the
README's "After a failure" tells a user. At every kill point each visible file under results/
must read whole (Parquet, safetensors, JSON, PNG, SVG); after the last rerun the outputs must
equal the clean run's. Both runs use the default workflow profile (rerun-incomplete) on 2 cores.

Everything under results/ is compared byte for byte: the kills and reruns change no output, and
two runs of the same config on one machine write identical files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "stripes")
TIMEOUT = 900  # seconds for one run on a busy 2-core machine
# The README's commands: the default profile (rerun-incomplete) on the test's 2 cores.
PROFILE = ("--workflow-profile", str(REPO / "profiles" / "default"), "--cores", "2")

pytestmark = pytest.mark.slow


def synthetic_images(root: Path) -> Path:
    """3 classes x 6 images of 32x32, each class a visible shape on noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    masks = {"circle": (yy - 16) ** 2 + (xx - 16) ** 2 < 100, "square": (abs(yy - 16) < 9) & (abs(xx - 16) < 9),
             "stripes": (xx // 4) % 2 == 0}
    for kind, mask in masks.items():
        (root / kind).mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            img[mask] = rng.integers(180, 256, 3, dtype=np.uint8)
            Image.fromarray(img).save(root / kind / f"{kind}_{i}.png")
    return root


def fault_config(images: Path) -> dict:
    """Tiny but complete: one tiny LLaVA (2 blocks), anchor + one variant, the last token.
    batch_size 1 keeps each extraction job writing for a while, so a kill lands mid-write."""
    anchor = "Does this image show an animal? The answer must be always yes or no."
    return {
        "seed": 0,
        "results": "results",
        "dataset": {"root": str(images), "train_per_class": 4, "test_per_class": 2},
        # `last` only: no image pass, whose jobs write through the same store and rules as the
        # prompt extraction killed here; a third fewer jobs keeps the module's cost down.
        "models": {"tiny-llava": {"recipe": "tiny-llava", "num_layers": 2, "device": "cpu", "batch_size": 1,
                                  "positions": ["last"]}},
        "prompts": {
            "anchor": {"id": "anchor", "text": anchor, "expected": "yes"},
            "variants": [{"id": "lex_picture", "family": "lexical", "text": anchor.replace("image", "picture"),
                          "expected": "yes"}],
        },
        "probe": {"cv_folds": 2, "Cs": [0.1, 1.0], "max_iter": 200},
        "evaluate": {"n_bootstrap": 50},
    }


def command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), *PROFILE, *args]


ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *args), cwd=workdir, capture_output=True, text=True, env=ENV, timeout=TIMEOUT)


def start(workdir: Path, *args: str) -> subprocess.Popen:
    """Snakemake in a process group of its own (as a shell starts a command), output to a file."""
    out = open(workdir / f"snakemake-{time.monotonic_ns()}.out", "w")
    return subprocess.Popen(command(workdir, *args), cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)


def wait_until(proc: subprocess.Popen, condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.01)


def kill_group(proc: subprocess.Popen) -> list[str]:
    """SIGKILL every process of the run's group at once (kill -9 -PGID); wait until none is left.
    Returns the command lines of the jobs that were running."""
    members = [p for p in psutil.process_iter(["pid", "cmdline"]) if _pgid(p.pid) == proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _living_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _living_members(proc.pid), "processes survived the kill"
    return [" ".join(p.info["cmdline"] or []) for p in members if p.pid != proc.pid]


def _living_members(pgid: int) -> list[psutil.Process]:
    """The group's processes that still run. A killed job whose parent died too is reparented to PID 1;
    in a container whose PID 1 never reaps, it stays a zombie: dead, holding no files, so it does not count."""
    living = []
    for p in psutil.process_iter():
        try:
            if _pgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                living.append(p)
        except psutil.NoSuchProcess:
            pass
    return living


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def running_job(proc: subprocess.Popen, script: str) -> bool:
    """True while a job of the run executes scripts/<script> (Snakemake copies it to a temp name)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if any(arg.endswith(script) for arg in child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


# --- reading what a kill left ------------------------------------------------------------------


def visible_files(workdir: Path) -> list[Path]:
    """Files under results/ a user sees: none of whose path parts is hidden."""
    root = workdir / "results"
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def hidden_leftovers(workdir: Path) -> list[Path]:
    root = workdir / "results"
    return sorted(p for p in root.rglob(".*") if ".tmp" in p.name)


def read_whole(path: Path) -> None:
    """Raise if `path` is not a complete file of its kind."""
    name = path.name
    if name.endswith(".parquet"):
        pq.read_table(path)
    elif name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        load_file(str(path))
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".png"):
        with Image.open(path) as image:
            image.load()
    elif name.endswith(".svg"):
        ET.parse(path)
    elif name.endswith(".html"):
        assert path.read_text().rstrip().endswith("</html>"), f"{path} is cut short"


def unreadable(workdir: Path) -> dict[str, str]:
    found = {}
    for path in visible_files(workdir):
        try:
            read_whole(path)
        except Exception as err:  # any failure to read is the finding
            found[str(path.relative_to(workdir))] = f"{type(err).__name__}: {err}"
    return found


@dataclass
class KillPoint:
    """What one SIGKILL interrupted and what it left."""

    name: str
    jobs: list[str]
    visible: list[str]
    unreadable: dict[str, str]
    hidden: list[str]
    seconds: float


def kill_when(workdir: Path, name: str, condition, what: str) -> KillPoint:
    """Start the run, SIGKILL its group once `condition(proc)` holds, record what is left."""
    began = time.monotonic()
    proc = start(workdir)
    wait_until(proc, lambda: condition(proc), what)
    jobs = kill_group(proc)
    return KillPoint(name, jobs, [str(p.relative_to(workdir)) for p in visible_files(workdir)], unreadable(workdir),
                     [str(p.relative_to(workdir)) for p in hidden_leftovers(workdir)], time.monotonic() - began)


# --- the runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return synthetic_images(tmp_path_factory.mktemp("images"))


def new_workdir(tmp_path_factory, name: str, images: Path) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    (workdir / "config.yaml").write_text(yaml.safe_dump(fault_config(images), sort_keys=False))
    return workdir


@pytest.fixture(scope="module")
def clean_run(images, tmp_path_factory) -> Path:
    workdir = new_workdir(tmp_path_factory, "clean", images)
    done = snakemake(workdir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return workdir


@dataclass
class KilledRun:
    workdir: Path
    points: dict[str, KillPoint]
    locked: subprocess.CompletedProcess  # the same command straight after a kill, before --unlock
    reruns: list[subprocess.CompletedProcess]  # --unlock, then the run that completed


@pytest.fixture(scope="module")
def killed_run(images, tmp_path_factory) -> KilledRun:
    workdir = new_workdir(tmp_path_factory, "killed", images)
    embeddings = workdir / "results" / "tiny-llava" / "embeddings"
    figures = workdir / "results" / "figures" / "tiny-llava"
    points = {}

    def writing_embeddings(proc) -> bool:
        return embeddings.is_dir() and any(".tmp" in p.name for p in embeddings.rglob(".*"))

    points["extraction"] = kill_when(workdir, "extraction", writing_embeddings, "extraction writing its files")
    locked = snakemake(workdir)
    unlock = snakemake(workdir, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-3000:]

    points["probe"] = kill_when(workdir, "probe", lambda proc: running_job(proc, "train_probe.py"), "probe training job")
    assert snakemake(workdir, "--unlock").returncode == 0

    def writing_figures(proc) -> bool:
        drawn = [p for p in figures.iterdir() if not p.name.startswith(".")] if figures.is_dir() else []
        return 0 < len(drawn) < 9 and running_job(proc, "figures.py")

    points["report"] = kill_when(workdir, "report", writing_figures, "figures job part-way through its files")
    assert snakemake(workdir, "--unlock").returncode == 0
    finished = snakemake(workdir)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    return KilledRun(workdir, points, locked, [unlock, finished])


# --- the tests -----------------------------------------------------------------------------------


def assert_clean_kill(point: KillPoint) -> None:
    assert point.unreadable == {}, f"unreadable after a kill during {point.name}: {point.unreadable}"


def test_kill_during_extraction(killed_run):
    point = killed_run.points["extraction"]
    assert any("extract" in job for job in point.jobs), point.jobs
    assert point.hidden, "the kill should have caught the job with its temporary files open"
    assert_clean_kill(point)
    # No visible embedding file is a partial one: the job's files appear together or not at all.
    written = [p for p in point.visible if "/embeddings/" in p]
    assert all(p.endswith(".parquet") for p in written)
    # A killed run leaves Snakemake's lock; the same command then says what to do.
    locked = killed_run.locked.stdout + killed_run.locked.stderr
    assert killed_run.locked.returncode != 0 and "--unlock" in locked


def test_kill_during_probe_training(killed_run):
    point = killed_run.points["probe"]
    assert any("train_probe" in job for job in point.jobs), point.jobs
    assert_clean_kill(point)


def test_kill_during_the_report_stage(killed_run):
    point = killed_run.points["report"]
    assert any("figures" in job for job in point.jobs), point.jobs
    assert_clean_kill(point)
    drawn = [p for p in point.visible if "/figures/tiny-llava/" in p]
    assert 0 < len(drawn) < 9, f"the kill should land part-way through the figures: {drawn}"


def test_rerun_after_unlock_completes_and_cleans_up(killed_run, clean_run):
    finished = killed_run.reruns[-1]
    assert "Nothing to be done" not in finished.stdout + finished.stderr
    assert [p.relative_to(killed_run.workdir) for p in visible_files(killed_run.workdir)] == [
        p.relative_to(clean_run) for p in visible_files(clean_run)
    ]
    assert hidden_leftovers(killed_run.workdir) == [], "a rerun replaces what killed jobs left behind"
    assert unreadable(killed_run.workdir) == {}


def differences(killed: KilledRun, clean: Path) -> dict[str, str]:
    """Files of the clean run whose counterpart in the killed run differs in any byte."""
    return {
        str(path.relative_to(clean)): "bytes differ"
        for path in visible_files(clean)
        if path.read_bytes() != (killed.workdir / path.relative_to(clean)).read_bytes()
    }


def test_outputs_after_kills_equal_a_clean_run(killed_run, clean_run):
    """Byte for byte: manifest, checkpoint, embeddings, answers, probes (.safetensors and their
    JSON sidecars), per-layer metrics, the aggregate tables, figures (PNG, SVG, Vega-Lite JSON)."""
    assert differences(killed_run, clean_run) == {}


def test_the_readability_check_catches_cut_files(tmp_path):
    """The check behind "no visible file is unreadable" fails on a file cut in half, of every kind."""
    import pyarrow as pa
    from safetensors.numpy import save_file

    pq.write_table(pa.table({"x": list(range(100))}), tmp_path / "t.parquet")
    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "p.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps({"a": list(range(20))}))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "f.png")
    (tmp_path / "f.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><rect width="1" height="1"/></svg>')
    (tmp_path / "r.html").write_text("<html><body>report</body></html>\n")
    for path in sorted(tmp_path.iterdir()):
        read_whole(path)
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(Exception):
            read_whole(path)
