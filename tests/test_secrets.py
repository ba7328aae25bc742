"""Secrets stay out of the vault; files get the user's umask; nothing is written elsewhere."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CAPSULA, load, only_capsule, run_capsula, write_config

import capsula


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
    env.pop("CAPSULA_CACHE_DIR")  # the default: the cache is in the root
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


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        *[(n, True) for n in ("GITHUB_TOKEN", "pgpassword", "db_pass", "apiKey", "authToken", "SSH_KEY", "--api-key")],
        *[(n, True) for n in ("AWS_SECRET_ACCESS_KEY", "private_key_file", "x-auth", "Cookie", "credentials")],
        *[(n, False) for n in ("TOKENIZERS_PARALLELISM", "KEYBOARD", "MONKEY", "PASSAGE", "AUTHOR", "PWD", "HOME")],
    ],
)
def test_secret_names_are_words_or_long_patterns_any_case(name: str, secret: bool) -> None:
    assert capsula.is_secret_name(name, capsula.DEFAULT_SECRET_PATTERNS) is secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgres://u:pw@h/db", "postgres://<redacted>@h/db"),
        ("https://u:p@ss/w@host/x.git", "https://<redacted>@host/x.git"),  # a password holding @ and /
        ("http://proxy:3128", "http://proxy:3128"),
        ("http://host:8080/a@b", "http://host:8080/a@b"),  # a port, then an @ in the path
        ("git+https://github.com/o/r@v1.0", "git+https://github.com/o/r@v1.0"),  # a revision, no user
        ("https://h/x?api_key=K&page=2", "https://h/x?api_key=<redacted>&page=2"),
        ("Authorization: Bearer abc", "Authorization: <redacted>"),
        ("ssh://git@host/r.git", "ssh://git@host/r.git"),
    ],
)
def test_credentials_in_recorded_text_are_redacted(text: str, expected: str) -> None:
    assert capsula.redact_text(text, capsula.DEFAULT_SECRET_PATTERNS) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:p@ss/w0rd@host/x.git", "https://host/x.git"),
        ("  https://tok@host/x.git?private_token=1  ", "https://host/x.git"),
        ("ssh://git:pw@host/x.git", "ssh://host/x.git"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ],
)
def test_remote_urls_lose_every_credential(url: str, expected: str) -> None:
    assert capsula.strip_credentials(url) == expected


def test_argument_redaction_rules() -> None:
    args = ["--no-password", "--output", "f", "-p", "pw", "--key=K", "--auth-token", "T", "--n", "-5"]
    args += ["-H", "Authorization: Bearer Z", "--url", "https://u:p@h/x", "--keyboard", "us"]
    assert capsula.redact_args(args, capsula.DEFAULT_SECRET_PATTERNS, ()) == [
        "--no-password",
        "--output",
        "f",
        "-p",
        "<redacted>",
        "--key=<redacted>",
        "--auth-token",
        "<redacted>",
        "--n",
        "-5",
        "-H",
        "Authorization: <redacted>",
        "--url",
        "https://<redacted>@h/x",
        "--keyboard",
        "us",
    ]


def test_untracked_secret_files_are_withheld_listed_by_hash_and_said(repo: Path) -> None:
    (repo / ".env").write_text("API_TOKEN=leak-env\n")
    (repo / "certs").mkdir()
    (repo / "certs" / "server.key").write_text("leak-key\n")
    (repo / "notes.txt").write_text("kept\n")
    result = run_capsula("capture", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert ".env" in result.stderr.decode() and "certs/server.key" in result.stderr.decode()
    capsule = Path(result.stdout.decode().strip())
    git = load(capsule / "context.json")["git"]["project"]
    assert set(git["withheld"]) == {".env", "certs/server.key"}
    assert (
        git["withheld"][".env"]["size"] == len("API_TOKEN=leak-env\n") and len(git["withheld"][".env"]["sha256"]) == 64
    )
    text = b"".join(p.read_bytes() for p in capsule.rglob("*") if p.is_file())
    assert b"leak" not in text and b"kept" in (capsule / "project.diff").read_bytes()
    write_config(repo, '[redact]\nfiles = ["*.txt"]\n')  # the list is the user's to choose
    capsule = Path(run_capsula("capture", cwd=repo).stdout.decode().strip())
    assert set(load(capsule / "context.json")["git"]["project"]["withheld"]) == {"notes.txt"}


def test_environment_values_and_decorator_arguments_lose_their_credentials(repo: Path) -> None:
    write_config(repo, "[capture]\nenvironment-variables = ['DATABASE_URL', 'HTTP_PROXY']\n")
    env = {**os.environ, "DATABASE_URL": "postgres://u:leak1@h/db", "HTTP_PROXY": "http://me:leak2@proxy:3128"}
    capsule = Path(run_capsula("capture", cwd=repo, env=env).stdout.decode().strip())
    variables = load(capsule / "context.json")["environment_variables"]
    assert variables == {"DATABASE_URL": "postgres://<redacted>@h/db", "HTTP_PROXY": "http://<redacted>@proxy:3128"}

    @capsula.monitor(repo, include_return_value=True)
    def connect(host: str, password: str, *, api_key: str, retries: int = 3) -> dict[str, str]:
        return {"host": host, "token": "leak3"}

    connect("db", "leak4", api_key="leak5", retries=2)
    (latest,) = sorted((repo / "vault").iterdir(), key=lambda p: p.stat().st_mtime)[-1:]
    pre, post = load(latest / "pre-run-info.json"), load(latest / "post-run-info.json")
    assert pre["args"] == ["db", "<redacted>"] and pre["kwargs"] == {"api_key": "<redacted>", "retries": 2}
    assert post["return_value"] == {"host": "db", "token": "<redacted>"}


def test_rerun_and_verify_say_which_withheld_files_they_could_not_restore(repo: Path) -> None:
    (repo / ".env").write_text("X=1\n")
    assert run_capsula("monitor", "true", cwd=repo).returncode == 0
    verify = run_capsula("verify", "latest", cwd=repo)
    assert verify.returncode == 0 and ".env: withheld as a secret" in verify.stderr.decode()
    (repo / ".env").write_text("X=2\n")
    verify = run_capsula("verify", "latest", cwd=repo)
    assert verify.returncode == 1 and "withheld..env.sha256" in verify.stdout.decode()
    rerun = run_capsula("rerun", "latest", cwd=repo)
    assert "not restored, withheld as secrets: .env" in rerun.stderr.decode()
