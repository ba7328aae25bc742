"""Capsula on a real SLURM cluster: Debian's slurmctld and two slurmd on this one host (no
systemd needed). .ci/run installs the packages where it can (root with apt-get); where the
cluster cannot be had, these tests skip and say why."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CAPSULA, git, load, write_config

CONF = """ClusterName=capsula
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
NodeName=n[1-2] NodeHostname=localhost Port=[{d1}-{d2}] CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_ports(n: int) -> list[int]:
    """n consecutive free ports on this host (slurmd's ports are a range)."""
    for start in range(20000, 60000, 97):
        socks = []
        try:
            for port in range(start, start + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return list(range(start, start + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    missing = [
        p
        for p in ("slurmctld", "slurmd", "sbatch", "squeue", "srun", "scancel", "munged", "munge")
        if not shutil.which(p)
    ]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing): .ci/run installs slurm-wlm and munge as root")
    if os.geteuid() != 0:
        pytest.skip("the one-host SLURM cluster runs its daemons as root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool/n1", "spool/n2"):
        (d / sub).mkdir(parents=True)
    ctld, d1, d2 = _free_ports(3)
    (d / "slurm.conf").write_text(CONF.format(d=d, ctld=ctld, d1=d1, d2=d2, cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    # munge answers only while a live munged runs (a zombie one left by an earlier run does not count)
    started_munge = subprocess.run(["munge", "-n"], capture_output=True).returncode != 0
    if started_munge:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force"], capture_output=True)
    subprocess.run(["slurmctld", "-c", "-f", env["SLURM_CONF"]], env=env, check=True)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-N", node, "-f", env["SLURM_CONF"]], env=env, check=True)
    try:  # from here on, the daemons are stopped however the fixture ends (a skip included)
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                log = (d / "slurmctld.log").read_text()[-2000:] if (d / "slurmctld.log").exists() else ""
                pytest.skip(f"the one-host cluster did not come up: {log}")
            time.sleep(0.2)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        for pidfile in d.glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        if started_munge:  # no daemon of ours outlives the tests
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)


def _wait_for_jobs(env: dict[str, str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "jobs still queued"
        time.sleep(0.3)


def _until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _scancelled_capsule(cluster: dict[str, str], project: Path, job: str) -> Path:
    """scancel the job, wait for it to end; its capsule, once Capsula wrote how it ended."""
    subprocess.run(["scancel", job], env=cluster, check=True)
    _wait_for_jobs(cluster)
    (capsule,) = (project / "vault").iterdir()
    _until((capsule / "post-run-info.json").exists, "post-run-info.json after scancel", timeout=30)
    return capsule


def _batch(env: dict[str, str], repo: Path, body: str, *sbatch: str) -> str:
    script = repo / f"job-{time.monotonic_ns()}.sh"
    script.write_text(f"#!/bin/bash\n{body}\n")
    out = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={repo}", "-o", "/dev/null", *sbatch, str(script)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


@pytest.fixture
def project(repo: Path) -> Path:
    write_config(
        repo,
        '[capture]\nenvironment-variables = ["SLURM_*"]\n[monitor.item.out.files]\n"results/out_${SLURM_ARRAY_TASK_ID}.txt" = {}\n',
    )
    (repo / ".gitignore").write_text("vault/\nresults/\njob-*.sh\n")
    (repo / "results").mkdir()
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "cluster")
    return repo


CAPSULA_CMD = f'exec "{sys.executable}" "{CAPSULA}" monitor -q'


def test_a_50_task_array_records_each_tasks_own_output(cluster: dict[str, str], project: Path) -> None:
    write = "import os; t = os.environ['SLURM_ARRAY_TASK_ID']; open(f'results/out_{t}.txt', 'w').write(t * 3)"
    _batch(cluster, project, f'{CAPSULA_CMD} -i out -- "{sys.executable}" -c "{write}"', "--array=0-49")
    _wait_for_jobs(cluster)
    capsules = list((project / "vault").iterdir())
    assert len(capsules) == 50
    tasks = set()
    for capsule in capsules:
        post, env = load(capsule / "post-run-info.json"), load(capsule / "context.json")["environment_variables"]
        task = env["SLURM_ARRAY_TASK_ID"]
        tasks.add(task)
        ((path, entry),) = post["files"].items()
        assert post["status"] == "completed" and path == f"results/out_{task}.txt"
        assert entry["file_hash"] == hashlib.sha256((task * 3).encode()).hexdigest()  # its own, nobody else's
    assert tasks == {str(t) for t in range(50)}


def test_srun_n4_makes_a_capsule_per_task(cluster: dict[str, str], project: Path) -> None:
    args = ["srun", "-n", "4", f"--chdir={project}", sys.executable, str(CAPSULA), "monitor", "-q", "--", "hostname"]
    subprocess.run(args, env=cluster, check=True, capture_output=True, timeout=120)
    capsules = list((project / "vault").iterdir())
    assert len(capsules) == 4
    assert {load(c / "context.json")["environment_variables"]["SLURM_PROCID"] for c in capsules} == {"0", "1", "2", "3"}


def test_scancel_leaves_an_interrupted_capsule(cluster: dict[str, str], project: Path) -> None:
    job = _batch(cluster, project, f"{CAPSULA_CMD} -- sleep 120")
    _until(lambda: bool(list((project / "vault").glob("*/pre-run-info.json"))), "the run to start")
    time.sleep(0.5)
    capsule = _scancelled_capsule(cluster, project, job)
    post = load(capsule / "post-run-info.json")
    # slurmstepd sends TERM to every process of the step one by one: Capsula may see the command
    # end of it before its own TERM arrives, and then records the signal that ended the command.
    assert post["status"] == "interrupted"
    assert post["signal"] == "SIGTERM" or "SIGTERM" in post.get("signals_received", [])


def test_signal_b_usr1_reaches_the_command_through_capsula(cluster: dict[str, str], project: Path) -> None:
    """sbatch --signal=B:USR1@55 with a one-minute limit: SLURM's "time is nearly up" goes to the
    batch shell, which is Capsula (exec); the command gets it and finishes in time."""
    code = (
        "import signal, time; got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1)); "
        "[time.sleep(0.1) for _ in range(900) if not got]; print('got USR1' if got else 'none')"
    )
    _batch(cluster, project, f'{CAPSULA_CMD} -- "{sys.executable}" -c "{code}"', "--time=1", "--signal=B:USR1@55")
    _wait_for_jobs(cluster, timeout=150)
    (capsule,) = (project / "vault").iterdir()
    post = load(capsule / "post-run-info.json")
    assert post["status"] == "completed" and post["stdout"] == "got USR1\n"
    assert "SIGUSR1" in post["signals_received"]  # with a SIGCONT, which SLURM sends beside it
    assert json.loads((capsule / "capsule.json").read_text())["status"] == "completed"


def test_scancel_reaches_the_command_once(cluster: dict[str, str], project: Path) -> None:
    """slurmstepd signals every process of the step: Capsula does not pass the TERM on again."""
    code = (
        "import signal, time; n = []; signal.signal(signal.SIGTERM, lambda *a: n.append(1)); "
        "print('ready', flush=True); [time.sleep(0.05) for _ in range(1200) if not n]; time.sleep(1); "
        "print(f'TERM x{len(n)}', flush=True)"
    )
    job = _batch(cluster, project, f'{CAPSULA_CMD} -- "{sys.executable}" -c "{code}"')
    _until(lambda: any(b"ready" in p.read_bytes() for p in project.glob("vault/*/stdout.txt")), "the command to start")
    capsule = _scancelled_capsule(cluster, project, job)
    assert (capsule / "stdout.txt").read_bytes() == b"ready\nTERM x1\n"
    assert load(capsule / "post-run-info.json")["status"] == "interrupted"


def test_the_capsule_of_a_batch_job_holds_its_slurm_block(cluster: dict[str, str], project: Path) -> None:
    job = _batch(cluster, project, f'exec "{sys.executable}" "{CAPSULA}" capture', "--time=10", "--job-name=train")
    _wait_for_jobs(cluster)
    (capsule,) = (project / "vault").iterdir()
    slurm = load(capsule / "context.json")["cluster"]["slurm"]
    (script,) = project.glob("job-*.sh")
    assert slurm["job_id"] == job and slurm["partition"] == "debug" and slurm["cluster"] == "capsula"
    assert slurm["job_name"] == "train" and slurm["node_list"] in ("n1", "n2") and slurm["time_limit"] == "00:10:00"
    assert slurm["batch_script_sha256"] == hashlib.sha256(script.read_bytes()).hexdigest()
