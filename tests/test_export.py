"""capsula export --ro-crate: capsules as RO-Crates that the RO-Crate community's validator
(roc-validator) finds conformant to the Process Run Crate profile 0.5. The validator fetches
the RO-Crate JSON-LD context from the web; here it is served from the copy that the rocrate
package ships."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import REFERENCE_VAULT, load, run_capsula, write_config

import capsula

rocrate = pytest.importorskip("rocrate", reason="the RO-Crate tests need the test extra (rocrate)")
services = pytest.importorskip("rocrate_validator.services", reason="the RO-Crate tests need roc-validator")
models = pytest.importorskip("rocrate_validator.models")
http = pytest.importorskip("rocrate_validator.utils.http")
requests = pytest.importorskip("requests")

CONTEXT = "https://w3id.org/ro/crate/1.1/context"


@pytest.fixture(autouse=True)
def _context_served_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    local = (Path(rocrate.__file__).parent / "data" / "ro-crate.jsonld").read_bytes()

    def get(self: object, url: str, **_: object) -> Any:
        response = requests.models.Response()
        response.url = url
        response.status_code, response._content = (200, local) if url.rstrip("/") == CONTEXT else (404, b"")
        response.headers["Content-Type"] = "application/ld+json"
        return response

    monkeypatch.setattr(http.HttpRequester, "get", get, raising=False)  # it hands get to its session
    monkeypatch.setattr(http.HttpRequester, "head", get, raising=False)


def problems(crate: Path) -> list[str]:
    """What roc-validator finds wrong at the REQUIRED level of process-run-crate-0.5."""
    settings = services.ValidationSettings(
        rocrate_uri=str(crate),
        profile_identifier="process-run-crate-0.5",
        requirement_severity=models.Severity.REQUIRED,
    )
    result = services.validate(settings)
    return [issue.message for issue in result.get_issues()]


def exported(repo: Path, capsule: str, dest: Path) -> dict[str, Any]:
    result = run_capsula("export", capsule, "--ro-crate", str(dest), cwd=repo)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == str(dest)
    assert problems(dest) == []
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest) as z:
            return dict(json.loads(z.read("ro-crate-metadata.json")))
    return dict(load(dest / "ro-crate-metadata.json"))


def entities(crate: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["@id"]: e for e in crate["@graph"]}


def test_a_command_capsule_is_a_process_run_crate(repo: Path, tmp_path: Path) -> None:
    write_config(repo, '[capture.files]\n"data.txt" = { copy = true }\n[monitor.item.out.files]\n"out.txt" = {}\n')
    code = "open('out.txt', 'w').write(open('data.txt').read().upper())"
    assert run_capsula("monitor", "-q", "-i", "out", sys.executable, "-c", code, cwd=repo).returncode == 0
    crate = entities(exported(repo, "latest", tmp_path / "crate"))
    run = crate["#run"]
    assert run["@type"] == "CreateAction" and run["actionStatus"] == "http://schema.org/CompletedActionStatus"
    assert crate[run["instrument"]["@id"]]["@type"] == "SoftwareApplication" and "error" not in run
    assert run["startTime"] <= run["endTime"] and crate["./"]["conformsTo"]["@id"] == capsula.PROCESS_RUN_CRATE
    data = crate[run["object"]["@id"]]  # stored in the capsule (copy = true): a File of the crate
    assert data["@type"] == "File" and data["name"] == "data.txt" and (tmp_path / "crate" / data["@id"]).is_file()
    out = crate[run["result"]["@id"]]
    assert (
        out["name"] == "out.txt"
        and out["sha256"]
        == load(repo / "vault" / out_capsule(repo) / "post-run-info.json")["files"]["out.txt"]["file_hash"]
    )
    sha = load(repo / "vault" / out_capsule(repo) / "context.json")["git"]["project"]["sha"]
    assert crate["#git:project"]["version"] == sha
    broken = load(tmp_path / "crate" / "ro-crate-metadata.json")  # the validator is not a rubber stamp
    del next(e for e in broken["@graph"] if e["@id"] == "#run")["instrument"]
    (tmp_path / "crate" / "ro-crate-metadata.json").write_text(json.dumps(broken))
    assert any("instrument" in problem for problem in problems(tmp_path / "crate"))


def out_capsule(repo: Path) -> str:
    (name,) = [p.name for p in (repo / "vault").iterdir()]
    return name


def test_a_failed_run_and_a_function_are_process_run_crates(repo: Path, tmp_path: Path) -> None:
    assert run_capsula("monitor", "-q", sys.executable, "-c", "raise SystemExit(3)", cwd=repo).returncode == 3
    failed = entities(exported(repo, "latest", tmp_path / "failed.zip"))
    assert failed["#run"]["actionStatus"] == "http://schema.org/FailedActionStatus" and failed["#run"]["error"]

    @capsula.monitor(directory=repo)
    def train(steps: int) -> int:
        return steps * 2

    assert train(21) == 42
    function = entities(exported(repo, "latest", tmp_path / "function"))
    assert function["#function"]["@type"] == "SoftwareApplication" and "train" in function["#function"]["name"]
    assert function["#function"]["softwareVersion"] == function["#git:project"]["version"]


def test_a_0_0_19_capsule_is_a_process_run_crate(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    shutil.copytree(REFERENCE_VAULT, vault)
    names = sorted(p.name for p in vault.iterdir() if (p / "post-run-info.json").is_file())
    result = run_capsula("export", "--vault", str(vault), names[0], "--ro-crate", str(tmp_path / "old"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert problems(tmp_path / "old") == []


def test_ro_crate_true_makes_every_capsule_a_crate_as_it_is_made(repo: Path) -> None:
    write_config(repo, "[capture]\nro-crate = true\n")
    assert run_capsula("monitor", "-q", "true", cwd=repo).returncode == 0
    assert run_capsula("capture", cwd=repo).returncode == 0
    for capsule in (repo / "vault").iterdir():
        assert problems(capsule) == []


def test_an_export_never_overwrites_nor_follows_a_capsules_links(repo: Path, tmp_path: Path) -> None:
    assert run_capsula("capture", cwd=repo).returncode == 0
    (capsule,) = (repo / "vault").iterdir()
    (tmp_path / "secret.txt").write_text("not for export\n")
    (capsule / "notes.txt").symlink_to(tmp_path / "secret.txt")  # a capsule edited by someone else
    (capsule / "more").symlink_to(tmp_path, target_is_directory=True)
    crate = tmp_path / "crate.zip"
    assert run_capsula("export", "latest", "--ro-crate", str(crate), cwd=repo).returncode == 0
    with zipfile.ZipFile(crate) as z:
        assert not any("notes" in n or n.startswith("more") for n in z.namelist())
        assert b"not for export" not in b"".join(z.read(n) for n in z.namelist())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep\n")
    result = run_capsula("export", "latest", "--ro-crate", str(tmp_path / "taken"), cwd=repo)
    assert result.returncode == 2 and b"not an empty folder" in result.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
