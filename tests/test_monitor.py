"""`capsula monitor`: live tee, byte-exact output, exit codes, signals, items."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CAPSULA, REFERENCE_VAULT, REPO, load, only_capsule, run_capsula, write_config

import capsula


def monitor(root: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return run_capsula("monitor", *args, cwd=root, **kw)  # type: ignore[arg-type]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_pre_and_post_run_info_have_0_0_19_keys(repo: Path) -> None:
    result = monitor(repo, *py("import sys; print('out'); print('err', file=sys.stderr)"))
    assert result.returncode == 0
    capsule = only_capsule(repo / "vault")
    pre, post = load(capsule / "pre-run-info.json"), load(capsule / "post-run-info.json")
    for ours, name in ((pre, "pre-run-info.json"), (post, "post-run-info.json")):
        reference = load(REFERENCE_VAULT / "monitor-cli" / name)
        assert {k: type(v) for k, v in reference.items()}.items() <= {k: type(ours[k]) for k in reference}.items()
    assert pre["args"][1:] == ["-c", "import sys; print('out'); print('err', file=sys.stderr)"]
    assert post["stdout"] == "out\n" and post["stderr"] == "err\n" and post["exit_code"] == 0
    assert post["run_time"].startswith("PT") and post["run_time"].endswith("S") and post["status"] == "completed"
    assert (capsule / "context.json").exists() and pre["host"] and pre["pid"]


def test_arguments_after_the_command_belong_to_it(repo: Path) -> None:
    code = "import sys; print(sys.argv[1:])"
    without = monitor(repo, sys.executable, "-c", code, "-n", "3", "--out", "y", "-i", "z")
    with_dashes = monitor(repo, "--", sys.executable, "-c", code, "-n", "3", "--out", "y", "-i", "z")
    assert without.stdout == with_dashes.stdout == b"['-n', '3', '--out', 'y', '-i', 'z']\n"


def test_stdout_is_exactly_the_commands(repo: Path, tmp_path: Path) -> None:
    code = "import sys; sys.stdout.buffer.write(bytes(range(256)) + b'\\xff\\xfe\\n'); sys.stderr.write('e')"
    bare = subprocess.run(py(code), capture_output=True)
    result = monitor(repo, *py(code))
    assert result.stdout == bare.stdout
    capsule = only_capsule(repo / "vault")
    assert (capsule / "stdout.txt").read_bytes() == bare.stdout
    assert (capsule / "stderr.txt").read_bytes() == b"e"
    post = load(capsule / "post-run-info.json")
    assert "\ufffd" in post["stdout"]  # invalid UTF-8 replaced in the JSON text, kept in stdout.txt


@pytest.mark.parametrize(("code", "expected"), [("pass", 0), ("raise SystemExit(3)", 3)])
def test_exit_code_is_passed_on(repo: Path, code: str, expected: int) -> None:
    result = monitor(repo, *py(code))
    assert result.returncode == expected
    post = load(only_capsule(repo / "vault") / "post-run-info.json")
    assert post["exit_code"] == expected and post["status"] == ("completed" if expected == 0 else "failed")


def test_command_not_found_is_127_one_line_and_recorded(repo: Path) -> None:
    result = monitor(repo, "no-such-command-xyz", "arg")
    err = result.stderr.decode()
    assert result.returncode == 127
    assert err.count("\n") == 1 and "command not found: no-such-command-xyz" in err
    post = load(only_capsule(repo / "vault") / "post-run-info.json")
    assert post["exit_code"] == 127 and post["status"] == "failed" and "not found" in post["error"]


def test_command_is_searched_on_path_as_execvp_does(repo: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, mode in ((first, 0o644), (second, 0o755)):  # the first one is not executable
        folder.mkdir()
        (folder / "tool").write_text(f"#!/bin/sh\necho {folder.name}\n")
        (folder / "tool").chmod(mode)
    env = {**os.environ, "PATH": f"{first}:{second}:{os.environ['PATH']}"}
    result = monitor(repo, "tool", env=env)
    assert result.returncode == 0 and result.stdout == b"second\n"
    result = monitor(repo, "tool", env={**env, "PATH": f"{first}:{os.environ['PATH']}"})
    assert result.returncode == 126 and b"cannot run the command" in result.stderr


def test_command_gets_default_sigpipe(repo: Path) -> None:
    # Python ignores SIGPIPE; a command inheriting that would complain instead of stopping.
    result = monitor(repo, "sh", "-c", "yes | head -n 1")
    assert result.returncode == 0 and result.stdout == b"y\n"
    assert (only_capsule(repo / "vault") / "stderr.txt").read_bytes() == b""


def test_killed_command_is_128_plus_signal(repo: Path) -> None:
    result = monitor(repo, *py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert result.returncode == 128 + 9
    post = load(only_capsule(repo / "vault") / "post-run-info.json")
    assert post["signal"] == "SIGKILL" and post["exit_code"] == 137


def test_output_appears_while_the_command_runs(repo: Path) -> None:
    code = "import time; print('first', flush=True); time.sleep(3); print('second')"
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "monitor", *py(code)], cwd=repo, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"first\n"
    assert proc.poll() is None  # read before the command ended
    assert proc.communicate()[0] == b"second\n"


def test_large_output_is_saved_whole_and_inline_text_is_cut(repo: Path) -> None:
    code = "import sys\nfor i in range(200000): sys.stdout.write(f'{i:09d} line of output\\n')"
    result = monitor(repo, *py(code))
    assert result.returncode == 0
    capsule = only_capsule(repo / "vault")
    data = (capsule / "stdout.txt").read_bytes()
    assert len(data) == 200000 * 25 and data.endswith(b"000199999 line of output\n")
    post = load(capsule / "post-run-info.json")
    assert post["stdout_truncated"] is True and post["stdout_bytes"] == len(data)
    assert len(post["stdout"].encode()) <= 1 << 20 and post["stdout"].endswith("000199999 line of output\n")


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_are_forwarded_and_the_run_is_recorded(repo: Path, tmp_path: Path, signum: int, expected: int) -> None:
    marker = tmp_path / "got-signal"
    code = (
        "import signal, sys, time\n"
        f"def h(s, f):\n    open({str(marker)!r}, 'w').write(str(s)); sys.exit(5)\n"
        "signal.signal(signal.SIGINT, h); signal.signal(signal.SIGTERM, h)\n"
        "print('ready', flush=True)\ntime.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "monitor", *py(code)], cwd=repo, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == expected
    assert marker.read_text() == str(int(signum))  # the command got it, once
    post = load(only_capsule(repo / "vault") / "post-run-info.json")
    assert post["status"] == "interrupted" and post["exit_code"] == 5


def test_resource_usage_comes_from_the_wait_status(repo: Path) -> None:
    monitor(repo, *py("x = bytearray(50 << 20); sum(range(3_000_000))"))
    usage = load(only_capsule(repo / "vault") / "post-run-info.json")["resource_usage"]
    assert usage["max_rss_bytes"] > 50 << 20 and usage["user_time"] > 0


def test_capsule_dir_is_in_the_commands_environment(repo: Path) -> None:
    code = "import os, sys; sys.path.insert(0, os.environ['CAPSULA_HOME']); import capsula; print(capsula.get_capsule_dir())"
    result = monitor(repo, *py(code), env={**os.environ, "CAPSULA_HOME": str(REPO)})
    capsule = only_capsule(repo / "vault")
    assert result.stdout.decode().strip() == str(capsule)


def test_get_capsule_dir_outside_a_run_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import capsula

    monkeypatch.delenv("CAPSULE_DIR", raising=False)
    with pytest.raises(capsula.CapsulaError, match="outside a monitored run"):
        capsula.get_capsule_dir()


def test_items_are_hashed_copied_and_moved_after_the_run(repo: Path) -> None:
    write_config(
        repo,
        """[monitor.item.out.files]
