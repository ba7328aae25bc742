"""The environment a run happens in, recorded without configuration: GPUs (through fake
nvidia-smi and rocm-smi that print real machines' output), conda environments (a conda-meta
tree in the layout conda writes), containers, batch jobs and lock files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import load, only_capsule, run_capsula, write_config

import capsula

GPU = Path(__file__).resolve().parent / "fixtures" / "gpu"
L4_UUID = "GPU-c5533cd4-5a60-059e-348d-b6d7466932e4"


def fake_tool(bin_dir: Path, name: str, script: str) -> Path:
    """An executable on PATH standing in for a tool this machine may lack."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def fake_gpus(bin_dir: Path, calls: Path, *, driver: str = "555.42.06") -> dict[str, str]:
    bin_dir.mkdir(parents=True, exist_ok=True)
    xml = (GPU / "nvidia-smi-q-x.xml").read_text().replace("555.42.06", driver)
    (bin_dir.parent / f"nvidia-{driver}.xml").write_text(xml)
    fake_tool(
        bin_dir,
        "nvidia-smi",
        f'echo "nvidia-smi $*" >> "{calls}"\ncase "$1" in\n'
        f'  -q) cat "{bin_dir.parent / f"nvidia-{driver}.xml"}" ;;\n'
        f'  --query-gpu=*) cat "{GPU / "nvidia-smi-compute-cap.csv"}" ;;\n  *) exit 2 ;;\nesac',
    )
    fake_tool(bin_dir, "rocm-smi", f'echo "rocm-smi $*" >> "{calls}"\ncat "{GPU / "rocm-smi.json"}"')
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0"}


