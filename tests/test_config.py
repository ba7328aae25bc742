"""Configuration: the 0.0.19 format, discovery, defaults and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, git, only_capsule, run_capsula, write_config

import capsula

REFERENCE = REPO.parent / "shared" / "reference"


def test_reference_config_loads_unchanged(repo: Path) -> None:
    text = (REFERENCE / "capsula-0.0.19-vault" / "capsula.toml").read_text() if REFERENCE.exists() else None
    if text is None:
        pytest.skip("the 0.0.19 reference is not beside the repository")
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
    context = capsula.read_json(capsule / "context.json")
    assert list(context["git"]) == ["project"] and context["git"]["project"]["branch"] == "main"


def test_no_config_outside_git_uses_cwd(tmp_path: Path) -> None:
    result = run_capsula("capture", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    capsule = only_capsule(tmp_path / "vault")
    assert capsula.read_json(capsule / "context.json")["git"] == {}


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
    assert (config.vault_directory, config.capsule_template, config.include_cpu) == ("vault", "%Y%m%d_%H%M%S", False)


def test_the_sample_projects_config_in_a_copy(tmp_path: Path) -> None:
    shutil.copy(REPO / "capsula.toml", tmp_path / "capsula.toml")
    git(tmp_path, "init", "-q")
    assert set(capsula.load_config(tmp_path).items) == {"calc-pi", "calc-pi-dec"}


def _loads_without_tomllib(root: Path) -> tuple[bool, dict[str, object]]:
    code = (
        "import json, sys, capsula\n"
        "config = capsula.load_config()\n"
        "print(json.dumps(['tomllib' in sys.modules, config.as_dict()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, check=True).stdout  # fmt: skip
    parsed, settings = json.loads(out)
    return parsed, settings


@pytest.mark.parametrize(
    ("vault", "file"), [(None, "capsula.toml"), ("runs", "capsula.toml"), ("runs", "pyproject.toml")]
)
def test_parsed_config_is_kept_in_the_vault_for_the_same_text_only(repo: Path, vault: str | None, file: str) -> None:
    prefix = "[tool.capsula.capture]" if file == "pyproject.toml" else "[capture]"
    setting = f'vault-directory = "{vault}"\n' if vault else ""
    path = repo / file
    path.write_text(f'{prefix}\n{setting}environment-variables = ["HOME"]\n')
    assert _loads_without_tomllib(repo)[0] is True  # no vault yet: nothing kept
    assert not (repo / (vault or "vault")).exists()
    assert run_capsula("capture", cwd=repo).returncode == 0
    assert _loads_without_tomllib(repo)[0] is True  # parsed, and now kept
    assert list((repo / (vault or "vault") / ".cache").glob("config-*.json"))
    parsed, settings = _loads_without_tomllib(repo)
    assert parsed is False and settings["environment_variables"] == ["HOME"]
    # Same size, same mtime, other text: parsed again, never the stale tables.
    stat = path.stat()
    path.write_text(path.read_text().replace('"HOME"', '"USER"'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    parsed, settings = _loads_without_tomllib(repo)
    assert parsed is True and settings["environment_variables"] == ["USER"]


def test_config_naming_its_vault_unusually_is_parsed_every_time(repo: Path) -> None:
    write_config(repo, '[capture]\n"vault-directory" = "runs"\n')  # quoted key: the search misses it
    assert run_capsula("capture", cwd=repo).returncode == 0
    assert _loads_without_tomllib(repo)[0] is True
    assert _loads_without_tomllib(repo)[0] is True
    assert not (repo / "vault").exists() and not list((repo / "runs" / ".cache").glob("config-*"))


def test_invalid_config_is_not_kept(repo: Path) -> None:
    assert run_capsula("capture", cwd=repo).returncode == 0  # the vault exists
    write_config(repo, "[capture]\ninclude-cpu = 3\n")
    assert run_capsula("capture", cwd=repo).returncode == 2
    assert not list((repo / "vault" / ".cache").glob("config-*"))
