"""@capsula.monitor: one capsule per call, args and results recorded, the caller unchanged."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REFERENCE_VAULT, REPO, git, load, write_config

import capsula


def capsules(root: Path) -> list[Path]:
    return sorted((p for p in (root / "vault").iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def test_keys_of_0_0_19_and_the_return_value(repo: Path) -> None:
    @capsula.monitor(repo, include_return_value=True)
    def calc(n: int, seed: int = 42, *, fail: bool = False) -> float:
        return n / 2

    assert calc(10, fail=False) == 5.0
    (capsule,) = capsules(repo)
    pre, post = load(capsule / "pre-run-info.json"), load(capsule / "post-run-info.json")
    for ours, name in ((pre, "pre-run-info.json"), (post, "post-run-info.json")):
        assert set(load(REFERENCE_VAULT / "monitor-decorator" / name)) <= set(ours)
    assert pre["args"] == [10] and pre["kwargs"] == {"fail": False} and pre["function_name"] == "calc"
    assert pre["source_file"] == __file__ and isinstance(pre["source_line"], int)
    assert post["return_value"] == 5.0 and post["exception_info"] is None and post["status"] == "completed"
    assert (capsule / "context.json").exists()


def test_0_0_19_keyword_form(repo: Path) -> None:
    @capsula.monitor(directory=repo, include_return_value=True, items=())
    def calc_pi(n: int) -> float:
        return 3.0

    assert calc_pi(1) == 3.0 and load(capsules(repo)[0] / "post-run-info.json")["return_value"] == 3.0


def test_return_value_is_not_written_unless_asked(repo: Path) -> None:
    @capsula.monitor(repo)
    def secret() -> str:
        return "do-not-store"

    assert secret() == "do-not-store"
    (capsule,) = capsules(repo)
    assert "do-not-store" not in (capsule / "post-run-info.json").read_text()


def test_exception_reaches_the_caller_and_is_recorded(repo: Path) -> None:
    error = ValueError("bad input")

    @capsula.monitor(repo)
    def boom() -> None:
        raise error

    with pytest.raises(ValueError) as info:
        boom()
    assert info.value is error
    post = load(capsules(repo)[0] / "post-run-info.json")
    assert post["exception_info"]["error_type"] == "ValueError"
    assert (
        post["exception_info"]["error_message"] == "bad input"
        and "raise error" in post["exception_info"]["error_details"]
    )
    assert post["status"] == "failed"


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(4)])
def test_keyboard_interrupt_and_system_exit_are_recorded_and_reraised(repo: Path, exc: BaseException) -> None:
    @capsula.monitor(repo)
    def stop() -> None:
        raise exc

    with pytest.raises(type(exc)):
        stop()
    post = load(capsules(repo)[0] / "post-run-info.json")
    assert post["exception_info"]["error_type"] == type(exc).__name__
    assert post["status"] == ("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")


def test_unserialisable_arguments_are_recorded_by_repr(repo: Path) -> None:
    class Weird:
        def __repr__(self) -> str:
            return "Weird()"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    loop: list[Any] = [1]
    loop.append(loop)

    @capsula.monitor(repo, include_return_value=True)
    def f(*args: Any, **kwargs: Any) -> Any:
        return Weird()

    assert isinstance(f(Weird(), {1, 2}, loop, b"\xff", Broken(), float("nan"), where=Path("/x")), Weird)
    pre = load(capsules(repo)[0] / "pre-run-info.json")
    post = load(capsules(repo)[0] / "post-run-info.json")
    assert pre["args"][0] == "Weird()" and pre["args"][1] == "{1, 2}" and pre["args"][3] == "b'\\xff'"
    assert pre["args"][2] == [1, "<recursive reference>"] and "repr() raised RuntimeError" in pre["args"][4]
    assert pre["args"][5] == "nan" and pre["kwargs"] == {"where": "/x"} and post["return_value"] == "Weird()"


def test_many_calls_in_one_second_each_get_a_capsule(repo: Path) -> None:
    write_config(repo, "[capture]\ncapsule-template = 'run'\n")

    @capsula.monitor(repo)
    def f(i: int) -> int:
        return i

    assert [f(i) for i in range(5)] == list(range(5))
    assert len(capsules(repo)) == 5


NESTED_SCRIPT = '''
@capsula.monitor
def inner():
    """Inner doc."""
    return str(capsula.get_capsule_dir())

@capsula.monitor()
def outer():
    before = str(capsula.get_capsule_dir())
    inside = inner()
    after = str(capsula.get_capsule_dir())
    return before, inside, after

before, inside, after = outer()
assert before == after != inside, (before, inside, after)
assert inner.__name__ == "inner" and inner.__doc__ == "Inner doc." and hasattr(inner, "__wrapped__")
print(before, inside)
'''


def test_bare_decorator_wraps_and_nested_calls_get_separate_capsules(repo: Path) -> None:
    script = repo / "nested.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r}); import capsula\n" + NESTED_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True)
    assert result.returncode == 0, result.stderr
    assert {str(p) for p in capsules(repo)} == set(result.stdout.decode().split())


def test_items_of_a_decorated_function(repo: Path) -> None:
    write_config(repo, '[monitor.item.res.files]\n"res.txt" = { hash = "sha256", copy = true }\n')

    @capsula.monitor(repo, items=("res",))
    def make() -> None:
        (repo / "res.txt").write_text("result\n")

    make()
    capsule = capsules(repo)[0]
    assert load(capsule / "post-run-info.json")["files"]["res.txt"]["file_hash"]
    assert (capsule / "res.txt").read_text() == "result\n"


def test_config_errors_raise_when_decorating(repo: Path) -> None:
    write_config(repo, "[capture]\ninclude-cpu = 'no'\n")
    with pytest.raises(capsula.ConfigError, match="include-cpu"):
        capsula.monitor(repo)(lambda: None)
    write_config(repo, "")
    with pytest.raises(capsula.ConfigError, match="unknown item 'missing'"):
        capsula.monitor(repo, items=("missing",))(lambda: None)


def test_root_found_from_the_source_file_whatever_the_cwd(repo: Path, tmp_path: Path) -> None:
    write_config(repo, "[capture]\nvault-directory = 'runs'\n")
    (repo / "scripts").mkdir()
    script = repo / "scripts" / "job.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import capsula\n"
        "@capsula.monitor(include_return_value=True)\ndef job(): return 7\nprint(job())\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, str(script)], cwd=elsewhere, capture_output=True, env={**os.environ})
    assert result.stdout == b"7\n", result.stderr
    (capsule,) = [p for p in (repo / "runs").iterdir() if not p.name.startswith(".")]
    assert load(capsule / "post-run-info.json")["return_value"] == 7


def test_the_decorator_example_runs_from_any_directory(tmp_path: Path) -> None:
    project = tmp_path / "checkout"
    (project / "examples").mkdir(parents=True)
    for rel in ("capsula.py", "capsula.toml", "pyproject.toml", "examples/calc_pi_dec.py"):
        shutil.copy(REPO / rel, project / rel)
    git(project, "init", "-q")
    result = subprocess.run(
        [sys.executable, str(project / "examples" / "calc_pi_dec.py")], capture_output=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "3.13728"
    (capsule,) = [p for p in (project / "vault").iterdir() if not p.name.startswith(".")]
    assert load(capsule / "post-run-info.json")["return_value"] == 3.13728
    assert (capsule / "examples" / "pi_dec.txt").read_text() == "3.13728\n"
    assert (capsule / "requirements.txt").exists()  # the pre-capture command's output, moved in


def test_calls_running_at_once_each_beat_and_end_with_their_own_record(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import threading
    import time

    monkeypatch.setenv("CAPSULA_HEARTBEAT_SECONDS", "0.05")
    beats: dict[str, set[str]] = {"short": set(), "long": set()}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for capsule in (repo / "vault").glob("*"):
                try:
                    manifest = json.loads((capsule / "capsule.json").read_text())
                except (OSError, ValueError):
                    continue
                if manifest.get("heartbeat") and manifest.get("function", "").endswith(("short", "long")):
                    beats[manifest["function"].rsplit(".", 1)[1]].add(manifest["heartbeat"])
            time.sleep(0.01)

    @capsula.monitor(repo)
    def short() -> None:
        time.sleep(0.4)

    @capsula.monitor(repo)
    def long() -> None:
        time.sleep(0.8)

    watcher = threading.Thread(target=watch)
    watcher.start()
    runs = [threading.Thread(target=f) for f in (short, long)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    time.sleep(0.2)  # a beat after a call ended would land here
    done.set()
    watcher.join()
    assert len(beats["short"]) >= 3 and len(beats["long"]) >= 6, beats
    for capsule in capsules(repo):
        manifest = load(capsule / "capsule.json")
        assert manifest["status"] == "completed" and manifest["heartbeat_seconds"] == 0.05


def test_a_call_after_idle_calls_still_beats_at_its_own_interval(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat thread, idle after calls with the default 30 s beat, sleeps for up to
    30 s: a later call with a shorter beat must wake it, and beat from its first interval on."""
    import json
    import time

    @capsula.monitor(repo)
    def quick() -> None:
        pass

    quick()
    quick()
    monkeypatch.setenv("CAPSULA_HEARTBEAT_SECONDS", "0.05")
    seen: set[str] = set()

    @capsula.monitor(repo)
    def slow() -> None:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError):
                seen.add(json.loads((capsula.get_capsule_dir() / "capsule.json").read_text())["heartbeat"])
            time.sleep(0.01)

    slow()
    assert len(seen) >= 4, seen  # the first beat (at the start), then one every 0.05 s


