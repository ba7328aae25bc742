"""@capsula.monitor and capsula.capture() in a Jupyter notebook, executed for real by nbclient
in an ipykernel kernel."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import CAPSULA, load, write_config

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the test extra (nbclient)")
pytest.importorskip("ipykernel", reason="the notebook tests need the test extra (ipykernel)")

CELLS = [
    "import capsula",
    "@capsula.monitor(directory='.', include_return_value=True)\ndef train(steps):\n    return steps * 2",
    "train(21)",
    "capsule = capsula.capture(capsula.load_config('.'))\nprint(capsule.path)",
]


def run_notebook(repo: Path, cells: list[str], **env: str) -> Path:
    """Save a notebook in repo and run it in a real kernel, as Jupyter Server runs one."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    path = repo / "analysis.ipynb"
    nbformat.write(nb, path)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(repo)}}
    )
    pythonpath = os.pathsep.join(filter(None, [str(CAPSULA.parent), os.environ.get("PYTHONPATH")]))
    outer = {k: v for k, v in os.environ.items() if k != "JPY_SESSION_NAME"}
    client.execute(env={**outer, "PYTHONPATH": pythonpath, **env})
    return path


def test_a_notebooks_function_and_capture_record_the_notebook(repo: Path) -> None:
    write_config(repo, "[capture]\ninclude-cpu = false\n")
    # Jupyter Server gives the kernel the notebook's path relative to its root, and runs it in the notebook's folder
    notebook = run_notebook(repo, CELLS, JPY_SESSION_NAME="work/analysis.ipynb")
    saved = hashlib.sha256(notebook.read_bytes()).hexdigest()
    capsules = sorted((repo / "vault").iterdir(), key=lambda c: load(c / "capsule.json")["started"])
    function, captured = capsules
    pre = load(function / "pre-run-info.json")
    assert pre["source_file"] == str(notebook) and pre["function_name"] == "train"
    assert pre["function_source"].startswith("@capsula.monitor(") and "return steps * 2" in pre["function_source"]
    assert load(function / "post-run-info.json")["return_value"] == 42
    for capsule in (function, captured):
        recorded = load(capsule / "context.json")["notebook"]
        assert recorded == {
            "path": str(notebook),
            "hash_algorithm": "sha256",
            "file_hash": saved,
            "stored_as": "notebook/analysis.ipynb",
        }
        assert (capsule / "notebook" / "analysis.ipynb").read_bytes() == notebook.read_bytes()


def test_a_kernel_that_does_not_know_its_notebook_says_so(repo: Path) -> None:
    run_notebook(repo, CELLS[:3])
    (capsule,) = (repo / "vault").iterdir()
    notebook = load(capsule / "context.json")["notebook"]
    assert notebook["path"] is None and "JPY_SESSION_NAME" in notebook["unavailable"]
    pre = load(capsule / "pre-run-info.json")
    assert pre["source_file"].endswith("(a notebook cell)") and "def train" in pre["function_source"]
    assert load(capsule / "capsule.json")["status"] == "completed"