"out/a.txt" = { hash = "sha256", move = true }
"out/b.txt" = { hash = "md5", copy = true }
"out/never.txt" = { hash = "sha256" }
""",
    )
    code = "import os; os.makedirs('out'); open('out/a.txt','w').write('a'); open('out/b.txt','w').write('b')"
    result = monitor(repo, "-i", "out", *py(code))
    assert result.returncode == 0 and "out/never.txt: no such file" in result.stderr.decode()
    capsule = only_capsule(repo / "vault")
    files = load(capsule / "post-run-info.json")["files"]
    assert files["out/never.txt"] is None and files["out/b.txt"]["hash_algorithm"] == "md5"
    assert (capsule / "out" / "a.txt").read_text() == "a" and not (repo / "out" / "a.txt").exists()
    assert (capsule / "out" / "b.txt").read_text() == "b" and (repo / "out" / "b.txt").exists()


def test_unknown_item_is_an_error_before_anything_runs(repo: Path, tmp_path: Path) -> None:
    result = monitor(repo, "-i", "nope", "touch", str(tmp_path / "ran"))
    assert result.returncode == 2 and "unknown item 'nope'" in result.stderr.decode()
    assert not (tmp_path / "ran").exists() and not (repo / "vault").exists()


def test_failing_pre_capture_command_does_not_run_the_command(repo: Path, tmp_path: Path) -> None:
    write_config(repo, "[capture]\npre-capture-commands = ['exit 1']\n")
    result = monitor(repo, "touch", str(tmp_path / "ran"))
    assert result.returncode == 1 and not (tmp_path / "ran").exists()


def test_no_command_is_a_usage_error(repo: Path) -> None:
    result = monitor(repo)
    assert result.returncode == 2 and "no command to monitor" in result.stderr.decode()


def test_a_command_that_closes_stdout_early_and_keeps_running(repo: Path) -> None:
    code = "import os, sys, time; print('bye', flush=True); os.close(1); time.sleep(1.5); sys.stderr.write('late\\n')"
    start = time.monotonic()
    result = monitor(repo, *py(code))
    assert result.returncode == 0 and time.monotonic() - start < 15
    capsule = only_capsule(repo / "vault")
    assert (capsule / "stdout.txt").read_bytes() == b"bye\n" and (capsule / "stderr.txt").read_bytes() == b"late\n"


def test_a_background_child_holding_the_pipe_does_not_hang_capsula(repo: Path) -> None:
    code = "import subprocess, sys; subprocess.Popen(['sleep', '60']); print('parent done')"
    start = time.monotonic()
    result = monitor(repo, *py(code), timeout=30)
    assert result.returncode == 0 and time.monotonic() - start < 15
    assert (only_capsule(repo / "vault") / "stdout.txt").read_bytes() == b"parent done\n"


def test_monitor_without_pidfd_polls_for_the_exit(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Where there is no pidfd (not Linux), the command's exit is polled for."""
    monkeypatch.delattr(os, "pidfd_open")
    monkeypatch.chdir(repo)
    code = capsula.main(["monitor", "-q", *py("import sys, time; print('out'); time.sleep(0.2); sys.exit(3)")])
    assert code == 3 and capfd.readouterr().out == "out\n"
    post = load(only_capsule(repo / "vault") / "post-run-info.json")
    assert post["exit_code"] == 3 and post["stdout"] == "out\n"


