"""`capsula capture`: the capsule, context.json, git state, files, commands, CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REFERENCE_VAULT, REPO, git, load, only_capsule, run_capsula, write_config

import capsula


def capture(root: Path) -> Path:
    result = run_capsula("capture", cwd=root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1  # the capsule's path is the one line on stdout
    return Path(lines[0])


def shape(value: Any) -> Any:
    """Key structure and JSON types, for comparing with 0.0.19's output."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return type(value).__name__


def assert_superset(ours: Any, theirs: Any, where: str = "") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        for key, value in theirs.items():
            assert key in ours, f"missing key {where}.{key}"
            assert_superset(ours[key], value, f"{where}.{key}")
    elif theirs != "NoneType":
        assert ours == theirs or ours == "NoneType", f"{where}: {ours} != {theirs}"


def test_context_json_has_every_key_0_0_19_wrote(repo: Path) -> None:
    write_config(
        repo,
        """[capture]
include-cpu = true
environment-variables = ['HOME']
[capture.files]
"data.txt" = { hash = "sha256", copy = true }
[capture.git.repositories]
project = '.'
""",
    )
    (repo / "README.md").write_text("changed\n")
    capsule = capture(repo)
    context = load(capsule / "context.json")
    reference = load(REFERENCE_VAULT / "capture" / "context.json")
    reference["git"] = {"project": reference["git"]["sample"]}
    reference["files"] = {"data.txt": reference["files"]["pyproject.toml"]}
    cpu_ref = reference.pop("cpu")
    assert_superset(shape(context), shape(reference))
    assert set(cpu_ref) - set(context["cpu"]) <= {"l2_cache_line_size", "l2_cache_associativity"}
    assert context["root_directory"] == str(repo) and context["cwd"] == str(repo)
    assert context["files"]["data.txt"]["file_hash"] == hashlib.sha256(b"input data\n").hexdigest()
    assert (capsule / "data.txt").read_text() == "input data\n"
    assert "changed" in (capsule / "project.diff").read_text()


def test_two_captures_in_the_same_second_get_distinct_capsules(repo: Path) -> None:
    write_config(repo, "[capture]\ncapsule-template = 'fixed'\n")
    first, second = capture(repo), capture(repo)
    assert first != second and first.name == "fixed" and second.name == "fixed_2"
    assert (first / "context.json").exists() and (second / "context.json").exists()