def capture(repo: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = run_capsula("capture", cwd=repo, env=env)
    assert result.returncode == 0, result.stderr.decode()
    path = Path(result.stdout.decode().strip())
    return dict(load(path / "context.json"))


def test_gpus_are_read_from_nvidia_smi_and_rocm_smi_once_per_boot(repo: Path, tmp_path: Path) -> None:
    calls = tmp_path / "calls.txt"
    env = fake_gpus(tmp_path / "bin", calls)
    gpus = capture(repo, env)["gpus"]
    assert gpus["nvidia"] == {
        "driver_version": "555.42.06",
        "cuda_version": "12.5",
        "devices": [
            {
                "index": 0,
                "name": "NVIDIA L4",
                "uuid": L4_UUID,
                "memory_total_mib": 23034,
                "compute_capability": "8.9",
                "pci_bus_id": "00000000:01:00.0",
            }
        ],
    }
    amd = gpus["amd"]
    assert amd["driver_version"] == "6.12.12" and [d["index"] for d in amd["devices"]] == [0, 1]
    assert amd["devices"][0]["name"].startswith("Navi 22") and amd["devices"][0]["memory_total_bytes"] == 10720641024
    assert amd["devices"][1]["sku"] == "CEZANNE"
    assert (
        gpus["visible_devices"]["CUDA_VISIBLE_DEVICES"] == "0"
        and gpus["visible_devices"]["HIP_VISIBLE_DEVICES"] is None
    )
    before = calls.read_text().splitlines()
    assert sorted(line.split()[0] for line in before) == ["nvidia-smi", "nvidia-smi", "rocm-smi"]
    again = capture(repo, {**env, "CUDA_VISIBLE_DEVICES": "1"})["gpus"]
    assert calls.read_text().splitlines() == before  # facts of the boot: read once
    assert again["visible_devices"]["CUDA_VISIBLE_DEVICES"] == "1"  # the run's own: read each time
    shown = run_capsula("show", "latest", cwd=repo, env=env).stdout.decode()
    assert f"gpu       0: NVIDIA L4 ({L4_UUID}, 23034 MiB, compute capability 8.9)" in shown
    assert "gpu       nvidia driver 555.42.06, CUDA 12.5" in shown and "CUDA_VISIBLE_DEVICES=1" in shown


def test_a_changed_driver_is_a_difference_for_diff_and_verify(repo: Path, tmp_path: Path) -> None:
    capture(repo, fake_gpus(tmp_path / "old" / "bin", tmp_path / "old.txt"))
    env = fake_gpus(tmp_path / "new" / "bin", tmp_path / "new.txt", driver="560.28.03")
    capture(repo, env)
    diff = run_capsula("diff", "latest~1", "latest", cwd=repo, env=env).stdout.decode()
    assert 'context.gpus.nvidia.driver_version: "555.42.06" -> "560.28.03"' in diff
    assert "CUDA_VISIBLE_DEVICES" not in diff
    verify = run_capsula("verify", "latest~1", cwd=repo, env=env)
    assert verify.returncode == 1 and b"gpus.nvidia.driver_version" in verify.stdout
    assert run_capsula("verify", "latest", cwd=repo, env=env).returncode == 0


def test_a_gpu_tool_that_fails_or_hangs_is_recorded_as_unavailable(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    fake_tool(tmp_path / "bin", "nvidia-smi", f'echo "{said}" >&2; exit 9')
    fake_tool(tmp_path / "bin", "rocm-smi", "exec sleep 30")
    monkeypatch.setattr(capsula, "PROBE_SECONDS", 0.5)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    cache = capsula.HostCache(tmp_path / "cache", None)
    gpus = capsula.collect_gpus(cache, env, cwd=repo)
    assert gpus["nvidia"] == {"unavailable": f"nvidia-smi exited with code 9: {said}"}
    assert gpus["amd"] == {"unavailable": "rocm-smi did not answer within 0.5 s"}
    assert not any("gpus" in key for key in cache.data)  # a failure is asked again next time
    fake_tool(tmp_path / "bin", "rocm-smi", "echo '<html>not json'")
    assert "rocm-smi printed what Capsula cannot read" in str(capsula.collect_gpus(cache, env, cwd=repo)["amd"])
    without = capsula.collect_gpus(cache, {**env, "PATH": "/nonexistent"}, cwd=repo)
    assert without["nvidia"] == {"unavailable": "nvidia-smi is not on PATH"}


def test_the_gpu_parsers_read_what_the_tools_print() -> None:
    mi250 = capsula.parse_rocm_smi((GPU / "rocm-smi-mi250.json").read_text())
    assert mi250 == {
        "driver_version": "6.2.4",
        "devices": [
            {
                "index": 1,
                "name": "AMD INSTINCT MI250 (MCM) OAM AC MBA",
                "model": "0x0b0c",
                "sku": "D65209",
                "unique_id": "0x719d230578348e8c",
                "gfx_version": None,
                "memory_total_bytes": None,
            }
        ],
    }
    no_caps = capsula.parse_nvidia_smi((GPU / "nvidia-smi-q-x.xml").read_text(), "")
    devices: list[dict[str, Any]] = no_caps["devices"]  # type: ignore[assignment]
    assert devices[0]["compute_capability"] is None and devices[0]["name"] == "NVIDIA L4"
    with pytest.raises(ValueError):
        capsula.parse_rocm_smi("[1, 2]")


def conda_env(tmp_path: Path) -> Path:
    """A conda environment's conda-meta, as conda 24 writes it."""
    prefix = tmp_path / "miniforge3" / "envs" / "analysis"
    meta = prefix / "conda-meta"
    meta.mkdir(parents=True)
    records = [
        {
            "name": "python",
            "version": "3.11.7",
            "build": "hab00c5b_1_cpython",
            "build_number": 1,
            "channel": "https://conda.anaconda.org/conda-forge/linux-64",
            "subdir": "linux-64",
            "fn": "python-3.11.7-hab00c5b_1_cpython.conda",
            "url": "https://conda.anaconda.org/conda-forge/linux-64/python-3.11.7-hab00c5b_1_cpython.conda",
            "md5": "8e85ccc14b6d1d5d2c7a4e2b3c5d1f0a",
            "files": ["bin/python3.11"],
            "requested_spec": "python=3.11",
        },
        {
            "name": "tzdata",
            "version": "2024a",
            "build": "h0c530f3_0",
            "build_number": 0,
            "channel": "https://conda.anaconda.org/conda-forge/noarch",
            "subdir": "noarch",
            "fn": "tzdata-2024a-h0c530f3_0.conda",
            "url": "https://conda.anaconda.org/conda-forge/noarch/tzdata-2024a-h0c530f3_0.conda",
            "md5": "161081fc7cec0bfda0d86d7cb595f8d8",
            "files": [],
        },
    ]
    for r in records:
        (meta / f"{r['name']}-{r['version']}-{r['build']}.json").write_text(json.dumps(r, indent=2))
    (meta / "history").write_text(
        "==> 2024-03-01 10:00:00 <==\n# cmd: conda create -n analysis python=3.11\n# conda version: 24.1.2\n"
        "+conda-forge/linux-64::python-3.11.7-hab00c5b_1_cpython\n"
    )
    return prefix


def test_a_conda_environment_is_read_from_conda_meta_as_an_explicit_spec(tmp_path: Path) -> None:
    prefix = conda_env(tmp_path)
    env = {"CONDA_PREFIX": str(prefix), "CONDA_DEFAULT_ENV": "analysis"}
    cache = capsula.HostCache(tmp_path / "cache", None)
    found = capsula.collect_conda(str(prefix), env, cache)
    assert found is not None
    conda: dict[str, Any] = found
    assert conda["name"] == "analysis" and conda["prefix"] == str(prefix) and conda["conda_version"] == "24.1.2"
    assert conda["packages"] == {
        "python": {
            "version": "3.11.7",
            "build": "hab00c5b_1_cpython",
            "channel": "https://conda.anaconda.org/conda-forge",
            "url": "https://conda.anaconda.org/conda-forge/linux-64/python-3.11.7-hab00c5b_1_cpython.conda",
            "md5": "8e85ccc14b6d1d5d2c7a4e2b3c5d1f0a",
        },
        "tzdata": {
            "version": "2024a",
            "build": "h0c530f3_0",
            "channel": "https://conda.anaconda.org/conda-forge",
            "url": "https://conda.anaconda.org/conda-forge/noarch/tzdata-2024a-h0c530f3_0.conda",
            "md5": "161081fc7cec0bfda0d86d7cb595f8d8",
        },
    }
    assert conda["explicit"][-3:] == [
        "@EXPLICIT",
        "https://conda.anaconda.org/conda-forge/linux-64/python-3.11.7-hab00c5b_1_cpython.conda#8e85ccc14b6d1d5d2c7a4e2b3c5d1f0a",
        "https://conda.anaconda.org/conda-forge/noarch/tzdata-2024a-h0c530f3_0.conda#161081fc7cec0bfda0d86d7cb595f8d8",
    ]
    assert "# platform: linux-64" in conda["explicit"]
    # a package installed since is seen at once (the conda-meta directory changed)
    (prefix / "conda-meta" / "numpy-1.26.4-py311h64a7726_0.json").write_text(
        json.dumps({"name": "numpy", "version": "1.26.4", "build": "py311h64a7726_0", "subdir": "linux-64"})
    )
    os.utime(prefix / "conda-meta", ns=(1, 1))
    later: dict[str, Any] | None = capsula.collect_conda(str(prefix), env, cache)
    assert later is not None and "numpy" in later["packages"]
    assert capsula.collect_conda(str(tmp_path), {}, cache) is None  # not a conda environment


def test_a_capture_in_a_conda_environment_records_it(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = conda_env(tmp_path)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setenv("CONDA_PREFIX", str(prefix))
    monkeypatch.setenv("CONDA_DEFAULT_ENV", "analysis")
    capsule = capsula.capture(capsula.load_config(repo))
    conda = load(capsule.path / "context.json")["conda"]
    assert conda["name"] == "analysis" and set(conda["packages"]) == {"python", "tzdata"}
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    write_config(repo, "[capture]\ninclude-conda = false\n")
    assert "conda" not in load(capsula.capture(capsula.load_config(repo)).path / "context.json")


def test_lock_and_requirement_files_are_hashed_without_configuration(repo: Path) -> None:
    files = {"uv.lock": "version = 1\n", "requirements-dev.txt": "pytest==8.3.2\n", "environment.yml": "name: x\n"}
    for name, text in files.items():
        (repo / name).write_text(text)
    (repo / "notes.txt").write_text("not a lock file\n")
    locks = capture(repo)["lock_files"]
    assert set(locks) == set(files)
    for name, text in files.items():
        assert locks[name]["file_hash"] == hashlib.sha256(text.encode()).hexdigest()
    (repo / "uv.lock").write_text("version = 2\n")
    verify = run_capsula("verify", "latest", cwd=repo)
    assert verify.returncode == 1 and b"lock_files.uv.lock.file_hash" in verify.stdout


def test_containers_are_told_apart_by_what_they_leave_in_the_file_system(tmp_path: Path) -> None:
    def root(**files: str) -> Path:
        d = tmp_path / f"root{len(list(tmp_path.iterdir()))}"
        for rel, text in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        d.mkdir(exist_ok=True)
        return d

    containerenv = (
        'engine="podman-4.9.3"\nname="train-7"\nid="4c4d6ad4f3f5c7a2b1e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7"\n'
        'image="ghcr.io/lab/train:2.1"\nimageid="sha256:1f0e3dad99908345f7439f8ffabdffc4"\nrootless=1\n'
    )
    podman = capsula.collect_container({}, root(**{"run/.containerenv": containerenv}))
    assert podman is not None and podman["runtime"] == "podman" and podman["image"] == "ghcr.io/lab/train:2.1"
    assert podman["image_digest"] == "sha256:1f0e3dad99908345f7439f8ffabdffc4" and podman["name"] == "train-7"
    docker_id = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    docker = capsula.collect_container(
        {}, root(**{".dockerenv": "", "proc/self/cgroup": f"0::/system.slice/docker-{docker_id}.scope\n"})
    )
    assert docker == {"runtime": "docker", "id": docker_id, "image": None, "image_digest": None}
    labels = {"org.opencontainers.image.digest": "sha256:5f0b", "org.label-schema.build-date": "2024-05-01"}
    sif = capsula.collect_container(
        {"APPTAINER_CONTAINER": "/images/train.sif", "APPTAINER_NAME": "train.sif"},
        root(**{".singularity.d/labels.json": json.dumps(labels)}),
    )
    assert sif is not None and sif["runtime"] == "apptainer" and sif["image"] == "/images/train.sif"
    assert sif["image_digest"] == "sha256:5f0b" and sif["labels"] == labels
    pod = capsula.collect_container(
        {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "train-5d9f-x2"},
        root(**{"var/run/secrets/kubernetes.io/serviceaccount/namespace": "research\n"}),
    )
    assert pod is not None and pod["runtime"] == "kubernetes" and pod["pod"] == "train-5d9f-x2"
    assert pod["namespace"] == "research"
    assert capsula.collect_container({}, root()) is None


def test_batch_jobs_are_read_from_the_schedulers_variables(tmp_path: Path) -> None:
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"}
    slurm |= {"SLURM_JOB_PARTITION": "gpu", "SLURM_CLUSTER_NAME": "hpc", "SLURM_JOB_NODELIST": "node[01-02]"}
    slurm |= {"SLURM_CPUS_ON_NODE": "8", "SLURM_MEM_PER_NODE": "64000", "SLURM_RESTART_COUNT": "1", "PATH": ""}
    blocks = capsula.collect_cluster(slurm, cwd=tmp_path)
    assert blocks["slurm"] == {
        **{"job_id": "4242", "array_job_id": "4240", "array_task_id": "2", "cluster": "hpc", "partition": "gpu"},
        **{"node_list": "node[01-02]", "cpus_on_node": "8", "mem_per_node_mb": "64000", "restart_count": "1"},
        "time_limit": {"unavailable": "scontrol is not on PATH"},
    }
    pbs = capsula.collect_cluster(
        {"PBS_JOBID": "1234.pbs01", "PBS_ARRAY_INDEX": "3", "PBS_QUEUE": "long"}, cwd=tmp_path
    )
    assert pbs == {"pbs": {"job_id": "1234.pbs01", "array_index": "3", "queue": "long"}}
    lsf = capsula.collect_cluster({"LSB_JOBID": "77", "LSB_JOBINDEX": "0"}, cwd=tmp_path)
    assert lsf == {"lsf": {"job_id": "77", "array_index": "0"}}
    assert capsula.collect_cluster({}, cwd=tmp_path) == {}
    fields = capsula.parse_scontrol_job(
        "JobId=4242 JobName=train.sh UserId=ana(1000) Partition=gpu TimeLimit=1-00:00:00 BatchHost=node01 "
        "Command=/home/ana/train.sh WorkDir=/home/ana"
    )
    assert fields["TimeLimit"] == "1-00:00:00" and fields["BatchHost"] == "node01"


def test_each_context_can_be_turned_off(repo: Path) -> None:
    off = "\n".join(f"include-{name.replace('_', '-')} = false" for name in capsula.ENVIRONMENT_CONTEXTS)
    write_config(repo, f"[capture]\n{off}\n")
    context = capture(repo)
    assert not set(capsula.ENVIRONMENT_CONTEXTS) & set(context)
    assert only_capsule(repo / "vault")


def test_show_reads_these_blocks_as_untrusted_input() -> None:
    hostile: dict[str, Any] = {
        "gpus": {
            "nvidia": {"devices": "not a list"},
            "amd": {"devices": [1, None, {"name": "x"}]},
            "visible_devices": 3,
        },
        "conda": ["not", "a", "table"],
        "container": {"runtime": "podman", "image": "\x1b]0;owned\x07"},
        "cluster": {"slurm": "4242", "pbs": {"job_id": {"nested": 1}}},
        "lock_files": {"uv.lock": None},
    }
    lines = capsula.environment_lines(hostile)
    assert "gpu       None: x (None, None)" in lines and "container podman: \x1b]0;owned\x07" in lines
    assert [capsula.printable(line) for line in lines if "podman" in line] == ["container podman: ?]0;owned?"]
    assert "lock      uv.lock = None" in lines
    proper = {
        "conda": {"name": "analysis", "prefix": "/opt/envs/analysis", "packages": {"a": {}}, "conda_version": "24.1.2"}
    }
    proper |= {"cluster": {"slurm": {"job_id": "4242", "partition": "gpu", "time_limit": {"unavailable": "no"}}}}
    proper |= {"notebook": {"path": "/work/analysis.ipynb", "file_hash": "ab12"}}
    assert capsula.environment_lines(proper) == [
        "conda     analysis (/opt/envs/analysis), 1 packages, conda 24.1.2",
        "slurm     job_id=4242 partition=gpu",
        "notebook  /work/analysis.ipynb = ab12",
    ]
