"""Load and faults: the record stays complete and true, and no project file is lost."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CAPSULA, REPO, load, only_capsule, run_capsula, write_config

import capsula


def capsules(root: Path, vault: str = "vault") -> list[Path]:
    return sorted(p for p in (root / vault).iterdir() if not p.name.startswith("."))


def all_json_valid(capsule: Path) -> None:
    for path in capsule.rglob("*.json"):
        json.loads(path.read_bytes())


def wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def peak_rss_kib(command: list[str], *, cwd: Path) -> int:
    """The peak RSS of one process, measured from a small fresh parent: a fork of the big
    pytest process would count the parent's pages until exec."""
    probe = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "_, status, usage = os.wait4(p.pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
    )
    code, peak = subprocess.run(
        [sys.executable, "-c", probe, *command], cwd=cwd, capture_output=True, check=True
    ).stdout.split()
    assert int(code) == 0
    return int(peak)


# --- Load ---------------------------------------------------------------------------------


@pytest.mark.stress
def test_32_monitors_started_together_make_32_complete_capsules(repo: Path) -> None:
    write_config(repo, "[capture]\ncapsule-template = '%Y%m%d_%H%M'\n")
    procs = [
        subprocess.Popen(
            [sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", f"print({i})"],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(32)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    found = capsules(repo)
    assert len(found) == 32
    printed = sorted(int((c / "stdout.txt").read_text()) for c in found)
    assert printed == list(range(32))  # each capsule holds its own run, nothing mixed
    for capsule in found:
        all_json_valid(capsule)
        post = load(capsule / "post-run-info.json")
        pre = load(capsule / "pre-run-info.json")
        assert post["status"] == "completed" and post["stdout"] == f"{pre['args'][-1][6:-1]}\n"


@pytest.mark.stress
def test_a_decorated_function_called_200_times_makes_200_capsules(repo: Path) -> None:
    @capsula.monitor(repo, include_return_value=True)
    def f(i: int) -> int:
        return i * i

    assert [f(i) for i in range(200)] == [i * i for i in range(200)]
    found = capsules(repo)
    assert len(found) == 200
    assert sorted(load(c / "post-run-info.json")["return_value"] for c in found) == sorted(i * i for i in range(200))


@pytest.mark.stress
def test_interleaved_high_rate_output_is_saved_byte_exact(repo: Path) -> None:
    code = (
        "import os, time\n"
        "end = time.monotonic() + 2.5\n"
        "i = 0\n"
        "while time.monotonic() < end:\n"
        "    os.write(1, b'out %09d\\n' % i); os.write(2, b'err %09d\\n' % i); i += 1\n"
        "os.write(1, b'last out\\n'); os.write(2, b'last err\\n')\n"
    )
    result = run_capsula("monitor", "-q", sys.executable, "-c", code, cwd=repo)
    assert result.returncode == 0
    capsule = only_capsule(repo / "vault")
    out, err = (capsule / "stdout.txt").read_bytes(), (capsule / "stderr.txt").read_bytes()
    n = out.count(b"\n") - 1
    assert n > 1000
    assert out == b"".join(b"out %09d\n" % i for i in range(n)) + b"last out\n"
    assert err == b"".join(b"err %09d\n" % i for i in range(n)) + b"last err\n"
    assert result.stdout == out and result.stderr == err
    post = load(capsule / "post-run-info.json")
    assert post["stdout_bytes"] == len(out) and post["stderr_bytes"] == len(err)


# --- Faults: signals in each phase --------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_pre_capture_commands(repo: Path, tmp_path: Path, signum: int, code: int) -> None:
    started = tmp_path / "started"
    write_config(repo, f"[capture]\npre-capture-commands = ['touch {started}; sleep 30']\n")
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "monitor", "touch", str(tmp_path / "ran")], cwd=repo)
    wait_for(started)
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == code
    capsule = only_capsule(repo / "vault")
    assert load(capsule / "context.json")["status"] == "interrupted"
    assert load(capsule / "capsule.json")["status"] == "interrupted"
    assert not (tmp_path / "ran").exists()
    all_json_valid(capsule)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_post_run_file_moves_keeps_every_file(
    repo: Path, other_fs_vault: Path, signum: int, code: int
) -> None:
    vault = other_fs_vault
    write_config(
        repo,
        f'[capture]\nvault-directory = "{vault}"\n[monitor.item.out.files]\n'
        '"done.bin" = { move = true }\n"pipe" = { move = true }\n"after.txt" = { move = true }\n',
    )
    payload = os.urandom(1 << 20)
    (repo / "done.bin").write_bytes(payload)
    (repo / "after.txt").write_text("kept\n")
    os.mkfifo(repo / "pipe")  # moving it across filesystems blocks in open(): a move in progress
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "monitor", "-i", "out", "true"], cwd=repo)
    capsule = None
    deadline = time.monotonic() + 20
    while capsule is None or not (capsule / "done.bin").exists():
        assert time.monotonic() < deadline
        found = [p for p in vault.iterdir() if not p.name.startswith(".")] if vault.exists() else []
        capsule = found[0] if found else None
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == code
    assert (capsule / "done.bin").read_bytes() == payload and not (repo / "done.bin").exists()
    assert (repo / "pipe").exists() and not (capsule / "pipe").exists()  # still at its source
    assert (repo / "after.txt").read_text() == "kept\n"  # not reached: untouched
    assert not [p for p in capsule.iterdir() if p.name.endswith(".part")]
    post = load(capsule / "post-run-info.json")
    assert post["status"] == "interrupted" and post["exit_code"] == 0


