"""list, show, diff, verify, rerun and find."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CAPSULA, REFERENCE_VAULT, git, load, run_capsula, write_config

import capsula

SCRIPT = """\
import sys
text = open("input.txt").read()
suffix = "-v2"  # uncommitted change
open("output.txt", "w").write(text.upper() + suffix)
print("wrote", len(text), "chars")
"""


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@pytest.fixture
def project(repo: Path) -> Path:
    write_config(repo, '[monitor.item.out.files]\n"output.txt" = { hash = "sha256", move = true }\n')
    (repo / "make.py").write_text(SCRIPT.replace('suffix = "-v2"  # uncommitted change', 'suffix = ""'))
    (repo / ".gitignore").write_text("vault/\noutput.txt\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "script")
    return repo


def capsules(root: Path) -> list[str]:
    return [row["name"] for row in json.loads(ok(run_capsula("list", "--json", cwd=root)))]


def test_list_is_newest_first_with_status_exit_and_git(project: Path) -> None:
    write_config(project, "[capture]\ncapsule-template = 'c'\n")
    run_capsula("capture", cwd=project)
    run_capsula("monitor", "sh", "-c", "exit 4", cwd=project)
    rows = json.loads(ok(run_capsula("list", "--json", cwd=project)))
    assert [r["name"] for r in rows] == ["c_2", "c"]
    assert rows[0]["kind"] == "command" and rows[0]["status"] == "failed" and rows[0]["exit_code"] == 4
    assert rows[0]["command"] == "sh -c exit 4" and rows[1]["kind"] == "capture"
    sha = git(project, "rev-parse", "HEAD").strip()
    assert rows[0]["git"]["project"] == {"sha": sha, "dirty": True}  # capsula.toml is uncommitted
    table = ok(run_capsula("list", cwd=project)).splitlines()
    assert table[0].split() == ["NAME", "STARTED", "KIND", "STATUS", "EXIT", "TIME", "GIT", "COMMAND"]
    assert sha[:8] + "*" in table[1] and "sh -c exit 4" in table[1]


def test_list_says_died_for_a_vanished_capsula(project: Path) -> None:
    capsule = capsula.capture(capsula.load_config(project), kind="command")
    dead = subprocess.Popen(["true"])
    dead.wait()
    capsule.write_manifest(status="running", pid=dead.pid)
    (row,) = json.loads(ok(run_capsula("list", "--json", cwd=project)))
    assert row["status"] == "died"


def test_show_by_name_prefix_latest_and_path(project: Path) -> None:
    write_config(project, "[capture]\ncapsule-template = 'run-%Y'\n")
    ok(run_capsula("monitor", "echo", "first", cwd=project))
    ok(run_capsula("monitor", "echo", "second", cwd=project))
    first, second = sorted(capsules(project))
    assert "echo second" in ok(run_capsula("show", "latest", cwd=project))
    assert "echo first" in ok(run_capsula("show", "latest~1", cwd=project))
    assert "echo first" in ok(run_capsula("show", first, cwd=project))
    assert "echo second" in ok(run_capsula("show", str(project / "vault" / second), cwd=project))
    ambiguous = run_capsula("show", "run-", cwd=project)
    assert ambiguous.returncode == 1 and "matches 2 capsules" in ambiguous.stderr.decode()
    shown = json.loads(ok(run_capsula("show", "latest", "--json", cwd=project)))
    assert shown["post_run"]["stdout"] == "second\n" and shown["pre_run"]["args"] == ["echo", "second"]
    missing = run_capsula("show", "nope", cwd=project)
    assert missing.returncode == 1 and missing.stderr.decode().count("\n") == 1


def test_diff_names_what_differs(project: Path) -> None:
    env = {**os.environ, "MODE": "a"}
    write_config(project, "[capture]\nenvironment-variables = ['MODE']\n")
    ok(run_capsula("monitor", "sh", "-c", "echo same; echo $MODE", cwd=project, env=env))
    ok(run_capsula("monitor", "sh", "-c", "echo same; echo $MODE", cwd=project, env=env))
    same = run_capsula("diff", "latest~1", "latest", "--ignore", "run_time", cwd=project)
    assert same.returncode == 0 and same.stdout == b"no differences\n", same.stdout
    ok(run_capsula("monitor", "sh", "-c", "echo same; echo $MODE", cwd=project, env={**env, "MODE": "b"}))
    differ = run_capsula("diff", "latest~1", "latest", "--ignore", "run_time", cwd=project)
    out = differ.stdout.decode()
    assert differ.returncode == 1
    assert 'context.environment_variables.MODE: "a" -> "b"' in out
    assert "-a" in out.splitlines() and "+b" in out.splitlines()  # the unified diff of stdout
    runs = [p for p in (project / "vault").iterdir() if not p.name.startswith(".")]
    *_, a_run, b_run = sorted(runs, key=lambda p: str(load(p / "capsule.json")["started"]))
    timed = load(a_run / "post-run-info.json")["run_time"] != load(b_run / "post-run-info.json")["run_time"]
    # two runs of a few milliseconds can take the same to the microsecond
    assert ("post.run_time" in ok_or_diff(run_capsula("diff", "latest~1", "latest", cwd=project))) == timed


def ok_or_diff(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode in (0, 1), result.stderr
    return result.stdout.decode()


def test_verify_matches_then_names_changes(project: Path) -> None:
    write_config(project, "[capture]\nenvironment-variables = ['MODE']\n[capture.files]\n\"data.txt\" = {}\n")
    env = {**os.environ, "MODE": "a"}
    ok(run_capsula("capture", cwd=project, env=env))
    assert "the environment matches" in ok(run_capsula("verify", "latest", cwd=project, env=env))
    (project / "data.txt").write_text("changed\n")
    result = run_capsula("verify", "latest", cwd=project, env={**env, "MODE": "b"})
    out = result.stdout.decode()
    assert result.returncode == 1
    assert "context.environment_variables.MODE" in out and "context.files.data.txt.file_hash" in out
    assert "uncommitted changes differ" in out
    assert not [p for p in (project / "vault").iterdir() if p.name.startswith(".rerun")]


def test_rerun_round_trip(project: Path) -> None:
    (project / "make.py").write_text(SCRIPT)  # an uncommitted change
    (project / "input.txt").write_text("untracked input\n")  # an untracked input
    first = run_capsula("monitor", "-i", "out", "python3", "make.py", cwd=project)
    assert first.stdout == b"wrote 16 chars\n"
    (project / "other.txt").write_text("unrelated\n")
    git(project, "add", "other.txt")
    git(project, "commit", "-q", "-m", "something else")
    (project / "make.py").write_text("raise SystemExit('the working tree moved on')\n")
    status_before = git(project, "status", "--porcelain")
    branches_before = git(project, "branch", "-a")

    result = run_capsula("rerun", "latest", cwd=project)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert "reproduced identically" in result.stdout.decode()
    rows = json.loads(ok(run_capsula("list", "--json", cwd=project)))
    assert rows[0]["rerun_of"] == rows[1]["name"] and rows[0]["status"] == "completed"
    assert git(project, "status", "--porcelain") == status_before and git(project, "branch", "-a") == branches_before
    assert git(project, "worktree", "list").count("\n") == 1
    assert not [p for p in (project / "vault").iterdir() if p.name.startswith(".") and p.name != ".cache"]

    # Change an input and rerun here: the difference is named.
    (project / "make.py").write_text(SCRIPT)
    (project / "input.txt").write_text("a different input\n")
    here = run_capsula("rerun", "latest~1", "--here", cwd=project)
    out = here.stdout.decode()
    assert here.returncode == 1 and "not reproduced" in out
    assert "output file output.txt" in out and "+wrote 18 chars" in out
    assert "uncommitted changes differ" in here.stderr.decode()  # what verify found first


def test_rerun_refuses_redacted_arguments(project: Path) -> None:
    ok(run_capsula("monitor", "echo", "--token", "abc", cwd=project))
    result = run_capsula("rerun", "latest", cwd=project)
    assert result.returncode == 1 and "redacted" in result.stderr.decode()
    assert len(capsules(project)) == 1


def test_rerun_of_a_capture_is_refused(project: Path) -> None:
    ok(run_capsula("capture", cwd=project))
    result = run_capsula("rerun", "latest", cwd=project)
    assert result.returncode == 1 and "only a command capsule can be rerun" in result.stderr.decode()


def test_rerun_interrupted_removes_the_worktree(project: Path, tmp_path: Path) -> None:
    slow = tmp_path / "slow"  # only the rerun sleeps
    code = f"import os, time; print('ready', flush=True); os.path.exists({str(slow)!r}) and time.sleep(30)"
    ok(run_capsula("monitor", sys.executable, "-c", code, cwd=project, timeout=60))
    slow.touch()
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "rerun", "latest"], cwd=project, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert git(project, "worktree", "list").count("\n") == 1
    assert not [p for p in (project / "vault").iterdir() if p.name.startswith(".rerun")]


def test_find_leads_from_a_result_back_to_its_run(project: Path) -> None:
    (project / "input.txt").write_text("x\n")
    write_config(
        project,
        '[monitor.item.out.files]\n"output.txt" = { hash = "sha256", copy = true }\n[capture.files]\n"input.txt" = {}\n',
    )
    ok(run_capsula("monitor", "-i", "out", "python3", "make.py", cwd=project))
    (name,) = capsules(project)
    assert ok(run_capsula("find", "output.txt", cwd=project)).split() == [name, "output", "output.txt"]
    assert ok(run_capsula("find", "input.txt", cwd=project)).split() == [name, "input", "input.txt"]
    (project / "input.txt").write_text("never recorded\n")
    assert run_capsula("find", "input.txt", cwd=project).returncode == 1


def test_capsules_of_0_0_19_are_read_as_far_as_they_go(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    for name in ("capture", "monitor-cli", "monitor-decorator"):
        shutil.copytree(REFERENCE_VAULT / name, vault / name)
    (vault / "broken").mkdir()
    (vault / "broken" / "context.json").write_text("{not json")
    rows = {r["name"]: r for r in json.loads(ok(run_capsula("list", "--vault", str(vault), "--json", cwd=tmp_path)))}
    assert rows["monitor-cli"]["kind"] == "command" and rows["monitor-cli"]["status"] == "completed"
    assert rows["monitor-decorator"]["kind"] == "function" and rows["capture"]["kind"] == "capture"
    assert rows["broken"]["status"] == "unreadable"
    for name in rows:
        shown = run_capsula("show", name, "--vault", str(vault), cwd=tmp_path)
        if name == "broken":  # refused in one line that names it; the others still show
            err = shown.stderr.decode()
            assert shown.returncode == 1 and err.count("\n") == 1 and "broken is not a readable capsule" in err
        else:
            assert shown.returncode == 0 and b"Traceback" not in shown.stderr
    out = ok_or_diff(run_capsula("diff", "monitor-cli", "monitor-decorator", "--vault", str(vault), cwd=tmp_path))
    assert "pre.function_name" in out
    assert load(vault / "monitor-cli" / "post-run-info.json")["stdout"] in out or "stdout" in out


def test_diff_and_verify_compare_installed_packages(project: Path, tmp_path: Path) -> None:
    from test_capture import fake_distribution

    old, new = tmp_path / "old", tmp_path / "new"
    fake_distribution(old, "fake-dep", "1.0")
    fake_distribution(new, "fake-dep", "2.0")
    write_config(project, "[capture]\ninclude-packages = true\n")
    ok(run_capsula("capture", cwd=project, env={**os.environ, "PYTHONPATH": str(old)}))
    ok(run_capsula("capture", cwd=project, env={**os.environ, "PYTHONPATH": str(new)}))
    out = ok_or_diff(run_capsula("diff", "latest~1", "latest", cwd=project))
    assert 'context.packages.fake-dep.version: "1.0" -> "2.0"' in out
    verified = run_capsula("verify", "latest~1", cwd=project, env={**os.environ, "PYTHONPATH": str(new)})
    assert verified.returncode == 1 and "context.packages.fake-dep.version" in verified.stdout.decode()
    same = run_capsula("verify", "latest", cwd=project, env={**os.environ, "PYTHONPATH": str(new)})
    assert same.returncode == 0, same.stdout


def test_rerun_restores_copied_inputs_environment_and_working_directory(project: Path) -> None:
    (project / ".gitignore").write_text("vault/\noutput.txt\ninputs/\n")  # the input is not in git at all
    (project / "inputs").mkdir()
    (project / "inputs" / "table.csv").write_text("a,b\n1,2\n")
    (project / "sub").mkdir()
    write_config(
        project,
        """[capture]
