"""A Capsula 0.0.19 user switches without changing a line: each point is the 0.0.19
invocation or file, and what it must give. The capsules replayed here were written by
Capsula 0.0.19 itself (tests/fixtures/make_0019_capsules.py) on a sample project that
tests/fixtures/sample_0019.py rebuilds commit for commit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CAPSULA, REFERENCE_VAULT, load, run_capsula, write_config

import capsula

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPLAY = FIXTURES / "capsula-0.0.19-replay"
sys.path.insert(0, str(FIXTURES))
from sample_0019 import make_sample  # noqa: E402


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """The sample project as it was when 0.0.19 recorded it, with its capsules in the vault."""
    root = tmp_path / "sample"
    assert make_sample(root) == (REPLAY / "SHA").read_text().strip()
    for name in ("capture", "monitor"):
        shutil.copytree(REPLAY / name, root / "vault" / name)
    return root


@pytest.mark.parametrize(
    "argv",
    [
        ["--directory", "{root}", "capture"],
        ["-C", "{root}", "capture"],
        ["-C", "{root}", "-l", "debug", "capture"],
        ["--log-level=WARNING", "capture", "-C", "{root}"],
        ["capture", "--directory={root}"],
    ],
)
def test_global_options_come_before_or_after_the_command(repo: Path, tmp_path: Path, argv: list[str]) -> None:
    args = [a.replace("{root}", str(repo)) for a in argv]
    result = run_capsula(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.decode().strip()).parent == repo / "vault"


def test_options_after_the_monitored_command_are_the_commands(repo: Path, tmp_path: Path) -> None:
    code = "import sys; print(sys.argv[1:])"
    result = run_capsula("-C", str(repo), "monitor", sys.executable, "-c", code, "-C", "3", "-l", "x", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == b"['-C', '3', '-l', 'x']\n"


def test_log_level_says_what_ran_what_was_stored_and_where(repo: Path) -> None:
    write_config(repo, "[capture]\npre-capture-commands = ['true']\n[capture.files]\n'data.txt' = {copy = true}\n")
    info = run_capsula("-l", "info", "capture", cwd=repo).stderr.decode()
    assert "pre-capture command 'true' ended with exit code 0" in info
    assert "stored data.txt: copied, sha256 " in info and "capsule " in info
    assert run_capsula("-l", "WARNING", "capture", cwd=repo).stderr == b""
    bad = run_capsula("-l", "loud", "capture", cwd=repo)
    assert bad.returncode == 2 and b"unknown log level 'loud'" in bad.stderr and bad.stderr.count(b"\n") == 1


def test_include_cpu_defaults_to_true_as_in_0_0_19(repo: Path) -> None:
    capsule = Path(run_capsula("capture", cwd=repo).stdout.decode().strip())
    cpu = load(capsule / "context.json")["cpu"]
    assert isinstance(cpu, dict) and cpu.get("arch") and "hz_actual" in cpu


def test_users_find_their_capsule_by_iterating_the_vault(repo: Path) -> None:
    assert run_capsula("monitor", "true", cwd=repo).returncode == 0
    capsule = next((repo / "vault").iterdir())  # as 0.0.19's own tests do
    assert (capsule / "context.json").is_file() and (capsule / "post-run-info.json").is_file()


def test_errors_have_0_0_19s_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="include-cpu"):  # 0.0.19 raised pydantic's ValidationError
        capsula.parse_config({"capture": {"include-cpu": "yes"}}, root=tmp_path, source=None)
    monkeypatch.delenv("CAPSULE_DIR", raising=False)
    with pytest.raises(RuntimeError, match="outside a monitored run"):
        capsula.get_capsule_dir()


def test_the_capsule_name_is_in_the_commands_environment(repo: Path) -> None:
    code = "import os, capsula; print(os.environ['CAPSULA_CAPSULE_NAME'], capsula.get_capsule_name())"
    env = {**os.environ, "PYTHONPATH": str(CAPSULA.parent)}
    result = run_capsula("monitor", "-q", sys.executable, "-c", code, cwd=repo, env=env)
    (capsule,) = (repo / "vault").iterdir()
    assert result.stdout.decode().split() == [capsule.name, capsule.name]

    @capsula.monitor(repo)
    def name() -> str:
        return capsula.get_capsule_name()

    assert (repo / "vault" / name()).is_dir()


def test_a_0_0_19_capsule_replays_and_reproduces(sample: Path) -> None:
    assert not (REPLAY / "monitor" / "sample.diff").read_bytes().endswith(b"\n")  # as 0.0.19 wrote it
    env = {**os.environ, "SAMPLE_MODE": "fast"}
    result = run_capsula("rerun", "monitor", cwd=sample, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"reproduced identically" in result.stdout


def test_verify_of_a_0_0_19_capsule_reports_no_change_that_is_not_there(sample: Path) -> None:
    env = {**os.environ, "SAMPLE_MODE": "fast", "GITHUB_TOKEN": "another-token-than-0019-saw"}
    result = run_capsula("verify", "monitor", cwd=sample, env=env)
    found = result.stdout.decode()
    # 0.0.19 kept GITHUB_TOKEN in clear: compared as redacted; its diff had no last newline and
    # no staged or untracked files; it recorded no dirty flag: none of that is a change.
    assert not [line for line in found.splitlines() if "git." in line or "environment_variables" in line], found
    (sample / "job.py").write_text("changed\n")
    changed = run_capsula("verify", "monitor", cwd=sample, env=env).stdout.decode()
    assert "git.sample: the uncommitted changes differ" in changed


def test_the_reference_capsules_list_show_and_diff(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    for name in ("capture", "monitor-cli", "monitor-decorator"):
        shutil.copytree(REFERENCE_VAULT / name, vault / name)
    rows = json.loads(run_capsula("list", "--json", "--vault", str(vault), cwd=tmp_path).stdout)
    assert {r["name"]: r["status"] for r in rows} == dict.fromkeys(
        ("capture", "monitor-cli", "monitor-decorator"), "completed"
    )
    for name in ("capture", "monitor-cli", "monitor-decorator"):
        shown = run_capsula("show", name, "--vault", str(vault), cwd=tmp_path)
        assert shown.returncode == 0 and shown.stderr == b"", shown.stderr


def test_readme_says_how_to_install_this_capsula_and_what_differs() -> None:
    readme = (CAPSULA.parent / "README.md").read_text()
    assert "pip install capsula\n" not in readme  # that name on the index is another program
    section = readme.split("## Differences from 0.0.19", 1)[1].split("\n## ", 1)[0]
    for defect in (
        "exit code",
        "same second",
        "UTF-8",
        "not exist",
        "pre-capture",
        "missing file",
        "detached",
        "staged",
        "JSON",
        "shown",
        "capsula.toml",
        "Ctrl-C",
        "same base name",
        "include_return_value",
    ):
        assert defect in section, defect


def test_0_0_19_config_runs_the_0_0_19_examples(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "capsula.toml").write_text(
        (REFERENCE_VAULT / "capsula.toml").read_text().replace("sample = '.'", "p = '.'")
    )
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    result = run_capsula("capture", cwd=root)
    assert result.returncode == 0, result.stderr
    context = load(Path(result.stdout.decode().strip()) / "context.json")
    assert context["cpu"] and "pip" in context["pre_capture_commands"][0]["command"]