def test_full_disk_during_a_move_across_filesystems_keeps_the_source(repo: Path, other_fs_vault: Path) -> None:
    payload = os.urandom(2 << 20)
    (repo / "result.bin").write_bytes(payload)
    write_config(
        repo,
        f'[capture]\nvault-directory = "{other_fs_vault}"\n[monitor.item.out.files]\n"result.bin" = {{ move = true }}\n',
    )
    result = subprocess.run(
        [sys.executable, str(CAPSULA), "monitor", "-i", "out", "true"],
        cwd=repo,
        capture_output=True,
        preexec_fn=lambda: _limit_file_size(1 << 20),
    )
    err = result.stderr.decode()
    assert result.returncode == 1 and "could not store result.bin" in err and "Traceback" not in err
    assert (repo / "result.bin").read_bytes() == payload  # the move failed whole: the source is intact
    (capsule,) = [p for p in other_fs_vault.iterdir() if not p.name.startswith(".")]
    assert not (capsule / "result.bin").exists() and not [p for p in capsule.iterdir() if p.name.endswith(".part")]
    assert "result.bin" in load(capsule / "post-run-info.json")["error"]


def test_sigkill_of_capsula_leaves_a_capsule_that_list_calls_died(repo: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    code = (
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); print('x', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "monitor", sys.executable, "-c", code], cwd=repo)
    wait_for(pidfile)
    time.sleep(0.1)
    try:
        proc.kill()
        proc.wait()
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    capsule = only_capsule(repo / "vault")
    all_json_valid(capsule)
    assert (capsule / "stdout.txt").read_bytes() == b"x\n"  # what arrived before the kill is kept
    (row,) = json.loads(run_capsula("list", "--json", cwd=repo).stdout)
    assert row["status"] == "died"


# --- Faults: the vault ----------------------------------------------------------------------


def test_vault_that_cannot_be_created_is_a_clear_error(repo: Path) -> None:
    (repo / "blocked").write_text("a file where the vault should be\n")
    write_config(repo, "[capture]\nvault-directory = 'blocked/vault'\n")
    result = run_capsula("monitor", "touch", "ran", cwd=repo)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.startswith("capsula: error: cannot create the vault") and err.count("\n") == 1
    assert not (repo / "ran").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_vault_not_writable(repo: Path) -> None:
    (repo / "vault").mkdir(mode=0o555)
    result = run_capsula("capture", cwd=repo)
    assert result.returncode == 1 and "cannot create a capsule" in result.stderr.decode()