@pytest.fixture
def git_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """git as it is, on PATH behind a script that writes down each call."""
    log, bin_dir = tmp_path / "git-calls.log", tmp_path / "bin"
    bin_dir.mkdir()
    spy = bin_dir / "git"
    spy.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\nexec "{shutil.which("git")}" "$@"\n')
    spy.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log.touch()
    return log


def test_later_calls_in_a_clean_tree_run_no_git_and_still_see_every_change(
    repo: Path, git_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    monkeypatch.setattr(capsula, "RACY", 0.1)  # as the test waits for entries to age
    (repo / ".gitignore").write_text("vault/\n")
    (repo / "tools").mkdir()
    (repo / "tools" / "run.sh").write_text("echo run\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "ignore the vault")
    (repo / "empty").mkdir()  # git lists no empty directory, but walks it
    (repo / "scratch").mkdir()
    (repo / "scratch" / ".gitignore").write_text("*\n")  # ignores itself, as Capsula's cache does
    (repo / "scratch" / "big.bin").write_text("x")
    (repo / "debug.log").write_text("log\n")
    with (repo / ".git" / "info" / "exclude").open("a") as exclude:
        exclude.write("*.log\n")

    @capsula.monitor(repo)
    def step() -> None:
        pass

    def record() -> dict[str, Any]:
        before = set(capsules(repo)) if (repo / "vault").exists() else set()
        step()
        (made,) = set(capsules(repo)) - before
        entry: dict[str, Any] = load(made / "context.json")["git"]["project"]
        return entry | {"capsule": made}

    def settled() -> None:
        """A clean tree, aged and watched: the next call asks git nothing."""
        assert record()["dirty"] is False  # the first call makes the vault: the root changes
        time.sleep(0.15)
        for _ in range(2):  # one watches the tree, the next finds it unchanged and trusts it
            assert record()["dirty"] is False
        calls = git_log.read_text()
        assert record()["dirty"] is False
        assert git_log.read_text() == calls, "a call in an unchanged clean tree ran git"

    def make_nested() -> None:
        (repo / "a" / "b").mkdir(parents=True)
        (repo / "a" / "b" / "c.txt").write_text("c")

    changes: dict[str, tuple[Callable[[], object], Callable[[dict[str, Any]], bool], Callable[[], object]]] = {
        "a file in a directory git lists nothing in": (
            lambda: (repo / "empty" / "new.txt").write_text("new\n"),
            lambda g: g["untracked"] == ["empty/new.txt"],
            lambda: (repo / "empty" / "new.txt").unlink(),
        ),
        "a new directory with a file": (
            make_nested,
            lambda g: g["untracked"] == ["a/b/c.txt"],
            lambda: shutil.rmtree(repo / "a"),
        ),
        "a tracked file edited": (
            lambda: (repo / "data.txt").write_text("input data\n"),  # same text, written again
            lambda g: g["dirty"] is False,
            lambda: None,
        ),
        "a tracked file changed": (
            lambda: (repo / "data.txt").write_text("other data\n"),
            lambda g: g["dirty"] is True and "+other data" in (g["capsule"] / "project.diff").read_text(),
            lambda: git(repo, "checkout", "data.txt"),
        ),
        "a tracked file made executable": (
            lambda: (repo / "tools" / "run.sh").chmod(0o755),
            lambda g: g["dirty"] is True,
            lambda: (repo / "tools" / "run.sh").chmod(0o644),
        ),
        "an untracked .gitignore that stops ignoring": (
            lambda: (repo / "scratch" / ".gitignore").write_text(".gitignore\n"),
            lambda g: g["untracked"] == ["scratch/big.bin"],
            lambda: (repo / "scratch" / ".gitignore").write_text("*\n"),
        ),
        "the repository's exclude file edited": (
            lambda: (repo / ".git" / "info" / "exclude").write_text("# nothing\n"),
            lambda g: g["untracked"] == ["debug.log"],
            lambda: (repo / ".git" / "info" / "exclude").write_text("*.log\n"),
        ),
        "a commit": (
            lambda: ((repo / "data.txt").write_text("v2\n"), git(repo, "commit", "-qam", "v2")),
            lambda g: g["dirty"] is False and g["sha"] == git(repo, "rev-parse", "HEAD").strip(),
            lambda: None,
        ),
        "another branch": (
            lambda: git(repo, "checkout", "-qb", "other"),
            lambda g: g["branch"] == "other",
            lambda: None,
        ),
    }
    for what, (change, seen, undo) in changes.items():
        settled()
        change()
        assert seen(record()), what
        undo()
