"""Records: the pure parts (statuses, shapes, confinement, the parsers of git and /proc)
tested directly on real sample input, and the one reader on hostile capsules. URLs and
redaction are tested in test_secrets.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import REFERENCE_VAULT, git, load, run_capsula, write_config

import capsula

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (dict(exit_code=0), ("completed", 0)),
        (dict(exit_code=3), ("failed", 3)),
        (dict(exit_code=137, signal=9), ("failed", 137)),
        (dict(exit_code=143, signal=15), ("interrupted", 143)),
        (dict(exit_code=0, interrupted_by=2), ("interrupted", 130)),  # the command caught it
        (dict(exit_code=0, incomplete=True), ("incomplete", 1)),
        (dict(exit_code=2, incomplete=True), ("failed", 2)),  # failure first
        (dict(raised="ValueError"), ("failed", 1)),
        (dict(raised="KeyboardInterrupt"), ("interrupted", 130)),
        (dict(raised="SystemExit", exit_code=0), ("completed", 0)),
        (dict(raised="SystemExit", exit_code=4), ("failed", 4)),
        (dict(incomplete=True), ("incomplete", 1)),
    ],
)
def test_settle_is_the_one_rule_for_status_and_exit_code(outcome: dict[str, Any], expected: tuple[str, int]) -> None:
    assert capsula.settle(**outcome) == expected


def test_conform_drops_and_names_each_value_of_the_wrong_shape() -> None:
    problems: list[str] = []
    data = {
        "root_directory": 7,
        "cwd": "/x",
        "git": {"a": {"sha": ["not", "a", "sha"], "dirty": 1, "path": "."}, "b": "nope"},
        "files": {"f": None, "g": {"file_hash": "ab", "size": True, "stored_as": "g"}},
        "environment_variables": {"HOME": "/h", "N": 3},
        "unknown_key": {"kept": "as is"},
    }
    ok, checked = capsula.conform(data, capsula._SHAPES[capsula.CONTEXT], where="context.json", problems=problems)
    assert ok and checked == {
        "cwd": "/x",
        "git": {"a": {"path": "."}},
        "files": {"f": None, "g": {"file_hash": "ab", "stored_as": "g"}},
        "environment_variables": {"HOME": "/h"},
        "unknown_key": {"kept": "as is"},
    }
    assert "'context.json.root_directory' must be a string, got an integer (7)" in problems
    assert "'context.json.git.a.dirty' must be true or false, got an integer (1)" in problems
    assert "'context.json.files.g.size' must be an integer, got true or false (True)" in problems  # no bool
    assert len(problems) == 6
    assert capsula.conform([], capsula._SHAPES[capsula.CONTEXT], where="x", problems=[]) == (False, None)


def test_confined_refuses_what_leads_outside_even_through_links(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "out").symlink_to(tmp_path)
    assert capsula.confined(base, "sub/file", what="x") == base / "sub" / "file"
    assert capsula.confined(base, ".", what="x") == base
    for bad in ("../x", "/etc/passwd", "sub/../../x", "out/x", "", "a\0b", 3, None, ["a"]):
        with pytest.raises(capsula.VaultError, match="leads outside"):
            capsula.confined(base, bad, what="stored_as")


def test_parse_git_status_of_real_porcelain_output() -> None:
    sha, branch, changed, untracked = capsula.parse_git_status((FIXTURES / "git-status-porcelain-v2.bin").read_bytes())
    assert branch == "main" and sha is not None and len(sha) == 40
    assert changed == 2  # a modified file and a rename (whose old path is not a file of its own)
    assert untracked == ["new", "sub/sp ace"]
    assert capsula.parse_git_status(b"# branch.oid (initial)\0# branch.head (detached)\0") == (None, None, 0, [])


def test_parse_proc_cpuinfo_of_a_real_file() -> None:
    info = capsula.parse_proc_cpuinfo((FIXTURES / "proc-cpuinfo-x86_64.txt").read_text())
    assert info["vendor_id_raw"] == "GenuineIntel" and str(info["brand_raw"]).startswith("Intel(R)")
    assert isinstance(info["family"], int) and isinstance(info["model"], int)
    flags = info["flags"]
    assert isinstance(flags, list) and "sse2" in flags and flags == sorted(map(str, flags))
    assert info["hz_actual"] == [2_600_000_000, 0] and info["hz_actual_friendly"] == "2.6000 GHz"


def _vault_with_hostile_capsules(project: Path) -> Path:
    assert run_capsula("monitor", "true", cwd=project).returncode == 0
    vault = project / "vault"
    for name in ("monitor-cli", "monitor-decorator", "capture"):
        shutil.copytree(REFERENCE_VAULT / name, vault / name)
    hostile = vault / "hostile"
    shutil.copytree(REFERENCE_VAULT / "monitor-cli", hostile)
    context = load(hostile / "context.json")
    context["git"]["sample"].update(sha=12, diff_file="../../../../etc/passwd", root_in_repo=["x"])
    context["files"] = {"../../outside.txt": {"copied": True, "stored_as": "../../../secret"}}
    (hostile / "context.json").write_text(json.dumps(context))
    (hostile / "capsule.json").write_text('{"kind": 3, "status": ["x"], "pid": "1", "command": "rm -rf /"}')
    (vault / "garbage").mkdir()
    (vault / "garbage" / "capsule.json").write_text("[" * 100_000)  # deeper than json can nest
    return vault


def test_a_hostile_capsule_is_named_in_one_line_and_the_rest_keep_working(repo: Path) -> None:
    vault = _vault_with_hostile_capsules(repo)
    listed = run_capsula("list", "--json", cwd=repo)
    assert listed.returncode == 0 and b"Traceback" not in listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert len(rows) == 6 and rows["garbage"]["status"] == "unreadable"
    assert rows["monitor-cli"]["status"] == "completed" and rows["hostile"]["kind"] == "command"
    shown = run_capsula("show", "hostile", cwd=repo)
    err = shown.stderr.decode()
    assert shown.returncode == 0 and "Traceback" not in err
    assert all(line.startswith("capsula: warning: capsule hostile: ") for line in err.splitlines())
    assert "'context.json.git.sample.sha' must be a string or null, got an integer (12); ignored" in err
    rerun = run_capsula("rerun", "hostile", cwd=repo)
    err = rerun.stderr.decode()
    assert rerun.returncode == 1 and "no git commit" in err.splitlines()[-1] and "Traceback" not in err
    assert not (repo.parent / "outside.txt").exists()
    for command in (["diff", "hostile", "monitor-cli"], ["verify", "hostile"], ["show", "garbage"]):
        result = run_capsula(*command, cwd=repo)
        assert b"Traceback" not in result.stderr and result.returncode in (0, 1), command
    assert len(list(vault.iterdir())) == 6  # nothing was written beside them


def test_rerun_refuses_paths_a_capsule_points_outside_its_places(repo: Path) -> None:
    write_config(repo, '[capture.files]\n"data.txt" = { copy = true }\n[monitor.item.out.files]\n"o.txt" = {}\n')
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "config")
    assert run_capsula("monitor", "-i", "out", "true", cwd=repo).returncode == 0
    (capsule,) = (repo / "vault").iterdir()
    victim = repo.parent / "victim.txt"
    victim.write_text("mine\n")
    edits: dict[str, tuple[str, Callable[[Any], object]]] = {
        "stored_as": ("context.json", lambda d: d["files"]["data.txt"].update(stored_as="../../victim.txt")),
        "destination": ("context.json", lambda d: d["files"].update({"../victim.txt": d["files"]["data.txt"]})),
        "item": ("pre-run-info.json", lambda d: d["items"]["out"].update({"../victim.txt": {"move": True}})),
        "cwd": ("pre-run-info.json", lambda d: d.update(cwd=str(repo.parent))),
        "root_in_repo": ("context.json", lambda d: d["git"]["project"].update(root_in_repo="x/../../..")),
    }
    original = {name: (capsule / name).read_text() for name in ("context.json", "pre-run-info.json")}
    for what, (name, edit) in edits.items():
        data = json.loads(original[name])
        edit(data)
        (capsule / name).write_text(json.dumps(data))
        result = run_capsula("rerun", capsule.name, cwd=repo)
        err = result.stderr.decode()
        assert result.returncode != 0 and "Traceback" not in err, (what, err)
        assert "outside" in err.splitlines()[-1], (what, err)
        assert victim.read_text() == "mine\n", what
        (capsule / name).write_text(original[name])
    assert not [p for p in Path(os.environ["CAPSULA_CACHE_DIR"]).iterdir() if p.name.startswith("rerun-")]
    worktrees = git(repo, "worktree", "list", "--porcelain").count("worktree ")
    assert worktrees == 1  # only the user's own


def test_rerun_removes_only_its_own_worktree(repo: Path, tmp_path: Path) -> None:
    other = tmp_path / "unmounted-drive"
    git(repo, "worktree", "add", "-q", "--detach", str(other))
    shutil.rmtree(other)  # its folder is missing for now; git still keeps its record
    assert run_capsula("monitor", "true", cwd=repo).returncode == 0
    result = run_capsula("rerun", "latest", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert "rerunning" in result.stderr.decode() and "(in " in result.stderr.decode()
    assert str(other) in git(repo, "worktree", "list", "--porcelain")  # not pruned


def test_no_process_outlives_its_test() -> None:
    """The autouse fixture in conftest checks this after every test; here, that it works."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert os.getpid() in _parents(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def _parents(pid: int) -> list[int]:
    with open(f"/proc/{pid}/stat") as f:
        return [int(f.read().rsplit(")", 1)[1].split()[1])]


