"""Shared fixtures: real git repositories and real `capsula` processes in tmp_path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CAPSULA = REPO / "capsula.py"
# Real output of Capsula 0.0.19 (its capsula.toml and three capsules), kept with the tests so
# that a clone of the repository alone runs every comparison with it.
REFERENCE_VAULT = Path(__file__).resolve().parent / "fixtures" / "capsula-0.0.19-vault"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def _shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("capsula-cache")


@pytest.fixture(autouse=True)
def _one_cache_for_the_session(monkeypatch: pytest.MonkeyPatch, _shared_cache: Path) -> None:
    """CPU facts are recorded by default (as in 0.0.19) and cost py-cpuinfo's one-second
    probe once per cache: one cache for the whole run, as CAPSULA_CACHE_DIR lets a user share."""
    monkeypatch.setenv("CAPSULA_CACHE_DIR", str(_shared_cache))


@pytest.fixture(autouse=True)
def _git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits work on a fresh machine with no git config."""
    for key, value in {
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }.items():
        monkeypatch.setenv(key, value)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _descendants(pid: int) -> list[int]:
    """The live (not zombie) processes below pid, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if state != "Z":
                parents[int(entry)] = int(ppid)
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test() -> Iterator[None]:
    """Every process a test starts has ended when it ends (checked where /proc exists)."""
    yield
    if not os.path.isdir("/proc/self"):
        return
    deadline = time.monotonic() + 5
    while (left := _descendants(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"the test left processes running: {left}"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A project with one commit and no config."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "README.md").write_text("# project\n")
    (root / "data.txt").write_text("input data\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    return root


@pytest.fixture
def other_fs_vault(tmp_path: Path) -> Iterator[Path]:
    """A vault directory on another filesystem than tmp_path (tmpfs), removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem")
    vault = Path(os.path.realpath(shm)) / f"capsula-test-{os.getpid()}-{tmp_path.name}"
    yield vault
    shutil.rmtree(vault, ignore_errors=True)


def write_config(root: Path, text: str) -> Path:
    path = root / "capsula.toml"
    path.write_text(text)
    return path


def run_capsula(
    *args: str, cwd: Path, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(CAPSULA), *args], cwd=cwd, capture_output=True, env=env, **kw)


def only_capsule(vault: Path) -> Path:
    capsules = [p for p in vault.iterdir() if not p.name.startswith(".")]
    assert len(capsules) == 1, capsules
    return capsules[0]


def load(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture
def capsula_main() -> Callable[..., int]:
    import capsula

    return capsula.main
