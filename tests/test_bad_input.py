"""Bad input: generated configs, awkward paths, symlinks, non-UTF-8 names."""

from __future__ import annotations

import json
import os
import string
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import git, load, only_capsule, run_capsula, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import capsula

KEYS = [
    "capture", "monitor", "redact", "vault-directory", "capsule-template", "include-cpu", "include-packages",
    "pre-capture-commands", "environment-variables", "files", "git", "repositories", "item", "hash", "copy",
    "move", "patterns", "allow", "arguments", "sha256", "sha3", ".", "..", "/", "%Y/%m", "",
]  # fmt: skip
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(KEYS),
    st.datetimes(),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=12
)


def config_dicts() -> st.SearchStrategy[dict[str, Any]]:
    """Documents shaped like capsula.toml, with random keys and values at every level."""
    file_entry = st.dictionaries(st.sampled_from(["hash", "copy", "move", "other"]), values, max_size=3)
    capture = st.dictionaries(
        keys,
        st.one_of(values, st.dictionaries(keys, file_entry, max_size=3), st.just({"repositories": {"r": "."}})),
        max_size=6,
    )
    monitor = st.dictionaries(st.sampled_from(["item", "x"]), st.dictionaries(keys, st.dictionaries(keys, values)))
    return st.fixed_dictionaries(
        {}, optional={"capture": capture, "monitor": monitor, "redact": st.dictionaries(keys, values), "other": values}
    )


@pytest.mark.stress
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=config_dicts())
def test_generated_configs_load_or_are_refused_in_one_line(tmp_path: Path, raw: dict[str, Any]) -> None:
    try:
        config = capsula.parse_config(raw, root=tmp_path, source=tmp_path / "capsula.toml")
    except capsula.CapsulaError as exc:
        assert "\n" not in str(exc) and str(exc)
        assert exc.exit_code == 2
    else:
        assert isinstance(config.vault, Path)


toml_lines = st.lists(
    st.one_of(
        st.sampled_from(["[capture]", "[capture.files]", "[monitor.item.x.files]", "[redact]", "[capture.git.repositories]"]),
        st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEYS) | st.text(string.ascii_letters + "-.\"'", max_size=10),
                  st.sampled_from(["1", "true", "'x'", '"%Y"', "[1, 'a']", "{ hash = 'md5' }", "{ copy = true, move = true }", "", "'''", "1979-05-27"])),
        st.text(max_size=20),
    ),
    max_size=8,
)  # fmt: skip


@pytest.mark.stress
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=toml_lines)
def test_generated_toml_documents_load_or_are_refused_in_one_line(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "capsula.toml"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        capsula.load_config(tmp_path)
    except capsula.ConfigError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)


def test_a_generated_refusal_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    write_config(tmp_path, "[capture]\nfiles = 3\n[monitor.item.x]\nfiles = { 'a' = 'b' }\n")
    result = run_capsula("capture", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.decode().count("\n") == 1


def test_paths_with_spaces_unicode_and_newlines(tmp_path: Path) -> None:
    root = tmp_path / "my project é"
    root.mkdir()
    git(root, "init", "-q")
    names = ["a b.txt", "ünï cødé.txt", "new\nline.txt"]
    for name in names:
        (root / name).write_text(name)
    entries = "".join(f"{json.dumps(n)} = {{ copy = true }}\n" for n in names)
    write_config(root, "[capture.files]\n" + entries)
    result = run_capsula("capture", cwd=root)
    assert result.returncode == 0, result.stderr
    capsule = only_capsule(root / "vault")
    context = load(capsule / "context.json")
    for name in names:
        assert (capsule / name).read_text() == name and context["files"][name]["file_hash"]
    assert sorted(context["git"]["my_project_é"]["untracked"]) == sorted([*names, "capsula.toml"])


def test_parent_and_absolute_paths_are_hashed_never_copied(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("elsewhere\n")
    write_config(repo, f'[capture.files]\n"../outside.txt" = {{}}\n"{outside}" = {{ hash = "md5" }}\n')
    result = run_capsula("capture", cwd=repo)
    assert result.returncode == 0
    capsule = only_capsule(repo / "vault")
    files = load(capsule / "context.json")["files"]
    assert files["../outside.txt"]["file_hash"] and files[str(outside)]["hash_algorithm"] == "md5"
    assert {p.name for p in capsule.iterdir()} == {"context.json", "capsule.json", "project.diff"}
    write_config(repo, f'[capture.files]\n"{outside}" = {{ move = true }}\n')
    assert run_capsula("capture", cwd=repo).returncode == 2 and outside.exists()


def test_symlinks_are_recorded_as_links_and_never_followed_out_of_the_root(repo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    (repo / "inside-link").symlink_to("data.txt")
    (repo / "outside-link").symlink_to(secret)
    write_config(repo, '[capture.files]\n"inside-link" = { copy = true }\n"outside-link" = { copy = true }\n')
    assert run_capsula("capture", cwd=repo).returncode == 0
    capsule = only_capsule(repo / "vault")
    files = load(capsule / "context.json")["files"]
    assert files["inside-link"]["symlink"] == "data.txt" and files["inside-link"]["file_hash"]
    assert files["outside-link"]["symlink"] == str(secret) and files["outside-link"]["file_hash"] is None
    assert (capsule / "outside-link").is_symlink() and os.readlink(capsule / "outside-link") == str(secret)
    assert b"TOP-SECRET-CONTENT" not in b"".join(p.read_bytes() for p in capsule.iterdir() if not p.is_symlink())


@pytest.mark.parametrize("template", ["..", ".", "%Y/../x", "/abs", ".hidden"])
def test_templates_that_leave_the_vault_are_refused(tmp_path: Path, template: str) -> None:
    write_config(tmp_path, f"[capture]\ncapsule-template = '{template}'\n")
    result = run_capsula("capture", cwd=tmp_path)
    assert result.returncode == 2 and "capsule-template" in result.stderr.decode()
    assert not (tmp_path / "vault").exists()


def test_non_utf8_file_names(repo: Path, tmp_path: Path) -> None:
    name = b"caf\xe9.txt"
    with open(os.path.join(os.fsencode(repo), name), "wb") as f:
        f.write(b"latin-1 name\n")
    result = run_capsula("capture", cwd=repo)
    assert result.returncode == 0, result.stderr
    capsule = only_capsule(repo / "vault")
    entry = json.loads((capsule / "context.json").read_bytes())["git"]["project"]
    assert [os.fsencode(u) for u in entry["untracked"]] == [name]
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    subprocess.run(["git", "apply", "--binary", str(capsule / "project.diff")], cwd=clone, check=True)
    assert open(os.path.join(os.fsencode(clone), name), "rb").read() == b"latin-1 name\n"


def test_toml_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "capsula.toml").write_bytes(b"[capture]\nvault-directory = '\xff'\n")
    result = run_capsula("capture", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.decode().count("\n") == 1


def test_tomllib_is_what_reads_the_file() -> None:
    assert tomllib.loads("[capture]\ninclude-cpu = true\n") == {"capture": {"include-cpu": True}}