def _limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_during_the_run_is_reported_and_loses_no_source_file(repo: Path) -> None:
    write_config(repo, '[monitor.item.out.files]\n"data.txt" = { move = true }\n')
    code = "import sys\nfor _ in range(64): sys.stdout.write('y' * 65535 + '\\n')"
    result = subprocess.run(
        [sys.executable, str(CAPSULA), "monitor", "-i", "out", sys.executable, "-c", code],
        cwd=repo,
        capture_output=True,
        preexec_fn=lambda: _limit_file_size(1 << 20),
    )
    err = result.stderr.decode()
    assert result.returncode == 1 and "stdout.txt is incomplete" in err and "Traceback" not in err
    capsule = only_capsule(repo / "vault")
    assert len(result.stdout) == 64 << 16  # the terminal still got everything
    assert (capsule / "stdout.txt").stat().st_size <= 1 << 20
    post = load(capsule / "post-run-info.json")
    assert "incomplete" in post["error"] and post["exit_code"] == 0 and post["status"] == "incomplete"
    assert (capsule / "data.txt").read_text() == "input data\n"  # moved by rename, whole


def test_full_disk_at_capture_is_an_error_and_nothing_runs(repo: Path, tmp_path: Path) -> None:
    (repo / "big.txt").write_bytes(b"z" * (2 << 20))
    write_config(repo, '[capture.files]\n"big.txt" = { copy = true }\n')
    result = subprocess.run(
        [sys.executable, str(CAPSULA), "capture"],
        cwd=repo,
        capture_output=True,
        preexec_fn=lambda: _limit_file_size(1 << 20),
    )
    assert (repo / "big.txt").stat().st_size == 2 << 20  # the source is intact
    err = result.stderr.decode()
    # one line for the error, after one for each other thing the record lacks (here: the diff)
    assert result.returncode == 1 and all(line.startswith("capsula: ") for line in err.splitlines())
    assert "could not store big.txt (File too large)" in err and "Traceback" not in err
    capsule = only_capsule(repo / "vault")
    # the capture itself went well, but its record lacks a file: incomplete, and said so
    assert load(capsule / "context.json")["status"] == "incomplete"
    assert load(capsule / "capsule.json")["status"] == "incomplete"
    assert not [p for p in capsule.iterdir() if p.name.endswith(".part")]
    all_json_valid(capsule)


def test_a_long_silent_command_is_waited_for(repo: Path) -> None:
    result = run_capsula("monitor", "sleep", "2", cwd=repo)
    assert result.returncode == 0
    assert load(only_capsule(repo / "vault") / "post-run-info.json")["run_time_seconds"] >= 2


# --- Huge and empty files -------------------------------------------------------------------


@pytest.mark.stress
def test_huge_file_is_hashed_in_constant_memory(repo: Path) -> None:
    size = 512 << 20
    with open(repo / "huge.bin", "wb") as f:
        f.truncate(size)  # sparse: cheap to make, still read whole
    (repo / "empty.txt").write_bytes(b"")
    write_config(repo, '[capture.files]\n"huge.bin" = {}\n"empty.txt" = { copy = true }\n')
    peak_kib = peak_rss_kib([sys.executable, str(CAPSULA), "capture"], cwd=repo)
    files = load(only_capsule(repo / "vault") / "context.json")["files"]
    digest = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        digest.update(block)
    assert files["huge.bin"]["file_hash"] == digest.hexdigest()
    assert files["empty.txt"]["file_hash"] == hashlib.sha256(b"").hexdigest() and files["empty.txt"]["size"] == 0
    assert peak_kib < 60 << 10  # a 512 MiB file hashed in well under 60 MiB


def test_repo_check_uses_the_real_capsula(repo: Path) -> None:
    assert Path(capsula.__file__).resolve() == (REPO / "capsula.py").resolve()


