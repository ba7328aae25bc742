"""Secrets stay out of the vault; files get the user's umask; nothing is written elsewhere."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import CAPSULA, load, only_capsule, run_capsula, write_config


def test_secret_looking_environment_variables_are_redacted(repo: Path) -> None:
    write_config(
        repo,
        """[capture]
environment-variables = ['GITHUB_TOKEN', 'DB_*', 'AWS_SECRET_ACCESS_KEY', 'TOKENIZERS_PARALLELISM', 'HOME']
[redact]
allow = ['TOKENIZERS_PARALLELISM']
""",
    )
    env = {
        **os.environ,
        "GITHUB_TOKEN": "ghp_leak1",
        "DB_PASSWORD": "leak2",
        "DB_HOST": "db.local",
        "AWS_SECRET_ACCESS_KEY": "leak3",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = run_capsula("capture", cwd=repo, env=env)
    capsule = Path(result.stdout.decode().strip())
    variables = load(capsule / "context.json")["environment_variables"]
    assert variables["GITHUB_TOKEN"] == variables["DB_PASSWORD"] == variables["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    assert variables["DB_HOST"] == "db.local" and variables["TOKENIZERS_PARALLELISM"] == "false"
    text = b"".join(p.read_bytes() for p in capsule.rglob("*") if p.is_file())
    assert b"leak" not in text


def test_secret_arguments_are_redacted_in_pre_run_info(repo: Path) -> None:
    run_capsula("monitor", "echo", "--password=hunter2", "--token", "abc123", "--api-key", "k", "--n", "3", cwd=repo)
    capsule = only_capsule(repo / "vault")
    args = load(capsule / "pre-run-info.json")["args"]
    assert args == ["echo", "--password=<redacted>", "--token", "<redacted>", "--api-key", "<redacted>", "--n", "3"]
    assert load(capsule / "pre-run-info.json")["args_redacted"] is True
    assert b"hunter2" not in (capsule / "pre-run-info.json").read_bytes() + (capsule / "capsule.json").read_bytes()


def test_argument_redaction_can_be_turned_off(repo: Path) -> None:
    write_config(repo, "[redact]\narguments = false\n")
    run_capsula("monitor", "echo", "--token", "public-test-token", cwd=repo)
    assert load(only_capsule(repo / "vault") / "pre-run-info.json")["args"] == ["echo", "--token", "public-test-token"]


def test_capsules_are_created_with_the_users_umask(repo: Path) -> None:
    (repo / "data.txt").chmod(0o644)
    write_config(repo, '[capture.files]\n"data.txt" = { copy = true }\n')
    result = subprocess.run(
        [sys.executable, str(CAPSULA), "monitor", "echo", "x"], cwd=repo, preexec_fn=lambda: os.umask(0o077)
    )
    assert result.returncode == 0
    capsule = only_capsule(repo / "vault")
    assert stat.S_IMODE(capsule.stat().st_mode) == 0o700
    for name in ("context.json", "pre-run-info.json", "post-run-info.json", "stdout.txt", "data.txt", "project.diff"):
        assert stat.S_IMODE((capsule / name).stat().st_mode) == 0o600, name


def test_nothing_is_written_outside_the_root_and_the_vault(repo: Path, tmp_path: Path) -> None:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    (repo / "input.txt").write_text("untracked input\n")
    write_config(repo, "[capture]\ninclude-cpu = true\n")
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache")}
    for args in (
        ["capture"],
        ["monitor", "true"],
        ["verify", "latest"],
        ["rerun", "latest"],
        ["list"],
        ["diff", "latest", "latest~1"],
    ):
        result = run_capsula(*args, cwd=repo, env=env)
        assert result.returncode in (0, 1), result.stderr
    assert list(home.iterdir()) == [] and list(tmp.iterdir()) == []