environment-variables = ['MODE']
[capture.files]
"inputs/table.csv" = { hash = "sha256", copy = true }
[monitor.item.out.files]
"output.txt" = { hash = "sha256", copy = true }
""",
    )
    script = "import os; print(os.getcwd().endswith('sub'), os.environ['MODE'], open('../inputs/table.csv').read())"
    env = {**os.environ, "MODE": "fast"}
    first = run_capsula("monitor", "-i", "out", sys.executable, "-c", script, cwd=project / "sub", env=env)
    assert first.stdout == b"True fast a,b\n1,2\n\n"
    (project / "inputs" / "table.csv").write_text("changed since\n")
    result = run_capsula("rerun", "latest", cwd=project, env={**os.environ, "MODE": "slow"})
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert "reproduced identically" in result.stdout.decode()
    assert (project / "inputs" / "table.csv").read_text() == "changed since\n"  # the user's copy is untouched


def test_latest_and_list_order_capsules_by_the_instant_they_started(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    started = {  # names and local clocks disagree with the instants
        "a-tokyo": "2026-03-29T10:30:00+09:00",  # 01:30 UTC
        "b-london-before-dst": "2026-03-29T00:59:00+00:00",  # 00:59 UTC
        "c-london-after-dst": "2026-03-29T02:01:00+01:00",  # 01:01 UTC
        "d-newyork": "2026-03-28T21:45:00-04:00",  # 01:45 UTC: the newest
    }
    for name, when in started.items():
        (vault / name).mkdir(parents=True)
        (vault / name / "capsule.json").write_text(
            json.dumps({"kind": "capture", "status": "completed", "started": when})
        )
    rows = json.loads(ok(run_capsula("list", "--vault", str(vault), "--json", cwd=tmp_path)))
    assert [r["name"] for r in rows] == ["d-newyork", "a-tokyo", "c-london-after-dst", "b-london-before-dst"]
    shown = ok(run_capsula("show", "latest", "--vault", str(vault), cwd=tmp_path))
    assert shown.splitlines()[0].endswith("d-newyork")


def test_a_run_elsewhere_is_running_while_its_heartbeat_lasts_then_lost(tmp_path: Path) -> None:
    import datetime

    vault = tmp_path / "vault"
    now = datetime.datetime.now(datetime.UTC)
    capsules: dict[str, dict[str, object]] = {
        "beating": {"host": "compute-17", "heartbeat": now.isoformat()},
        "silent": {"host": "compute-17", "heartbeat": (now - datetime.timedelta(minutes=10)).isoformat()},
        # here, this boot, alive pid: but the pid now names another process
        "reused-pid": {
            "host": capsula.hostname(),
            "boot_id": capsula.read_boot_id(),
            "pid": os.getpid(),
            "pid_start": 1,
        },
        "this-process": {
            "host": capsula.hostname(),
            "boot_id": capsula.read_boot_id(),
            "pid": os.getpid(),
            "pid_start": capsula.process_start(os.getpid()),
        },
    }
    for name, fields in capsules.items():
        (vault / name).mkdir(parents=True)
        manifest = {"kind": "command", "status": "running", "started": now.isoformat(), "heartbeat_seconds": 30.0}
        (vault / name / "capsule.json").write_text(json.dumps({**manifest, **fields}))
    rows = json.loads(ok(run_capsula("list", "--vault", str(vault), "--json", cwd=tmp_path)))
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"beating": "running", "silent": "lost", "reused-pid": "died", "this-process": "running"}


def test_a_running_command_beats(project: Path) -> None:
    env = {**os.environ, "CAPSULA_HEARTBEAT_SECONDS": "0.1"}
    proc = subprocess.Popen([sys.executable, str(CAPSULA), "monitor", "-q", "sleep", "1"], cwd=project, env=env)
    deadline, beats = time.monotonic() + 20, set()
    while proc.poll() is None and time.monotonic() < deadline:
        for capsule in (project / "vault").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                beats.add(json.loads((capsule / "capsule.json").read_text()).get("heartbeat"))
        time.sleep(0.05)
    assert proc.wait() == 0 and len(beats - {None}) >= 3
    (row,) = json.loads(ok(run_capsula("list", "--json", cwd=project)))
    assert row["status"] == "completed"


def test_verify_right_after_a_run_does_not_call_its_outputs_drift(repo: Path) -> None:
    write_config(repo, '[capture.files]\n"result.txt" = {}\n[monitor.item.out.files]\n"result.txt" = {}\n')
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "config")
    code = "open('result.txt', 'w').write('new result')"
    ok(run_capsula("monitor", "-q", "-i", "out", sys.executable, "-c", code, cwd=repo))
    result = run_capsula("verify", "latest", cwd=repo)  # result.txt: new, untracked, and listed as an input too
    assert result.returncode == 0 and b"matches" in result.stdout, result.stdout


def test_a_reruns_capsule_names_the_project_and_can_itself_be_rerun(repo: Path) -> None:
    code = "import pathlib; print(sorted(p.name for p in pathlib.Path('.').iterdir() if p.suffix == '.md'))"
    ok(run_capsula("monitor", "-q", sys.executable, "-c", code, cwd=repo))
    first = run_capsula("rerun", "latest", cwd=repo)
    assert first.returncode == 0 and b"reproduced identically" in first.stdout, first.stdout + first.stderr
    rows = json.loads(ok(run_capsula("list", "--json", cwd=repo)))
    rerun, original = rows[0]["name"], rows[1]["name"]
    context = load(repo / "vault" / rerun / "context.json")
    assert context["root_directory"] == str(repo) and list(context["git"]) == ["project"]
    assert load(repo / "vault" / rerun / "pre-run-info.json")["cwd"] == str(repo)
    diff = run_capsula("diff", original, rerun, "--ignore", "run_time", cwd=repo)
    # the same root, repository, sha and changes; only the branch: the rerun ran detached at the sha
    assert diff.stdout.decode().splitlines() == ['context.git.project.branch: "main" -> null'], diff.stdout
    second = run_capsula("rerun", rerun, cwd=repo)  # a rerun of a rerun
    assert second.returncode == 0 and b"reproduced identically" in second.stdout, second.stdout + second.stderr


def test_rerun_says_which_ignored_paths_the_rebuilt_tree_lacks(repo: Path) -> None:
    (repo / ".gitignore").write_text("vault/\ndata/\n__pycache__/\n")
    (repo / "data").mkdir()
    (repo / "data" / "input.csv").write_text("1,2\n")
    (repo / "__pycache__").mkdir()
    (repo / "read.py").write_text("print(open('data/input.csv').read())\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "reader")
    ok(run_capsula("monitor", "-q", sys.executable, "read.py", cwd=repo))
    rerun = run_capsula("rerun", "latest", cwd=repo)
    err = rerun.stderr.decode()
    assert "the rebuilt tree lacks what git ignores here: data/" in err and "__pycache__" not in err, err
    assert "copy = true" in err and "--here" in err
    here = run_capsula("rerun", "latest~1", "--here", cwd=repo)
    assert here.returncode == 0 and b"reproduced identically" in here.stdout, here.stdout + here.stderr


def test_a_submodule_is_recorded_with_its_own_changes_and_rebuilt_by_rerun(repo: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    git(lib, "init", "-q", "-b", "main")
    (lib / "value.txt").write_text("1\n")
    git(lib, "add", ".")
    git(lib, "commit", "-q", "-m", "lib")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "lib")
    git(repo, "commit", "-q", "-m", "with lib")
    (repo / "lib" / "value.txt").write_text("2\n")  # changed inside the submodule, not committed
    (repo / "lib" / "extra.txt").write_text("untracked in lib\n")
    code = "print(open('lib/value.txt').read().strip(), open('lib/extra.txt').read().strip())"
    ok(run_capsula("monitor", "-q", sys.executable, "-c", code, cwd=repo))
    (capsule,) = (repo / "vault").iterdir()
    sub = load(capsule / "context.json")["git"]["project"]["submodules"]["lib"]
    assert sub["sha"] == git(lib, "rev-parse", "HEAD").strip() and sub["dirty"] is True
    assert "+2" in (capsule / sub["diff_file"]).read_text() and "extra.txt" in (capsule / sub["diff_file"]).read_text()
    assert "Subproject commit" not in (capsule / "project.diff").read_text()
    shutil.rmtree(lib)  # the rebuild uses the project's own clone of it: no network, no origin needed
    rerun = run_capsula("rerun", "latest", cwd=repo)
    assert rerun.returncode == 0 and b"reproduced identically" in rerun.stdout, rerun.stdout + rerun.stderr
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1  # removed


@pytest.mark.stress
def test_diff_of_large_outputs_is_a_bounded_report_with_the_right_count(repo: Path) -> None:
    lines = "".join(f"step {i % 1000} loss 0.5\n" for i in range(600_000))  # repetitive, ~14 MB
    changed = lines.replace("step 7 loss 0.5\n", "step 7 loss 0.6\n", 100)  # 100 lines changed
    for text in (lines, changed):
        script = repo / "emit.py"
        script.write_text(f"import sys; sys.stdout.write(open({str(repo / 'text.txt')!r}).read())\n")
        (repo / "text.txt").write_text(text)
        assert run_capsula("monitor", "-q", sys.executable, str(script), cwd=repo).returncode == 0
    out = run_capsula("diff", "latest~1", "latest", "--ignore", "run_time", cwd=repo).stdout.decode()
    assert "stdout.txt: first difference at line 8;" in out
    assert "100 lines removed, 100 added" in out and len(out) < 10_000
    same = run_capsula("diff", "latest", "latest", cwd=repo)
    assert same.returncode == 0


def _hand_made(vault: Path, name: str, when: str, *, command: str = "true", status: str = "completed") -> None:
    (vault / name).mkdir(parents=True, exist_ok=True)
    manifest = {"kind": "command", "status": status, "started": when, "command": command.split(), "exit_code": 0}
    (vault / name / "capsule.json").write_text(json.dumps(manifest))


def _listing(vault: Path, cwd: Path, cache: Path) -> tuple[list[dict[str, Any]], str]:
    env = {**os.environ, "CAPSULA_CACHE_DIR": str(cache)}
    rows = json.loads(ok(run_capsula("list", "--vault", str(vault), "--json", cwd=cwd, env=env)))
    return rows, ok(run_capsula("list", "--vault", str(vault), cwd=cwd, env=env))


def test_list_shows_each_capsule_as_it_is_now_however_often_it_is_listed(tmp_path: Path) -> None:
    """What list keeps between calls (outside the vault) never shows a capsule other than it
    is: changed, deleted, added or replaced capsules show as they are, and deleting what was
    kept changes nothing."""
    vault, cache = tmp_path / "vault", tmp_path / "cache"
    for i in range(30):
        _hand_made(vault, f"run{i:02d}", f"2026-01-01T00:00:{i:02d}+00:00", command=f"python train.py --seed {i}")
    first = _listing(vault, tmp_path, cache)
    assert [r["name"] for r in first[0]] == [f"run{i:02d}" for i in reversed(range(30))]
    assert _listing(vault, tmp_path, cache) == first
    assert sorted(p.name for p in vault.iterdir()) == [f"run{i:02d}" for i in range(30)]  # capsules only

    _hand_made(vault, "run05", "2026-01-01T00:00:05+00:00", command="python train.py --seed 55", status="failed")
    shutil.rmtree(vault / "run07")
    _hand_made(vault, "run99", "2025-12-31T23:59:59+00:00", command="python prepare.py")
    rows, table = _listing(vault, tmp_path, cache)
    by_name = {r["name"]: r for r in rows}
    assert "run07" not in by_name and rows[-1]["name"] == "run99" and len(rows) == 30
    assert by_name["run05"]["status"] == "failed" and by_name["run05"]["command"] == "python train.py --seed 55"
    assert "--seed 55" in table and "--seed 5\n" not in table + "\n"
    shutil.rmtree(cache)
    assert _listing(vault, tmp_path, cache) == (rows, table)
    (tmp_path / "a-file").write_text("")
    assert _listing(vault, tmp_path, tmp_path / "a-file" / "cache") == (rows, table)  # nowhere to keep anything


def test_many_lists_between_many_runs_stay_right_and_keep_little(tmp_path: Path) -> None:
    vault, cache = tmp_path / "vault", tmp_path / "cache"
    for i in range(40):
        _hand_made(vault, f"r{i:02d}", f"2026-01-01T00:{i:02d}:00+00:00")
        rows, _ = _listing(vault, tmp_path, cache)
        assert [r["name"] for r in rows] == [f"r{j:02d}" for j in reversed(range(i + 1))]
    assert 1 <= sum(1 for _ in cache.rglob("*.seg")) <= 17  # merged as they pile up


def test_a_damaged_or_outdated_index_is_never_believed(tmp_path: Path) -> None:
    """Whatever the index's files hold (cut short, edited, another version's), list shows
    each capsule as it is, and the next merge removes another version's files."""
    vault, cache = tmp_path / "vault", tmp_path / "cache"
    for i in range(5):
        _hand_made(vault, f"r{i}", f"2026-01-01T00:00:0{i}+00:00", command=f"step {i}")
    right = _listing(vault, tmp_path, cache)
    (segment,) = cache.rglob("*.seg")
    data = segment.read_bytes()
    lines = data.split(b"\n")
    first_instant = lines[1 + 5]  # after the header and the 5 names
    for damaged in (
        data[: len(data) // 2],  # cut short
        data.replace(first_instant, b"nan".ljust(len(first_instant)), 1),  # every size as it was
        b"capsula-index 1 5,1,1,1,1,1\n" + data.split(b"\n", 1)[1],  # another version's
        b"\xff\xfe garbage\n",
    ):
        segment.write_bytes(damaged)
        assert _listing(vault, tmp_path, cache) == right, damaged[:60]
    for leftover in ("0-old.keys", "0-old.tsv"):
        (segment.parent / leftover).write_text("r1\t0\t1.2.3\n")
    for i in range(20):  # enough new segments for a merge
        _hand_made(vault, f"s{i:02d}", f"2026-01-02T00:00:{i:02d}+00:00")
        _listing(vault, tmp_path, cache)
    assert not list(cache.rglob("*.keys")) and not list(cache.rglob("*.tsv"))
    assert len(_listing(vault, tmp_path, cache)[0]) == 25


def test_show_latest_keeps_what_it_read_and_sees_new_capsules(tmp_path: Path) -> None:
    """show latest takes the vault's names to be the index's only when both have the same
    count and sum of hashes: a capsule deleted and another made in its place is seen, and
    entries that are no capsules (a file, a link, a dot-name) are never taken for one."""
    vault, cache = tmp_path / "vault", tmp_path / "cache"
    env = {**os.environ, "CAPSULA_CACHE_DIR": str(cache)}

    def latest() -> str:
        return ok(run_capsula("show", "latest", "--vault", str(vault), cwd=tmp_path, env=env)).splitlines()[0]

    for i in range(12):
        _hand_made(vault, f"r{i:02d}", f"2026-01-01T00:00:{i:02d}+00:00")
    assert latest().endswith("r11") and list(cache.rglob("*.seg"))  # kept, without a list
    shutil.rmtree(vault / "r00")  # and another in its place: the count is the same
    _hand_made(vault, "r99", "2026-01-01T00:00:59+00:00")
    assert latest().endswith("r99") and latest().endswith("r99")
    shutil.rmtree(vault / "r99")
    (vault / "a-file").write_text("not a capsule")
    (vault / "a-link").symlink_to(vault / "r11")
    _hand_made(vault, ".r99", "2026-01-01T00:00:59+00:00")
    assert latest().endswith("r11")
    _hand_made(vault, "r12", "2026-01-01T00:01:00+00:00")
    assert latest().endswith("r12")
    shutil.rmtree(vault / "r12")
    shutil.rmtree(vault / "r11")
    assert latest().endswith("r10")
    for i in range(20):  # segments pile up, and show latest merges them too
        _hand_made(vault, f"s{i:02d}", f"2026-01-02T00:00:{i:02d}+00:00")
        assert latest().endswith(f"s{i:02d}")
    assert len(list(cache.rglob("*.seg"))) <= 17
    assert [r["name"] for r in _listing(vault, tmp_path, cache)[0]][:2] == ["s19", "s18"]


def test_find_names_every_capsule_that_recorded_the_content(repo: Path) -> None:
    write_config(repo, '[monitor.item.out.files]\n"out\\u001b[2J.txt" = { hash = "md5" }\n')
    for text in ("one\n", "two\n", "one\n"):
        code = f"open('out\x1b[2J.txt', 'w').write({text!r})"
        ok(run_capsula("monitor", "-q", "-i", "out", sys.executable, "-c", code, cwd=repo))
        ok(run_capsula("list", cwd=repo))  # the ones before are then read from the index
    first, _, third = (r["name"] for r in reversed(json.loads(ok(run_capsula("list", "--json", cwd=repo)))))
    (repo / "query.txt").write_text("one\n")
    hits = ok(run_capsula("find", "query.txt", cwd=repo)).splitlines()
    assert hits == [f"{third}  output  out?[2J.txt", f"{first}  output  out?[2J.txt"]  # newest first
    (repo / "query.txt").write_text("three\n")
    missing = run_capsula("find", "query.txt", cwd=repo)
    assert missing.returncode == 1 and b"no capsule recorded" in missing.stderr


def test_find_and_latest_believe_no_row_that_is_edited_stale_or_doubled(tmp_path: Path) -> None:
    """find and show latest answer as if the index were not there, whatever its files hold: a
    row edited within the sizes it was written with, a row of a capsule changed since, a
    capsule indexed twice; and as segments pile up, find merges them too."""
    import hashlib

    vault, cache, result = tmp_path / "vault", tmp_path / "cache", tmp_path / "result.txt"
    result.write_text("a result\n")
    digest = hashlib.sha256(result.read_bytes()).hexdigest()
    env = {**os.environ, "CAPSULA_CACHE_DIR": str(cache)}

    def made(name: str, second: int, *, records: bool) -> None:
        _hand_made(vault, name, f"2026-01-01T00:00:{second:02d}+00:00")
        entry = {"hash_algorithm": "sha256", "file_hash": digest if records else "0" * 64}
        (vault / name / "post-run-info.json").write_text(json.dumps({"files": {"result.txt": entry}}))

    def find() -> list[str]:
        out = run_capsula("find", str(result), "--vault", str(vault), cwd=tmp_path, env=env).stdout.decode()
        return [line.split()[0] for line in out.splitlines()]

    def latest() -> str:
        return ok(run_capsula("show", "latest", "--vault", str(vault), cwd=tmp_path, env=env)).split()[1]

    for i in range(6):
        made(f"r{i}", i, records=i % 2 == 0)
    assert find() == ["r4", "r2", "r0"] and latest().endswith("r5")
    assert find() == ["r4", "r2", "r0"] and latest().endswith("r5")  # now from the index
    (segment,) = cache.rglob("*.seg")
    data = segment.read_bytes()
    assert data.count(b"0" * 64) == 3 and data.count(b"1767225605.0") == 1
    for edited in (
        data.replace(b"0" * 64, digest.encode(), 1),  # r3 or r1 would record the result
        data.replace(b"1767225605.0", b"1067225605.0"),  # r5 would be the oldest
    ):
        segment.write_bytes(edited)
        assert find() == ["r4", "r2", "r0"] and latest().endswith("r5")
        for extra in set(cache.rglob("*.seg")) - {segment}:
            extra.unlink()  # what the read afresh left
    segment.write_bytes(data)
    made("r1", 1, records=True)  # changed since it was indexed
    made("r0", 0, records=False)
    assert find() == ["r4", "r2", "r1"]
    shutil.copy(segment, segment.with_name("0" + segment.name))  # indexed twice
    assert find() == ["r4", "r2", "r1"] and latest().endswith("r5")
    for i in range(6, 26):  # a segment each: merged as they pile up
        made(f"r{i}", i, records=True)
        assert find() == [f"r{j}" for j in reversed(range(6, i + 1))] + ["r4", "r2", "r1"]
    assert len(list(cache.rglob("*.seg"))) <= 17
    assert [r["name"] for r in _listing(vault, tmp_path, cache)[0]][:2] == ["r25", "r24"]


def test_signatures_stat_ed_in_two_processes_are_each_capsules_own(tmp_path: Path, monkeypatch: Any) -> None:
    """list and find stat each capsule.json in two processes where they may (no other
    thread, more than one CPU): every capsule gets its own signature, once, whether they
    fork or not, and when the child dies before its half, that half is stat'ed at home."""
    import threading

    vault = tmp_path / "vault"
    for i in range(300):
        _hand_made(vault, f"r{i:03d}", f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00")
    names = sorted(p.name for p in vault.iterdir())
    stats = {n: (vault / n / "capsule.json").lstat() for n in names}
    expected = sorted((n, f"{s.st_ino}.{s.st_size}.{s.st_mtime_ns}") for n, s in stats.items())
    assert sorted(capsula._signed(vault, lambda: names)) == expected
    assert sorted(capsula._signed(vault, lambda: capsula._vault_names(vault))) == expected
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()  # another thread: no fork
    try:
        assert sorted(capsula._signed(vault, lambda: names)) == expected
    finally:
        stop.set()
        other.join()
    parent, real = os.getpid(), capsula._signatures

    def dying(vault: Path, names: Any) -> Any:
        if os.getpid() != parent:
            os._exit(3)
        return real(vault, names)

    monkeypatch.setattr(capsula, "_signatures", dying)
    assert sorted(capsula._signed(vault, lambda: names)) == expected
    assert sorted(capsula.list_capsules(vault, None)["name"]) == names


def test_lists_and_runs_at_once_from_many_processes(project: Path) -> None:
    """Processes that run and list at once share what list keeps without a lock: every
    capsule is listed, each once."""
    code = (
        "import subprocess, sys\n"
        "for _ in range(5):\n"
        f"    subprocess.run([sys.executable, {str(CAPSULA)!r}, 'monitor', '-q', 'true'], check=True)\n"
        f"    subprocess.run([sys.executable, {str(CAPSULA)!r}, 'list'], check=True, stdout=subprocess.DEVNULL)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=project) for _ in range(6)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    names = capsules(project)
    assert len(names) == len(set(names)) == 30 == len(list((project / "vault").iterdir()))
    assert {r["status"] for r in json.loads(ok(run_capsula("list", "--json", cwd=project)))} == {"completed"}


def test_latest_n_follows_the_list_order_also_for_capsules_changed_since(tmp_path: Path) -> None:
    vault, cache = tmp_path / "vault", tmp_path / "cache"
    env = {**os.environ, "CAPSULA_CACHE_DIR": str(cache)}
    for i in range(10):
        _hand_made(vault, f"r{i}", f"2026-01-01T00:00:0{i}+00:00")
    _listing(vault, tmp_path, cache)
    _hand_made(vault, "r2", "2026-02-01T00:00:00+00:00")  # now the newest
    order = [r["name"] for r in _listing(vault, tmp_path, cache)[0]]
    for n in range(4):
        shown = ok(run_capsula("show", f"latest~{n}", "--vault", str(vault), cwd=tmp_path, env=env))
        assert shown.splitlines()[0].endswith(order[n])


def test_a_capsules_text_cannot_drive_the_terminal(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    _hand_made(vault, "evil", "2026-01-01T00:00:00+00:00", command="echo \x1b]0;owned\x07\x1b[2J")
    table = ok(run_capsula("list", "--vault", str(vault), cwd=tmp_path))
    assert "\x1b" not in table and "\x07" not in table and "echo ?]0;owned??[2J" in table


def _rewrite_history_and_gc(repo: Path) -> None:
    """What a rebase or a squash does to a recorded commit: nothing reaches it any more, and
    git gc deletes it."""
    git(repo, "commit", "-q", "--amend", "-m", "squashed")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")


def _run_and_rewrite(repo: Path, config: str) -> tuple[str, str]:
    write_config(repo, config)
    (repo / ".gitignore").write_text("vault/\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "config")
    ok(run_capsula("monitor", "-q", sys.executable, "-c", "print(open('data.txt').read())", cwd=repo))
    (capsule,) = (repo / "vault").iterdir()
    sha = load(capsule / "context.json")["git"]["project"]["sha"]
    _rewrite_history_and_gc(repo)
    return capsule.name, sha


def test_keep_commits_keeps_a_recorded_commit_through_a_rewrite_and_gc(repo: Path) -> None:
    name, sha = _run_and_rewrite(repo, "[capture.git]\nkeep-commits = true\n")
    assert git(repo, "rev-parse", f"refs/capsula/{name}").strip() == sha
    assert git(repo, "cat-file", "-t", sha).strip() == "commit"
    rerun = run_capsula("rerun", "latest~0", cwd=repo)
    assert rerun.returncode == 0 and b"reproduced identically" in rerun.stdout, rerun.stderr


def test_a_bundle_in_the_capsule_brings_back_a_deleted_commit(repo: Path) -> None:
    name, sha = _run_and_rewrite(repo, "[capture.git]\nbundle = true\n")
    assert not git(repo, "for-each-ref", "refs/capsula/").strip()  # only the bundle keeps it
    assert subprocess.run(["git", "cat-file", "-e", sha], cwd=repo).returncode != 0  # gone from the repository
    context = load(repo / "vault" / name / "context.json")["git"]["project"]
    assert context["bundle"] == "project.bundle" and "kept_as" not in context
    rerun = run_capsula("rerun", name, cwd=repo)
    assert rerun.returncode == 0 and b"reproduced identically" in rerun.stdout, rerun.stderr


def test_a_commit_gone_without_keep_commits_is_named_with_the_setting(repo: Path) -> None:
    name, sha = _run_and_rewrite(repo, "[capture]\ninclude-cpu = false\n")
    rerun = run_capsula("rerun", name, cwd=repo)
    said = rerun.stderr.decode()
    assert rerun.returncode != 0 and f"commit {sha[:12]} is gone" in said and "keep-commits = true" in said
    assert "Traceback" not in said and len(said.strip().splitlines()) == 1


def test_a_kept_commit_is_never_moved_by_a_capsule_of_the_same_name(repo: Path) -> None:
    write_config(repo, "[capture]\ncapsule-template = 'run'\n[capture.git]\nkeep-commits = true\n")
    first = load(Path(ok(run_capsula("capture", cwd=repo)).strip()) / "context.json")["git"]["project"]
    shutil.rmtree(repo / "vault")  # another vault, or this one emptied: the same name again
    (repo / "data.txt").write_text("changed\n")
    git(repo, "commit", "-qam", "next")
    second = load(Path(ok(run_capsula("capture", cwd=repo)).strip()) / "context.json")["git"]["project"]
    assert first["kept_as"] == "refs/capsula/run" and git(repo, "rev-parse", "refs/capsula/run").strip() == first["sha"]
    assert second["kept_as"] == f"refs/capsula/run-{second['sha'][:12]}" != first["kept_as"]
