"""Configuration: the 0.0.19 format, discovery, defaults and one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REFERENCE_VAULT, REPO, git, load, only_capsule, run_capsula, write_config

import capsula


def test_reference_config_loads_unchanged(repo: Path) -> None:
    text = (REFERENCE_VAULT / "capsula.toml").read_text()
    write_config(repo, text.replace("sample = '.'", "project = '.'"))
    config = capsula.load_config(repo)
    assert config.include_cpu is True
    assert config.pre_capture_commands == ("pip freeze --exclude-editable > requirements.txt",)
    assert [f.path for f in config.files] == ["pyproject.toml", "requirements.txt"]
    assert config.files[1].move and config.files[0].copy
    assert set(config.items) == {"calc-pi", "calc-pi-dec"}


def test_readme_example_keys_load(repo: Path) -> None:
    (repo / "some").mkdir()
    write_config(
        repo,
        """
[capture]
vault-directory = 'vault'
capsule-template = '%Y%m%d_%H%M%S'
include-cpu = true
pre-capture-commands = ['poetry lock --check']
environment-variables = ['HOME']
[capture.files]
"pyproject.toml" = { hash = "sha256", copy = true }
"poetry.lock" = { hash = "md5", copy = true }
"requirements.txt" = { hash = "sha3", move = true }
[capture.git.repositories]
"capsula" = '.'
[monitor]
[monitor.item.calculate-pi-cli.files]
"examples/pi_cli.png" = { hash = "sha1", move = true }
""",
    )
    config = capsula.load_config(repo)
    assert [f.hash for f in config.files] == ["sha256", "md5", "sha3_256"]
    assert config.git_repositories == (("capsula", "."),)


def test_pyproject_tool_capsula_is_read(repo: Path) -> None:
    (repo / "pyproject.toml").write_text('[project]\nname="x"\n[tool.capsula.capture]\nvault-directory = "runs"\n')
    assert capsula.load_config(cwd=repo).vault == repo / "runs"


def test_config_found_upward_from_a_subdirectory(repo: Path) -> None:
    write_config(repo, '[capture]\nvault-directory = "v"\n')
    sub = repo / "a" / "b"
    sub.mkdir(parents=True)
    config = capsula.load_config(cwd=sub)
    assert config.root == repo and config.vault == repo / "v"


def test_dash_c_names_the_config_directory(repo: Path, tmp_path: Path) -> None:
    write_config(repo, '[capture]\nvault-directory = "v"\n')
    result = run_capsula("capture", "-C", str(repo), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.decode().strip()).parent == repo / "v"


def test_no_config_defaults_to_git_top_and_its_repository(repo: Path) -> None:
    sub = repo / "sub"
    sub.mkdir()
    result = run_capsula("capture", cwd=sub)
    assert result.returncode == 0, result.stderr
    capsule = Path(result.stdout.decode().strip())
    assert capsule.parent == repo / "vault"
    context = load(capsule / "context.json")
    assert list(context["git"]) == ["project"] and context["git"]["project"]["branch"] == "main"


def test_no_config_outside_git_uses_cwd(tmp_path: Path) -> None:
    result = run_capsula("capture", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    capsule = only_capsule(tmp_path / "vault")
    assert load(capsule / "context.json")["git"] == {}


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[capture.files]\n"a" = { copy = true, move = true }\n', "sets both copy and move"),
        ('[capture.files]\n"a" = { hash = "sha257" }\n', "unknown hash algorithm 'sha257'"),
        ("[capture]\ninclude-cpu = 'yes'\n", "'capture.include-cpu' in"),
        ("[capture]\nenvironment-variables = 'HOME'\n", "must be a list of strings"),
        ("[capture]\nvault-directroy = 'v'\n", "did you mean 'vault-directory'?"),
        ("[capture.git.repositories]\nx = 'not-here'\n", "is not a git repository"),
        ("[capture]\ncapsule-template = '%Y/%m'\n", "not one directory name"),
        ('[capture.files]\n"../outside.txt" = { copy = true }\n', "outside the root"),
    ],
)
def test_invalid_config_is_one_line_exit_2_and_no_vault(tmp_path: Path, toml: str, expected: str) -> None:
    write_config(tmp_path, toml)
    result = run_capsula("capture", cwd=tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 2
    assert err.count("\n") == 1 and err.startswith("capsula: error: ") and expected in err, err
    assert str(tmp_path / "capsula.toml") in err
    assert not (tmp_path / "vault").exists()


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    write_config(tmp_path, "[capture]\ninclude-cpu = \n")
    result = run_capsula("capture", cwd=tmp_path)
    assert result.returncode == 2
    assert "line 2, column 15" in result.stderr.decode() and result.stderr.decode().count("\n") == 1


def test_git_path_that_is_not_a_repository_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(capsula.ConfigError, match="'plain' is not a git repository"):
        capsula.parse_config({"capture": {"git": {"repositories": {"x": "plain"}}}}, root=tmp_path, source=None)


def test_every_key_has_a_default(tmp_path: Path) -> None:
    config = capsula.parse_config({}, root=tmp_path, source=None)
    assert (config.vault_directory, config.capsule_template, config.include_cpu) == ("vault", "%Y%m%d_%H%M%S", True)


def test_the_sample_projects_config_in_a_copy(tmp_path: Path) -> None:
    shutil.copy(REPO / "capsula.toml", tmp_path / "capsula.toml")
    git(tmp_path, "init", "-q")
    assert set(capsula.load_config(tmp_path).items) == {"calc-pi", "calc-pi-dec"}


@pytest.mark.parametrize("file", ["capsula.toml", "pyproject.toml"])
def test_the_config_is_what_its_file_says_every_time(repo: Path, file: str) -> None:
    prefix = "[tool.capsula.capture]" if file == "pyproject.toml" else "[capture]"
    path = repo / file
    path.write_text(f'{prefix}\nvault-directory = "runs"\nenvironment-variables = ["HOME"]\n')
    assert run_capsula("capture", cwd=repo).returncode == 0
    # Same size, same mtime, other text: what the file says now, never what it said before.
    stat = path.stat()
    path.write_text(path.read_text().replace('"HOME"', '"USER"'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert capsula.load_config(repo).environment_variables == ("USER",)
    # Nothing kept beside the capsules can change what runs: the vault holds capsules only.
    runs = repo / "runs"
    assert all((p / "context.json").is_file() for p in runs.iterdir()), list(runs.iterdir())


def test_the_vault_holds_capsule_directories_only(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPSULA_CACHE_DIR")  # the default place: .capsula_cache in the root
    write_config(repo, "[capture]\ninclude-cpu = true\n")
    for _ in range(2):
        assert run_capsula("capture", cwd=repo).returncode == 0
        assert run_capsula("monitor", "true", cwd=repo).returncode == 0
    entries = list((repo / "vault").iterdir())
    assert len(entries) == 4 and all((p / "context.json").is_file() for p in entries)
    # 0.0.19's users find their capsule this way
    assert (next((repo / "vault").iterdir()) / "context.json").is_file()
    # Facts kept between runs live in a cache that ignores itself, outside the vault.
    cache = repo / ".capsula_cache"
    assert "*" in (cache / ".gitignore").read_text().splitlines()
    untracked = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    assert not [line for line in untracked if "capsula_cache" in line]


def test_an_invalid_config_creates_nothing(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPSULA_CACHE_DIR")
    write_config(repo, "[capture]\ninclude-cpu = 3\n")
    assert run_capsula("capture", cwd=repo).returncode == 2
    assert not (repo / "vault").exists() and not (repo / ".capsula_cache").exists()
