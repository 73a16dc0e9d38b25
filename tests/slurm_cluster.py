"""Start and stop a throwaway single-node Slurm (munged + slurmctld + slurmd) for tests.

Everything the daemons write (munge key and socket, state, spool, logs, pid files) lives under one
directory the caller owns. The paths outside it are /etc/slurm/slurm.conf and gres.conf: job
steps launched inside a Slurm job drop SLURM_CONF from their environment, so the configuration
must sit at the compiled-in default. They are only written when absent (or left by an earlier run
of this module, recognised by their marker line) and are removed again at stop. The node has one
GPU without a device (a counted GRES), so jobs that ask for a GPU are scheduled and run on the CPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = SYSTEM_CONF.with_name("gres.conf")
MARKER = "# written by stagelens tests/slurm_cluster.py; removed when the test cluster stops"
PARTITION = "debug"
REQUIRED_PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel")


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: where its files are and which daemons it started."""

    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int
    pid_files: tuple[Path, ...]  # in stop order: slurmd, slurmctld, munged

    @property
    def log_dir(self) -> Path:
        return self.root / "log"


def unavailable_reason() -> str | None:
    """Why a test cluster cannot be started here, or None when it can."""
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        return (
            f"Slurm/munge programs missing: {', '.join(missing)} "
            "(install with: apt-get install -y slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    if GRES_CONF.exists() and MARKER not in GRES_CONF.read_text(errors="replace"):
        return f"{GRES_CONF} already exists (a real Slurm is configured); not overwriting it"
    if SYSTEM_CONF.exists():
        text = SYSTEM_CONF.read_text(errors="replace")
        if MARKER not in text:
            return f"{SYSTEM_CONF} already exists (a real Slurm is configured); not overwriting it"
        pid_file = _conf_value(text, "SlurmctldPidFile")
        if pid_file and _pid_from_file(Path(pid_file)) is not None:
            return f"another test cluster is running (see {SYSTEM_CONF})"
    return None


def _conf_value(text: str, key: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    """90% of the machine's memory: slurmd drains a node that reports less than configured."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    raise RuntimeError("MemTotal not found in /proc/meminfo")


def slurm_conf(root: Path, node: str, cpus: int, memory_mb: int, ports: tuple[int, int]) -> str:
    """The slurm.conf text of a one-node cluster without accounting, files under root."""
    ctld_port, slurmd_port = ports
    return f"""{MARKER}
ClusterName=stagelens-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Reject at submission what the node can never run, instead of leaving it pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# One GPU without a device file (gres.conf): jobs asking for --gpus=1 are scheduled as on a GPU
# node, so the GPU requests of the rules are exercised; the work itself runs on the CPU.
GresTypes=gpu
SlurmdParameters=config_overrides
MinJobAge=300
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def _node_state() -> str:
    result = subprocess.run(
        ["sinfo", "--noheader", "--Node", "--format=%t"], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def _wait_for_pid_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not write its pid file {path}")
        time.sleep(0.1)


def start(root: Path, timeout: float = 60.0) -> SlurmCluster:
    """Start munged, slurmctld and slurmd with files under root; return once the node is idle.

    Raises RuntimeError (with the daemons' log paths) when the node does not come up; daemons
    started so far are stopped first.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    root = root.resolve()
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = _memory_mb()
    conf_text = slurm_conf(root, node, cpus, memory_mb, (_free_port(), _free_port()))
    (root / "slurm.conf").write_text(conf_text)  # a copy next to the logs, for debugging
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SYSTEM_CONF.write_text(conf_text)
    GRES_CONF.write_text(f"{MARKER}\nNodeName={node} Name=gpu File=/dev/null\n")

    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    pid_files = (root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid")
    cluster = SlurmCluster(root, SYSTEM_CONF, node, PARTITION, cpus, memory_mb, pid_files)
    try:
        _run([
            "munged", "--force",
            f"--socket={root}/munge/munge.socket",
            f"--key-file={key}",
            f"--pid-file={pid_files[2]}",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed",
        ])
        _wait_for_pid_file(pid_files[2], timeout)
        _run(["slurmctld", "-f", str(SYSTEM_CONF)])
        _wait_for_pid_file(pid_files[1], timeout)
        _run(["slurmd", "-f", str(SYSTEM_CONF), "-N", node])
        _wait_for_pid_file(pid_files[0], timeout)
        deadline = time.monotonic() + timeout
        while (state := _node_state()) != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Slurm node {node} is {state or 'not reported'!r}, not idle, after "
                    f"{timeout:.0f} s; see the logs in {root / 'log'}"
                )
            time.sleep(0.5)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


DAEMONS = ("slurmctld", "slurmd", "munged")


def _pid_from_file(path: Path) -> int | None:
    """The live Slurm or munge daemon a pid file names, or None (a stale file left by a killed
    run may name a pid the system has since given to another process: never signal that one)."""
    try:
        pid = int(path.read_text().strip())
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if name in DAEMONS and _pid_alive(pid) else None


def _stop_pid_file(path: Path, timeout: float = 10.0) -> None:
    """Stop the process named in a pid file: SIGTERM, then SIGKILL if it lingers."""
    pid = _pid_from_file(path)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def stop(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs, stop the daemons it started and remove its slurm.conf."""
    if cluster.pid_files[1].exists():
        subprocess.run(["scancel", f"--partition={cluster.partition}"], capture_output=True)
    for pid_file in cluster.pid_files:
        _stop_pid_file(pid_file)
    for conf in (cluster.conf, GRES_CONF):
        if conf.exists() and MARKER in conf.read_text(errors="replace"):
            conf.unlink()
