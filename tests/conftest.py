"""Shared fixtures: real git repositories and real `capsula` processes in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CAPSULA = REPO / "capsula.py"
sys.path.insert(0, str(REPO))


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
