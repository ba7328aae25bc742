"""The single-file contract and the command-line front end."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CAPSULA, REPO, git, load, only_capsule, run_capsula

import capsula


def test_every_top_level_import_is_standard_library() -> None:
    tree = ast.parse(CAPSULA.read_text())
    modules = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    assert modules - {"__future__"} <= set(sys.stdlib_module_names)


def test_a_copy_of_the_file_alone_runs_isolated(tmp_path: Path) -> None:
    project = tmp_path / "vendored"
    project.mkdir()
    shutil.copy(CAPSULA, project / "capsula.py")
    git(project, "init", "-q")
    (project / "capsula.toml").write_text("[capture]\nenvironment-variables = ['HOME']\n")
    result = subprocess.run([sys.executable, "-I", "capsula.py", "capture"], cwd=project, capture_output=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.decode().strip()).parent == project / "vault"
    monitored = subprocess.run(
        [sys.executable, "-I", "capsula.py", "monitor", "echo", "hi"], cwd=project, capture_output=True
    )
    assert monitored.stdout == b"hi\n" and monitored.returncode == 0


def test_python_dash_m_behaves_like_the_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "capsula", "--version"], cwd=REPO, capture_output=True)
    assert result.stdout.decode().strip() == f"capsula {capsula.__version__}"
    captured = subprocess.run(
        [sys.executable, "-m", "capsula", "capture", "-C", str(tmp_path)], cwd=REPO, capture_output=True
    )
    assert captured.returncode == 0 and Path(captured.stdout.decode().strip()).parent == tmp_path / "vault"


def test_main_returns_exit_codes_without_exiting(tmp_path: Path, capsys: object) -> None:
    assert capsula.main(["capture", "-C", str(tmp_path)]) == 0
    assert only_capsule(tmp_path / "vault").is_dir()
    (tmp_path / "capsula.toml").write_text("[capture]\nbad = 1\n")
    assert capsula.main(["capture", "-C", str(tmp_path)]) == 2


def test_version_is_a_literal_for_flit() -> None:
    tree = ast.parse(CAPSULA.read_text())
    assigns = [n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__version__"]
    assert len(assigns) == 1 and isinstance(assigns[0].value, ast.Constant)


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "x.py", "-n", "3", "--out", "y"],
        ["--", "python", "-i", "x"],
        ["-i", "a", "--item", "b", "--item=c", "-q", "cmd", "-q"],
        ["-C", "some/dir", "--directory=other", "cmd"],
        ["--quiet", "--", "--weird-command"],
        ["-l", "debug", "-q", "-C", "d", "python", "x.py", "-C", "3", "-l", "x"],
    ],
)
def test_monitor_fast_path_parses_like_argparse(argv: list[str]) -> None:
    fast = capsula._monitor_args(argv)
    slow = capsula._build_parser("monitor").parse_args(argv)
    assert fast is not None
    keys = ("directory", "item", "quiet", "command", "log_level")
    assert [getattr(fast, k, None) for k in keys] == [getattr(slow, k, None) for k in keys]


@pytest.mark.parametrize("argv", [["-h"], ["-iname", "cmd"], ["--bogus", "cmd"], ["-i"], []])
def test_monitor_fast_path_leaves_the_unusual_to_argparse(argv: list[str]) -> None:
    assert capsula._monitor_args(argv) is None


def _closed_pipe_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run capsula with stdout a pipe whose reader has already gone (`| head` that is done)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, str(CAPSULA), *args], cwd=cwd, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)


def test_a_closed_or_full_stdout_is_no_traceback(repo: Path) -> None:
    for _ in range(2):
        assert run_capsula("monitor", "-q", "echo", "x", cwd=repo).returncode == 0
    for args in (["list"], ["show", "latest"], ["diff", "latest", "latest~1"], ["list", "--json"]):
        result = _closed_pipe_run(args, repo)
        assert result.returncode == 141 and result.stderr == b"", (args, result.stderr)
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, str(CAPSULA), "list"], cwd=repo, stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 1
    assert result.stderr.decode() == "capsula: error: cannot write the output: No space left on device\n"


def test_monitor_ends_as_the_bare_pipeline_when_its_reader_goes(repo: Path) -> None:
    script = f'"{sys.executable}" "{CAPSULA}" monitor -q -- yes | head -1; echo "${{PIPESTATUS[@]}}"'
    result = subprocess.run(["bash", "-c", script], cwd=repo, capture_output=True, timeout=30)
    bare = subprocess.run(["bash", "-c", 'yes | head -1; echo "${PIPESTATUS[@]}"'], capture_output=True)
    assert result.stdout == bare.stdout == b"y\n141 0\n"
    (capsule,) = (repo / "vault").iterdir()
    post = load(capsule / "post-run-info.json")
    assert post["signal"] == "SIGPIPE" and post["stdout_closed_by_reader"] is True
    assert (capsule / "stdout.txt").stat().st_size == post["stdout_bytes"] > 0