def test_a_record_that_lacks_git_is_incomplete_said_at_once_and_listed(repo: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with sh but no git
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    env = {**os.environ, "PATH": str(bin_dir)}
    capture = subprocess.run([sys.executable, str(CAPSULA), "capture"], cwd=repo, capture_output=True, env=env)
    err = capture.stderr.decode()
    assert capture.returncode == 1 and "the record is incomplete: git project" in err and "Traceback" not in err
    context = load(Path(capture.stdout.decode().strip()) / "context.json")
    assert context["status"] == "incomplete" and "git project" in context["error"]
    monitor = subprocess.run(
        [sys.executable, str(CAPSULA), "monitor", "-q", "--", "/bin/echo", "ran"],
        cwd=repo,
        capture_output=True,
        env=env,
    )
    assert monitor.returncode == 1 and monitor.stdout == b"ran\n"  # the command still ran
    assert "the record is incomplete: git project" in monitor.stderr.decode()
    rows = json.loads(
        subprocess.run([sys.executable, str(CAPSULA), "list", "--json"], cwd=repo, capture_output=True).stdout
    )
    assert [r["status"] for r in rows] == ["incomplete", "incomplete"]


def test_a_file_through_a_linked_folder_is_copied_never_moved(repo: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # a cluster's shared folder, linked into the project
    shared.mkdir()
    (shared / "x.txt").write_text("shared data\n")
    (repo / "data").symlink_to(shared)
    write_config(repo, '[capture.files]\n"data/x.txt" = { move = true }\n')
    result = run_capsula("capture", cwd=repo)
    assert result.returncode == 0 and "not moved" in result.stderr.decode()
    capsule = Path(result.stdout.decode().strip())
    assert (shared / "x.txt").read_text() == "shared data\n"  # still there
    assert (capsule / "data" / "x.txt").read_text() == "shared data\n"
    entry = load(capsule / "context.json")["files"]["data/x.txt"]
    assert entry["copied"] is True and "moved" not in entry


def test_a_signal_during_capture_keeps_the_files_stored_and_names_the_signal(repo: Path) -> None:
    for i in range(3):
        (repo / f"in{i}.txt").write_text(f"{i}\n")
    os.mkfifo(repo / "pipe")  # copying it blocks in open(): the capture is mid-way
    files = "".join(f'"in{i}.txt" = {{ copy = true }}\n' for i in range(3))
    write_config(repo, f'[capture.files]\n{files}"pipe" = {{ copy = true }}\n')
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "capture"], cwd=repo, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not list((repo / "vault").glob("*/in2.txt")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    capsule = only_capsule(repo / "vault")
    context = load(capsule / "context.json")
    assert context["status"] == "interrupted" and context["error"] == "interrupted by SIGTERM"
    assert [context["files"][f"in{i}.txt"]["file_hash"] is not None for i in range(3)] == [True] * 3


def test_verify_works_on_a_read_only_vault(repo: Path) -> None:
    assert run_capsula("monitor", "-q", "true", cwd=repo).returncode == 0
    vault = repo / "vault"
    modes = {p: p.stat().st_mode for p in [vault, *vault.rglob("*")]}
    for p in modes:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        before = {p: p.stat().st_mtime_ns for p in vault.rglob("*")}
        result = run_capsula("verify", "latest", cwd=repo)
        assert result.returncode == 0 and b"matches" in result.stdout, result.stderr
        assert {p: p.stat().st_mtime_ns for p in vault.rglob("*")} == before  # not a byte written (root or not)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.fixture
def small_vault(tmp_path: Path) -> Iterator[Path]:
    """A vault on a 1 MiB filesystem of its own (a tmpfs; needs root and mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip() or 'not root'}")
    try:
        yield mount / "vault"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_vault_that_fills_during_the_run_still_says_how_it_ended(repo: Path, small_vault: Path) -> None:
    write_config(repo, f'[capture]\nvault-directory = "{small_vault}"\n')
    code = "import sys; sys.stdout.write('x' * (3 << 20)); sys.exit(3)"
    result = run_capsula("monitor", "--", sys.executable, "-c", code, cwd=repo)
    assert result.returncode == 3 and len(result.stdout) == 3 << 20  # the terminal got it all
    assert "No space left on device" in result.stderr.decode() and b"Traceback" not in result.stderr
    capsule = only_capsule(small_vault)
    post = load(capsule / "post-run-info.json")
    assert post["exit_code"] == 3 and post["status"] == "failed" and "incomplete" in post["error"]
    assert load(capsule / "capsule.json")["status"] == "failed"
    (row,) = json.loads(run_capsula("list", "--json", "--vault", str(small_vault), cwd=repo).stdout)
    assert row["status"] == "failed" and row["exit_code"] == 3  # not "died"
    assert not list(capsule.glob(".*"))  # the reserved room and every temporary file are gone