def test_concurrent_captures_never_share_or_overwrite(repo: Path) -> None:
    write_config(repo, "[capture]\ncapsule-template = 'same'\n")
    procs = [
        subprocess.Popen([sys.executable, str(REPO / "capsula.py"), "capture"], cwd=repo, stdout=subprocess.PIPE)
        for _ in range(8)
    ]
    paths = {p.communicate()[0].decode().strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 8


def test_detached_head_records_null_branch(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    context = load(capture(repo) / "context.json")
    assert context["git"]["project"]["branch"] is None
    assert context["git"]["project"]["sha"] == git(repo, "rev-parse", "HEAD").strip()


def test_repository_without_commits(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "new.txt").write_text("hello\n")
    context = load(capture(tmp_path) / "context.json")
    entry = context["git"][tmp_path.name]
    assert entry["sha"] is None and entry["branch"] == "main" and entry["untracked"] == ["new.txt"]


def test_remote_credentials_are_removed(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://user:s3cret@example.com/x.git")
    git(repo, "remote", "add", "other", "https://example.com/y.git?token=abc")
    git(repo, "remote", "add", "ssh", "git@example.com:z.git")
    text = (capture(repo) / "context.json").read_text()
    remotes = {r["name"]: r["url"] for r in load(capture(repo) / "context.json")["git"]["project"]["remotes"]}
    assert remotes == {
        "origin": "https://example.com/x.git",
        "other": "https://example.com/y.git",
        "ssh": "git@example.com:z.git",
    }
    assert "s3cret" not in text and "abc" not in text


def test_diff_holds_every_uncommitted_change_and_applies_on_a_clean_checkout(repo: Path, tmp_path: Path) -> None:
    (repo / ".gitignore").write_text("ignored.txt\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore")
    (repo / "README.md").write_text("unstaged change\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "data.txt").write_text("staged then changed\n")
    git(repo, "add", "data.txt")
    (repo / "data.txt").write_text("staged then changed again\n")
    (repo / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (repo / "new dir").mkdir()
    (repo / "new dir" / "untracked é.txt").write_text("untracked\n")
    (repo / "ignored.txt").write_text("ignored\n")
    git(repo, "rm", "-q", "--cached", "README.md")  # a staged deletion, file kept
    index_before = (repo / ".git" / "index").read_bytes()
    capsule = capture(repo)
    assert (repo / ".git" / "index").read_bytes() == index_before  # the user's index is untouched
    entry = load(capsule / "context.json")["git"]["project"]
    assert entry["dirty"] is True
    assert sorted(entry["untracked"]) == ["README.md", "blob.bin", "new dir/untracked é.txt"]
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", entry["sha"])
    git(clone, "apply", "--binary", str(capsule / "project.diff"))
    for rel in ("README.md", "staged.txt", "data.txt", "blob.bin", "new dir/untracked é.txt"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert not (clone / "ignored.txt").exists()


@pytest.mark.parametrize("where", ["", "out/run/"])
def test_large_untracked_files_are_listed_but_not_diffed(
    repo: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Also in a folder whose other files git adds whole, which git has begun to add while
    the files were sized: it is added again without the large one."""
    import time

    monkeypatch.setattr(capsula, "UNTRACKED_LIMIT", 10)
    monkeypatch.chdir(repo)
    (repo / ".gitignore").write_text("vault/\n")
    (repo / where).mkdir(parents=True, exist_ok=True)
    (repo / f"{where}big.bin").write_bytes(b"x" * 100)
    (repo / f"{where}small.txt").write_text("small\n")
    time.sleep(2 * capsula.TICK)
    capsule = capsula.capture(capsula.load_config())
    entry = capsule.context["git"]["project"]
    assert entry["untracked_not_in_diff"] == [f"{where}big.bin"] and f"{where}big.bin" in entry["untracked"]
    patch = (capsule.path / "project.diff").read_bytes()
    assert b"big.bin" not in patch and f"b/{where}small.txt".encode() in patch
    assert not list(capsule.path.glob(".*"))  # no copy of the index left


@pytest.mark.parametrize(
    ("name", "hashlib_name"),
    [("md5", "md5"), ("sha1", "sha1"), ("sha256", "sha256"), ("sha3", "sha3_256"), ("blake2b", "blake2b")],
)
def test_hash_algorithms(repo: Path, name: str, hashlib_name: str) -> None:
    write_config(repo, f'[capture.files]\n"data.txt" = {{ hash = "{name}" }}\n')
    entry = load(capture(repo) / "context.json")["files"]["data.txt"]
    assert entry["file_hash"] == hashlib.new(hashlib_name, b"input data\n").hexdigest()
    assert entry["hash_algorithm"] == hashlib_name


@pytest.mark.parametrize("size", [0, 1, capsula.SMALL_FILE - 1, capsula.SMALL_FILE, 3 * capsula.SMALL_FILE + 7])
def test_a_hash_is_the_same_whichever_implementation_makes_it(repo: Path, size: int) -> None:
    """Small files are hashed without loading OpenSSL, large ones with it: one digest."""
    (repo / "data.bin").write_bytes(os.urandom(size))
    write_config(repo, '[capture.files]\n"data.bin" = { copy = true }\n"data.txt" = { hash = "sha256" }\n')
    files = load(capture(repo) / "context.json")["files"]
    for name in ("data.bin", "data.txt"):
        assert files[name]["file_hash"] == hashlib.sha256((repo / name).read_bytes()).hexdigest()
    assert capsula.hash_file(repo / "data.bin", "sha256") == files["data.bin"]["file_hash"]


def test_same_base_names_both_survive_with_their_relative_paths(repo: Path) -> None:
    for d in ("a", "b"):
        (repo / d).mkdir()
        (repo / d / "x.txt").write_text(f"from {d}\n")
    write_config(repo, '[capture.files]\n"a/x.txt" = { copy = true }\n"b/x.txt" = { move = true }\n')
    capsule = capture(repo)
    assert (capsule / "a" / "x.txt").read_text() == "from a\n"
    assert (capsule / "b" / "x.txt").read_text() == "from b\n"
    assert (repo / "a" / "x.txt").exists() and not (repo / "b" / "x.txt").exists()


def test_a_file_named_like_capsulas_own_is_kept_aside(repo: Path) -> None:
    (repo / "context.json").write_text('{"mine": true}\n')
    write_config(repo, '[capture.files]\n"context.json" = { copy = true }\n')
    capsule = capture(repo)
    assert load(capsule / "_files" / "context.json") == {"mine": True}
    assert load(capsule / "context.json")["files"]["context.json"]["stored_as"] == "_files/context.json"


def test_move_across_filesystems_keeps_every_byte(repo: Path, other_fs_vault: Path) -> None:
    payload = os.urandom(3 << 20)
    (repo / "out.bin").write_bytes(payload)
    write_config(
        repo, f'[capture]\nvault-directory = "{other_fs_vault}"\n[capture.files]\n"out.bin" = {{ move = true }}\n'
    )
    capsule = capture(repo)
    assert (capsule / "out.bin").read_bytes() == payload and not (repo / "out.bin").exists()
    entry = load(capsule / "context.json")["files"]["out.bin"]
    assert entry["file_hash"] == hashlib.sha256(payload).hexdigest()


def test_missing_file_is_null_with_a_warning(repo: Path) -> None:
    write_config(repo, '[capture.files]\n"nope.txt" = { hash = "sha256", copy = true }\n"data.txt" = {}\n')
    result = run_capsula("capture", cwd=repo)
    assert result.returncode == 0
    assert "nope.txt: no such file" in result.stderr.decode()
    context = load(Path(result.stdout.decode().strip()) / "context.json")
    assert context["files"]["nope.txt"] is None and context["files"]["data.txt"]["file_hash"]


def test_unset_and_glob_environment_variables(repo: Path) -> None:
    write_config(repo, "[capture]\nenvironment-variables = ['MY_SET', 'MY_UNSET', 'SLURM_*']\n")
    env = {**os.environ, "MY_SET": "1", "SLURM_JOB_ID": "42", "SLURM_NODE": "n1"}
    env.pop("MY_UNSET", None)
    result = run_capsula("capture", cwd=repo, env=env)
    variables = load(Path(result.stdout.decode().strip()) / "context.json")["environment_variables"]
    assert variables == {"MY_SET": "1", "MY_UNSET": None, "SLURM_JOB_ID": "42", "SLURM_NODE": "n1"}


def test_pre_capture_commands_run_in_order_in_the_root_and_are_recorded(repo: Path) -> None:
    write_config(
        repo,
        """[capture]
pre-capture-commands = ['pwd > where.txt', 'echo one >> log.txt; echo err >&2', 'cat log.txt']
[capture.files]
"where.txt" = { move = true }
""",
    )
    sub = repo / "sub"
    sub.mkdir()
    capsule = capture(sub)
    commands = load(capsule / "context.json")["pre_capture_commands"]
    assert [c["command"] for c in commands] == ["pwd > where.txt", "echo one >> log.txt; echo err >&2", "cat log.txt"]
    assert commands[1]["stderr"] == "err\n" and commands[2]["stdout"] == "one\n"
    assert all(c["exit_code"] == 0 and c["duration"] >= 0 for c in commands)
    assert (capsule / "where.txt").read_text().strip() == str(repo)


def test_failing_pre_capture_command_stops_the_capture(repo: Path) -> None:
    write_config(
        repo,
        """[capture]
pre-capture-commands = ['echo ok', 'echo broken lockfile >&2; exit 3', 'touch never-ran']
[capture.files]
"data.txt" = { move = true }
""",
    )
    result = run_capsula("capture", cwd=repo)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert "exit code 3" in err and "broken lockfile" in err and "Traceback" not in err
    capsule = only_capsule(repo / "vault")
    context = load(capsule / "context.json")
    assert context["status"] == "failed" and len(context["pre_capture_commands"]) == 2
    assert load(capsule / "capsule.json")["status"] == "failed"
    assert not (repo / "never-ran").exists() and (repo / "data.txt").exists()


def test_cpu_fallback_parses_proc_cpuinfo() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 165\n"
        "model name\t: Intel(R) Core(TM) i5-10400 CPU @ 2.90GHz\nstepping\t: 5\ncpu MHz\t\t: 2904.010\n"
        "flags\t\t: sse2 fpu avx\n\nprocessor\t: 1\nvendor_id\t: Other\n"
    )
    info = capsula.parse_proc_cpuinfo(text)
    assert info["vendor_id_raw"] == "GenuineIntel" and info["family"] == 6 and info["model"] == 165
    assert info["flags"] == ["avx", "fpu", "sse2"] and info["stepping"] == 5
    assert info["hz_advertised"] == [2900000000, 0] and info["hz_actual_friendly"] == "2.9040 GHz"


def test_cpu_fallback_without_py_cpuinfo(repo: Path) -> None:
    write_config(repo, "[capture]\ninclude-cpu = true\n")
    # -S: no site-packages, so py-cpuinfo cannot be imported even where it is installed
    result = subprocess.run([sys.executable, "-S", str(REPO / "capsula.py"), "capture"], cwd=repo, capture_output=True)
    assert result.returncode == 0, result.stderr
    cpu = load(Path(result.stdout.decode().strip()) / "context.json")["cpu"]
    assert cpu["count"] == os.cpu_count() and cpu["bits"] in (32, 64) and "arch" in cpu
    assert cpu["source"] == "capsula" and cpu["cpuinfo_version"] is None  # the fallback, keys kept
    if Path("/proc/cpuinfo").exists():
        assert "brand_raw" in cpu or "flags" in cpu


def test_json_writes_leave_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    capsula.write_json(target, {"old": 1})

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(capsula.VaultError, match="No space left"):
        capsula.write_json(target, {"new": 2})
    assert load(target) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_full_disk_while_git_adds_untracked_files_keeps_the_rest_of_the_git_record(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (repo / "results").mkdir()
    (repo / "results" / "a.txt").write_text("a\n")
    copy = capsula.copy_and_hash

    def full_for_the_index(src: Path, dest: Path, algorithm: str | None) -> str | None:
        if dest.name.endswith(".index"):
            raise OSError(28, "No space left on device")
        return copy(src, dest, algorithm)

    monkeypatch.setattr(capsula, "copy_and_hash", full_for_the_index)
    monkeypatch.chdir(repo)
    capsule = capsula.capture(capsula.load_config()).path
    assert load(capsule / "capsule.json")["status"] == "incomplete"
    entry = load(capsule / "context.json")["git"]["project"]
    assert entry["sha"] == git(repo, "rev-parse", "HEAD").strip() and entry["untracked"] == ["results/a.txt"]
    assert "No space left on device" in entry["error"] and entry["error"].startswith("cannot write project.diff")
    assert sorted(p.name for p in capsule.iterdir() if p.name.startswith(".")) == []


def fake_distribution(site: Path, name: str, version: str, *, url: str | None = None) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nLong: text\n")
    if url:
        (info / "direct_url.json").write_text(json.dumps({"url": url, "dir_info": {"editable": True}}))


def test_include_packages_records_installed_distributions(repo: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "fake-dep", "1.2.3")
    fake_distribution(site, "my-editable", "0.1", url="https://user:pw@example.com/src")
    write_config(repo, "[capture]\ninclude-packages = true\n")
    result = run_capsula("capture", cwd=repo, env={**os.environ, "PYTHONPATH": str(site)})
    packages = load(Path(result.stdout.decode().strip()) / "context.json")["packages"]
    assert packages["fake-dep"] == {"name": "fake-dep", "version": "1.2.3"}
    assert (
        packages["my-editable"]["editable"] is True and packages["my-editable"]["source"] == "https://example.com/src"
    )


def test_cpu_and_platform_facts_are_cached_per_boot_and_the_clock_is_fresh(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPSULA_CACHE_DIR")  # the default place: .capsula_cache in the root
    if capsula.read_boot_id() is None:
        pytest.skip("no boot id on this system")
    write_config(repo, "[capture]\ninclude-cpu = true\n")
    first = load(capture(repo) / "context.json")
    (cache_file,) = (repo / ".capsula_cache").glob("host-*.json")  # outside the vault
    cached = load(cache_file)
    assert cached["platform"] == first["platform"]
    cached["platform"]["release"] = "from-the-cache"
    if "cpu" in cached:
        cached["cpu"]["brand_raw"] = "from-the-cache"
        cached["cpu"]["hz_actual"] = [1, 0]
    cache_file.write_text(json.dumps(cached))
    second = load(capture(repo) / "context.json")
    assert second["platform"]["release"] == "from-the-cache"  # read from the cache, not recomputed
    if "cpu" in cached:
        assert second["cpu"]["brand_raw"] == "from-the-cache"
        assert second["cpu"].get("hz_actual") != [1, 0]  # the current clock is read fresh
    assert cache_file.stat().st_mode & 0o777 == 0o600
    cache_file.chmod(0o664)  # another user could have written it (a shared CAPSULA_CACHE_DIR): not read
    assert load(capture(repo) / "context.json")["platform"]["release"] == first["platform"]["release"]
    cache_file.write_text(json.dumps(cached))
    cached["key"] = "another boot"
    cache_file.write_text(json.dumps(cached))
    third = load(capture(repo) / "context.json")
    assert third["platform"]["release"] == first["platform"]["release"]  # another key: recomputed


def test_no_file_or_uname_spawned_once_facts_are_cached(repo: Path, tmp_path: Path) -> None:
    if capsula.read_boot_id() is None:
        pytest.skip("no boot id on this system")
    bin_dir, log = tmp_path / "bin", tmp_path / "spawned.log"
    bin_dir.mkdir()
    for tool in ("file", "uname"):
        fake = bin_dir / tool
        fake.write_text(f"#!/bin/sh\necho {tool} >> {log}\necho unknown\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    write_config(repo, "[capture]\ninclude-cpu = false\n")  # py-cpuinfo's probe spawns `file` itself
    assert run_capsula("capture", cwd=repo, env=env).returncode == 0
    first = log.read_text().split() if log.exists() else []
    assert "file" not in first  # platform.architecture() is not used: no `file` spawn
    log.unlink(missing_ok=True)
    assert run_capsula("capture", cwd=repo, env=env).returncode == 0
    assert not log.exists()  # the second capture spawns neither


def test_git_output_larger_than_a_pipe_is_read_whole(repo: Path) -> None:
    # git status lists each untracked file: far more than a pipe holds while git waits.
    names = [f"untracked-{i:05d}-{'x' * 40}.txt" for i in range(2000)]
    (repo / "many").mkdir()
    for name in names:
        (repo / "many" / name).write_text(name)
    result = run_capsula("capture", cwd=repo)
    assert result.returncode == 0, result.stderr
    entry = load(only_capsule(repo / "vault") / "context.json")["git"]["project"]
    assert sorted(entry["untracked"]) == [f"many/{n}" for n in names]


def test_git_without_memfd_uses_pipes(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no memfd_create (not Linux), git's output comes through subprocess's pipes."""
    (repo / "new.txt").write_text("untracked\n")
    (repo / "data.txt").write_text("changed\n")
    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.chdir(repo)
    capsule = capsula.capture(capsula.load_config(repo))
    entry = load(capsule.path / "context.json")["git"]["project"]
    patch = (capsule.path / "project.diff").read_text()
    assert entry["dirty"] and entry["untracked"] == ["new.txt"]
    assert "+untracked" in patch and "+changed" in patch


def test_a_clean_tree_costs_three_git_calls_started_together(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []

    def runner(args: list[str], **options: Any) -> Any:
        assert options["cwd"] == repo  # git starts in its repository, as `cd repo && git ...`
        events.append(("start", args[1]))  # git <subcommand>
        finish = capsula.start_process(args, **options)

        def wait() -> Any:
            events.append(("wait", args[1]))
            return finish()

        return wait

    monkeypatch.chdir(repo)
    capsule = capsula.capture(capsula.load_config(repo), runner=runner)
    calls = ["status", "rev-parse", "config"]
    assert events == [("start", c) for c in calls] + [("wait", c) for c in calls]
    assert load(capsule.path / "context.json")["git"]["project"]["dirty"] is False


def test_git_started_outside_our_working_directory_is_reaped_by_capsula_alone(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")  # git starts in the root: through subprocess, not posix_spawn
    config = capsula.load_config(repo)
    for _ in range(12):
        capsule = capsula.capture(config)
        gc.collect()  # a collected Popen must not reap the next capture's git before Capsula does
        assert load(capsule.path / "context.json")["git"]["project"]["branch"] == "main"


@pytest.mark.parametrize("how", ["vault-is-root", "root-through-link", "decorator-through-link"])
def test_the_vault_is_never_in_a_diff_and_the_root_is_its_real_path(repo: Path, tmp_path: Path, how: str) -> None:
    link = tmp_path / "link"
    link.symlink_to(repo)
    if how == "vault-is-root":
        write_config(repo, "[capture]\nvault-directory = '.'\n")
    (repo / "untracked.txt").write_text("mine\n")
    capsules: list[Path] = []
    (repo / "job.py").write_text("import capsula\n\n@capsula.monitor\ndef job() -> int:\n    return 1\n")
    git(repo, "add", "job.py")
    git(repo, "commit", "-qm", "job")
    capsules = []
    for _ in range(3):
        if how == "decorator-through-link":  # the function's source file is found through the link
            code = f"import sys; sys.path.insert(0, {str(link)!r}); import job; job.job()"
            subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}
            )
            capsules = sorted((repo / "vault").iterdir())
        else:
            result = run_capsula("capture", "-C", str(link), cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            capsules.append(Path(result.stdout.decode().strip()))
    vault = repo if how == "vault-is-root" else repo / "vault"
    assert len(capsules) == 3
    for capsule in capsules:
        assert capsule.parent == vault  # by its real path
        diff = (capsule / "project.diff").read_text()
        assert "untracked.txt" in diff and "context.json" not in diff and "capsule.json" not in diff
        context = load(capsule / "context.json")
        assert context["root_directory"] == str(repo) and list(context["git"]) == ["project"]
        assert not [u for u in context["git"]["project"]["untracked"] if "capsule" in u or "context" in u]


def test_listed_files_take_variables_and_globs(repo: Path) -> None:
    (repo / "runs").mkdir()
    for name in ("a.cfg", "b.cfg"):
        (repo / "runs" / name).write_text(name)
    (repo / "seed_7.txt").write_text("7\n")
    write_config(repo, '[capture.files]\n"runs/*.cfg" = {}\n"seed_${SEED}.txt" = { move = true }\n')
    result = run_capsula("capture", cwd=repo, env={**os.environ, "SEED": "7"})
    assert result.returncode == 0, result.stderr
    capsule = Path(result.stdout.decode().strip())
    files = load(capsule / "context.json")["files"]
    assert set(files) == {"runs/a.cfg", "runs/b.cfg", "seed_7.txt"}
    assert (capsule / "seed_7.txt").read_text() == "7\n" and not (repo / "seed_7.txt").exists()
    assert "seed_7.txt" not in (capsule / "project.diff").read_text()  # moved: not diffed


def test_untracked_files_have_a_total_budget_beyond_which_they_are_listed_by_hash(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(capsula, "UNTRACKED_TOTAL", 250_000)
    for i in range(5):
        (repo / f"big{i}.bin").write_bytes(bytes([i]) * 100_000)
    capsule = capsula.capture(capsula.load_config(repo), cwd=repo)
    git_entry = load(capsule.path / "context.json")["git"]["project"]
    diffed = [f"big{i}.bin" for i in range(5) if f"big{i}.bin" not in git_entry["too_large"]]
    assert len(diffed) == 2 and set(git_entry["too_large"]) == {f"big{i}.bin" for i in range(5)} - set(diffed)
    for name, facts in git_entry["too_large"].items():
        assert facts == {"size": 100_000, "sha256": hashlib.sha256((repo / name).read_bytes()).hexdigest()}
    patch = (capsule.path / "project.diff").read_text()
    assert all(f"b/{name}" in patch for name in diffed) and not any(f"b/{n}" in patch for n in git_entry["too_large"])
    assert "untracked files too large for project.diff, recorded by hash" in capsys.readouterr().err


def test_an_untracked_file_deleted_while_git_reads_the_tree_does_not_spoil_the_record(repo: Path) -> None:
    """Another process (or Capsula making its own cache folder) may delete a file between git
    status and the diff: the capture is complete, and the diff holds the tree as it then is."""
    (repo / "tmp-of-another-tool.txt").write_text("short-lived\n")
    (repo / "notes.txt").write_text("kept\n")

    def runner(args: list[str], **options: Any) -> Any:
        if args[1] == "add":  # after git status listed it, before the diff
            (repo / "tmp-of-another-tool.txt").unlink(missing_ok=True)
        return capsula.start_process(args, **options)

    capsule = capsula.capture(capsula.load_config(repo), runner=runner)
    assert load(capsule.path / "capsule.json")["status"] == "completed"
    diff = (capsule.path / "project.diff").read_text()
    assert "notes.txt" in diff and "short-lived" not in diff


@pytest.mark.parametrize("when", ["after status", "while git adds"])
def test_a_file_made_after_git_status_listed_a_directory_never_enters_the_diff(
    repo: Path, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory of untracked files is handed to git whole (faster than file by file), but
    never a file made after git status listed it: the diff holds what the record lists, and
    a secret made there in that moment stays out."""
    import time

    (repo / ".gitignore").write_text("vault/\n")
    for i in range(5):
        (repo / "results" / "run").mkdir(parents=True, exist_ok=True)
        (repo / "results" / "run" / f"r{i}.txt").write_text(f"row {i}\n")
    time.sleep(2 * capsula.TICK)  # older than the capture: a directory is given whole only then

    def runner(args: list[str], **options: Any) -> Any:
        finish = capsula.start_process(args, **options)
        if args[1] == "add" and when == "while git adds":
            (repo / "results" / "run" / ".env").write_text("TOKEN=s3cret\n")
        if args[1] != "status" or when != "after status":
            return finish

        def wait() -> Any:
            done = finish()
            (repo / "results" / ".env").write_text("TOKEN=s3cret\n")
            return done

        return wait

    monkeypatch.chdir(repo)
    capsule = capsula.capture(capsula.load_config(repo), runner=runner)
    entry = load(capsule.path / "context.json")["git"]["project"]
    patch = (capsule.path / "project.diff").read_text()
    assert entry["untracked"] == [".gitignore", *(f"results/run/r{i}.txt" for i in range(5))]
    assert all(f"+row {i}" in patch for i in range(5)) and "s3cret" not in patch and ".env" not in patch
    clean = repo.parent / "clean"
    git(repo.parent, "clone", "-q", str(repo), str(clean))
    git(clean, "apply", "--binary", str(capsule.path / "project.diff"))
    assert (clean / "results" / "run" / "r4.txt").read_text() == "row 4\n" and not list(clean.rglob(".env"))


def test_the_cache_folder_appears_already_ignoring_itself(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPSULA_CACHE_DIR")
    cache = capsula.cache_directory(repo, {})
    assert cache == repo / ".capsula_cache" and (cache / ".gitignore").read_text().startswith("*\n")
    assert not git(repo, "status", "--porcelain", "--untracked-files=all").strip()
    assert [p.name for p in repo.iterdir() if p.name.startswith(".capsula")] == [".capsula_cache"]