def test_a_capsule_file_linked_out_of_the_capsule_is_not_read(repo: Path, tmp_path: Path) -> None:
    assert run_capsula("monitor", "-q", "echo", "mine", cwd=repo).returncode == 0
    (capsule,) = (repo / "vault").iterdir()
    outside = tmp_path / "private.txt"
    outside.write_text("not yours\n")
    (capsule / "stdout.txt").unlink()
    (capsule / "stdout.txt").symlink_to(outside)
    (capsule / "capsule.json").unlink()
    (capsule / "capsule.json").symlink_to(outside)
    for args in (["show", capsule.name], ["diff", capsule.name, capsule.name]):
        result = run_capsula(*args, cwd=repo)
        assert b"not yours" not in result.stdout + result.stderr and b"Traceback" not in result.stderr


def test_a_capsule_naming_another_repository_never_reaches_it(repo: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    (other / "f").write_text("x\n")
    git(other, "add", ".")
    git(other, "commit", "-qm", "other")
    assert run_capsula("monitor", "-q", "true", cwd=repo).returncode == 0
    (capsule,) = (repo / "vault").iterdir()
    context = load(capsule / "context.json")
    context["root_directory"] = str(other)
    context["git"]["project"]["path"] = "../other"
    (capsule / "context.json").write_text(json.dumps(context))
    before = sorted(p.name for p in (other / ".git").rglob("*"))
    for args in (["rerun", capsule.name], ["verify", capsule.name]):
        result = run_capsula(*args, cwd=repo)
        assert b"Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in (other / ".git").rglob("*")) == before  # not a worktree, not an index


def test_collect_packages_finds_what_importlib_metadata_finds(tmp_path: Path) -> None:
    """Each layout pip, setuptools and old eggs leave, the first of a name on the path
    winning; the same answer as importlib.metadata on this very interpreter."""
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "Foo_Bar-1.0.dist-info").mkdir(parents=True)
    (first / "Foo_Bar-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: Foo_Bar\nVersion: 1.0\n\nName: not a header\n" + "x" * 200_000
    )
    (first / "old.egg-info").mkdir()
    (first / "old.egg-info" / "PKG-INFO").write_text("Metadata-Version: 1.0\nName: old\nVersion: 0.9\n")
    (first / "single.egg-info").write_text("Metadata-Version: 1.0\nName: single\nVersion: 3\n")
    (first / "broken.dist-info").mkdir()  # no metadata: not a distribution
    (second / "foo.bar-2.0.dist-info").mkdir(parents=True)
    (second / "foo.bar-2.0.dist-info" / "METADATA").write_text("Name: foo.bar\nVersion: 2.0\n")
    (second / "foo.bar-2.0.dist-info" / "direct_url.json").write_text('{"url": "https://u:p@h/x", "vcs_info": {}}')
    found = capsula.collect_packages([str(first), str(tmp_path / "missing"), str(second)])
    assert found == {
        "foo-bar": {"name": "Foo_Bar", "version": "1.0"},
        "old": {"name": "old", "version": "0.9"},
        "single": {"name": "single", "version": "3"},
    }
    from importlib import metadata

    expected: dict[str, str] = {}
    for dist in metadata.distributions():
        key = dist.metadata["Name"].lower().replace("_", "-").replace(".", "-")
        expected.setdefault(key, dist.version)
    ours = cast("dict[str, dict[str, str]]", capsula.collect_packages())
    assert {k: v["version"] for k, v in ours.items()} == expected