def test_command_inherits_the_descriptors_capsula_was_given(repo: Path, tmp_path: Path) -> None:
    # As `time` or `env` do: make's jobserver pipe, or a `3>log` redirection, reach the command.
    log = tmp_path / "fd.log"
    with open(log, "wb") as f:
        code = f"import os; os.write({f.fileno()}, b'through')"
        result = monitor(repo, *py(code), pass_fds=(f.fileno(),))
    assert result.returncode == 0 and log.read_bytes() == b"through"


def test_a_failure_after_the_command_was_reaped_is_reported_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pump = capsula._pump

    def pump_then_fail(pid: int, tees: Any, **options: Any) -> Any:
        real_pump(pid, tees, **options)  # the command has exited and been reaped
        raise RuntimeError("after the run")

    monkeypatch.setattr(capsula, "_pump", pump_then_fail)
    with pytest.raises(RuntimeError, match="after the run"):  # not a ChildProcessError from the cleanup
        capsula.run_command(
            ["true"], cwd=Path.cwd(), env=dict(os.environ), capsule=tmp_path, router=capsula.SignalRouter()
        )


def test_signals_a_shell_passes_on_reach_the_command_and_do_not_interrupt(repo: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "got = []\n"
        "for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):\n"
        "    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))\n"
        "print('ready', flush=True)\n"
        "while len(got) < 3:\n"
        "    time.sleep(0.01)\n"
        "print(*got)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):  # SLURM's --signal=B:USR1@90, a resized window
        proc.send_signal(s)
        time.sleep(0.1)
    assert proc.stdout.read() == b"SIGUSR1 SIGUSR2 SIGWINCH\n" and proc.wait(timeout=20) == 0
    post = load(only_capsule(repo / "vault") / "post-run-info.json")
    assert post["status"] == "completed" and post["signals_received"] == ["SIGUSR1", "SIGUSR2", "SIGWINCH"]


def test_a_term_then_kill_records_both(repo: Path) -> None:
    code = "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen(
        [sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)  # the command ignores it; then the scheduler kills it
    time.sleep(0.3)
    (capsule,) = (repo / "vault").iterdir()
    os.kill(child, signal.SIGKILL)
    assert proc.wait(timeout=20) == 143
    post = load(capsule / "post-run-info.json")
    assert post["signals_received"] == ["SIGTERM"] and post["signal"] == "SIGKILL" and post["status"] == "interrupted"


def test_a_run_killed_for_memory_is_recorded_as_out_of_memory(repo: Path, tmp_path: Path) -> None:
    before = capsula.oom_kills()
    cgroup = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            cgroup = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / f"capsula-test-{os.getpid()}"
        elif not controllers and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            cgroup = Path("/sys/fs/cgroup") / path.lstrip("/") / f"capsula-test-{os.getpid()}"
    if before is None or cgroup is None:
        pytest.skip("no memory cgroup to read here")
    try:
        cgroup.mkdir()
        limit = "memory.limit_in_bytes" if (cgroup / "memory.limit_in_bytes").exists() else "memory.max"
        (cgroup / limit).write_text(str(96 << 20))
    except OSError as exc:
        pytest.skip(f"cannot make a memory-limited cgroup here: {exc}")
    try:
        code = "x = bytearray(400 << 20)"
        script = f'echo $$ > {cgroup}/cgroup.procs && exec "{sys.executable}" "{CAPSULA}" monitor -q "{sys.executable}" -c "{code}"'
        result = subprocess.run(["sh", "-c", script], cwd=repo, capture_output=True, timeout=60)
        assert result.returncode == 137, result.stderr
        post = load(only_capsule(repo / "vault") / "post-run-info.json")
        assert post["out_of_memory"] is True and post["signal"] == "SIGKILL" and "memory" in post["error"]
    finally:
        cgroup.rmdir()


def test_oom_kills_reads_cgroup_v1_and_v2(tmp_path: Path) -> None:
    (tmp_path / "proc").write_text("4:memory:/job\n0::/\n")
    (tmp_path / "memory" / "job").mkdir(parents=True)
    (tmp_path / "memory" / "job" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert capsula.oom_kills(cgroups=tmp_path / "proc", root=tmp_path) == 3
    (tmp_path / "proc").write_text("0::/slurm/job_7\n")
    (tmp_path / "slurm" / "job_7").mkdir(parents=True)
    (tmp_path / "slurm" / "job_7" / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert capsula.oom_kills(cgroups=tmp_path / "proc", root=tmp_path) == 1
    assert capsula.oom_kills(cgroups=tmp_path / "missing", root=tmp_path) is None


def test_an_array_of_tasks_records_each_its_own_output(repo: Path) -> None:
    write_config(repo, '[monitor.item.out.files]\n"results/out_${SLURM_ARRAY_TASK_ID}.txt" = {}\n')
    (repo / "results").mkdir()
    code = "import os; open(f\"results/out_{os.environ['SLURM_ARRAY_TASK_ID']}.txt\", 'w').write(os.environ['SLURM_ARRAY_TASK_ID'])"
    procs = [
        subprocess.Popen(
            [sys.executable, str(CAPSULA), "monitor", "-q", "-i", "out", sys.executable, "-c", code],
            cwd=repo,
            env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task)},
        )
        for task in range(12)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * 12
    for capsule in (repo / "vault").iterdir():
        ((path, entry),) = load(capsule / "post-run-info.json")["files"].items()
        task = path.removeprefix("results/out_").removesuffix(".txt")
        assert entry["file_hash"] == hashlib.sha256(task.encode()).hexdigest()  # its own, not another task's


def test_an_output_the_run_did_not_write_is_said_and_find_prefers_the_writer(repo: Path) -> None:
    write_config(repo, '[monitor.item.out.files]\n"results/*.txt" = {}\n')
    (repo / "results").mkdir()
    write = "open('results/a.txt', 'w').write('made')"
    assert run_capsula("monitor", "-q", "-i", "out", sys.executable, "-c", write, cwd=repo).returncode == 0
    idle = run_capsula("monitor", "-q", "-i", "out", "true", cwd=repo)
    assert idle.returncode == 0 and b"results/a.txt: not written by this run" in idle.stderr
    writer, idler = sorted((repo / "vault").iterdir())
    assert "written_by_this_run" not in load(writer / "post-run-info.json")["files"]["results/a.txt"]
    assert load(idler / "post-run-info.json")["files"]["results/a.txt"]["written_by_this_run"] is False
    found = run_capsula("find", "results/a.txt", cwd=repo).stdout.decode().splitlines()
    assert found[0].split() == [writer.name, "output", "results/a.txt"] and "not written" in found[1]
