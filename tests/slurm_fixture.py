"""A real single-node Slurm cluster for tests: private munged, slurmctld and slurmd.

    with slurm_cluster() as cluster:        # ~1.5 s up, ~1.5 s down
        subprocess.run(["sbatch", "--wait", script], env=cluster.env, check=True)

Everything lives in a fresh temporary folder (config, state, spool, logs, munge socket) and the
daemons listen on ports picked free at start-up, so nothing touches a system Slurm and two runs
do not collide. The recipe and its pitfalls are in shared/research/slurm.md: no cgroups
(proctrack/linuxproc, task/none), root daemons, ``CPUs`` above the real core count allowed by
``config_overrides``, ``MinJobAge=4`` so that ``sbatch --wait`` polls every 2 s. Tear-down is
SIGTERM by saved process, then SIGKILL after 5 s, on every path including a failed start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
INSTALL_HINT = (
    "needs Slurm and munge (.ci/run installs them: apt-get install --no-install-recommends "
    "slurmctld slurmd slurm-client munge)"
)


@dataclass
class SlurmCluster:
    root: Path
    """The cluster's folder: slurm.conf, state, spool, log/."""
    env: dict[str, str]
    """os.environ plus SLURM_CONF, without any SLURM_* job variables: give it to every client call."""


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def unavailable_reason() -> str | None:
    """Why a cluster cannot start here (for pytest.skip), or None."""
    missing = [name for name in (*DAEMONS, "sbatch", "sinfo", "scontrol", "srun") if _find(name) is None]
    if missing:
        return f"{', '.join(missing)} not found; the Slurm test {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the Slurm test runs slurmd as root (SlurmUser=root) and this process is not root"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _slurm_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=seqmoe-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=4
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            # slurmd can ignore SIGTERM for a long time while munge is unreachable
            process.kill()
            process.wait()


def _logs(root: Path) -> str:
    parts = []
    for log in sorted((root / "log").glob("*")):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(parts)


def _wait_until(predicate, timeout_s: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Slurm test cluster: {what} not ready after {timeout_s:.0f} s\n{_logs(root)}")
        time.sleep(0.1)


def _node_idle(env: dict[str, str]) -> bool:
    # a wall-clock bound per call: every client retries ~2 s when munge or slurmctld is not up yet
    try:
        out = subprocess.run(
            [_find("sinfo"), "-h", "-n", "localhost", "-o", "%t"], env=env, capture_output=True, text=True, timeout=5
        ).stdout
    except subprocess.TimeoutExpired:
        return False
    return out.strip() == "idle"


@contextlib.contextmanager
def slurm_cluster(cpus: int = 4) -> Iterator[SlurmCluster]:
    """Bring up a one-node cluster (node ``localhost``, partition ``debug``) with ``cpus`` CPUs."""
    # mktemp's 0700 would make munged refuse the socket path: it wants execute permission for all
    root = Path(tempfile.mkdtemp(prefix="seqmoe-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    ctld_port, slurmd_port = _free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, cpus, ctld_port, slurmd_port))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)

    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(root / "log" / f"{name}.out", "wb") as out:
            processes.append(
                subprocess.Popen(
                    [_find(name), *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    try:
        sock = root / "munge" / "sock"
        start(
            "munged",
            "-F",
            f"--key-file={key}",
            f"--socket={sock}",
            f"--pid-file={root}/munge/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/seed",
        )
        _wait_until(sock.is_socket, 10, "munged socket", root)
        start("slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "-D", "-N", "localhost", "-f", str(conf))
        _wait_until(lambda: _node_idle(env), 30, "node `localhost` idle in sinfo", root)
        yield SlurmCluster(root=root, env=env)
    finally:
        # slurmd first: it must still reach munge and slurmctld to shut down quickly
        _stop(processes[::-1])
        shutil.rmtree(root, ignore_errors=True)
