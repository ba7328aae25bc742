"""capsula lineage and rerun --upstream: the chain of capsules that produced a file, found from
recorded hashes alone, on a three-step pipeline run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import git, run_capsula, write_config

STEPS = {
    "prepare": "open('data/clean.csv', 'w').write(open('data/raw.csv').read().upper())",
    "train": "import os; open('model.txt', 'w').write(str(len(open('data/clean.csv').read())) + os.environ['SEED'])",
    "plot": "open('figure.txt', 'w').write('model ' + open('model.txt').read())",
}
OUTPUTS = {"prepare": "data/clean.csv", "train": "model.txt", "plot": "figure.txt"}


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def pipeline(repo: Path) -> dict[str, str]:
    """Run prepare, train and plot; the capsule of each, by step."""
    items = "".join(f'[monitor.item.{s}.files]\n"{out}" = {{}}\n' for s, out in OUTPUTS.items())
    inputs = '[capture.files]\n"data/raw.csv" = {}\n"data/clean.csv" = {}\n"model.txt" = {}\n'
    write_config(repo, f"[capture]\ninclude-cpu = false\n{inputs}{items}")
    (repo / "data").mkdir()
    (repo / "data" / "raw.csv").write_text("a,b\n1,2\n")
    (repo / ".gitignore").write_text("vault/\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "pipeline")
    made = {}
    for step, code in STEPS.items():
        ok(run_capsula("monitor", "-q", "-i", step, sys.executable, "-c", code, cwd=repo, env=seeded("1")))
        made[step] = json.loads(ok(run_capsula("list", "--json", cwd=repo)))[0]["name"]
    return made


def seeded(seed: str) -> dict[str, str]:
    """The environment with SEED, which the train step reads and no capsule records."""
    return {**os.environ, "SEED": seed}


def test_lineage_of_a_file_goes_back_to_inputs_no_capsule_produced(repo: Path) -> None:
    made = pipeline(repo)
    tree = ok(run_capsula("lineage", "figure.txt", cwd=repo)).splitlines()
    assert tree[0].startswith(f"figure.txt  <- {made['plot']}  completed  git ") and tree[0].endswith(STEPS["plot"])
    text = "\n".join(tree)
    assert f"model.txt  <- {made['train']}  completed" in text
    assert f"data/clean.csv  <- {made['prepare']}  completed" in text
    assert "data/raw.csv  (no capsule produced it)" in text
    data = json.loads(ok(run_capsula("lineage", "figure.txt", "--json", cwd=repo)))
    plot = data["produced_by"]
    assert data["file"] == "figure.txt" and plot["capsule"] == made["plot"]
    by_path = {i["path"]: i for i in plot["inputs"]}
    assert by_path["model.txt"]["produced_by"]["capsule"] == made["train"]
    assert by_path["data/raw.csv"]["produced_by"] is None
    dot = ok(run_capsula("lineage", made["plot"], "--dot", cwd=repo))
    assert dot.startswith("digraph lineage {") and f'"capsule:{made["train"]}" -> "file:model.txt@' in dot


def test_a_file_no_capsule_made_names_the_nearest_candidates(repo: Path) -> None:
    made = pipeline(repo)
    (repo / "model.txt").write_text("edited by hand\n")
    result = run_capsula("lineage", "model.txt", cwd=repo)
    said = result.stderr.decode()
    assert result.returncode == 1 and "no capsule produced model.txt as it is now" in said
    assert f"{made['train']} recorded model.txt" in said  # the closest candidate, by path


def test_rerun_upstream_repeats_the_chain_and_names_the_first_step_that_differs(repo: Path) -> None:
    made = pipeline(repo)
    out = ok(run_capsula("rerun", "--upstream", made["plot"], cwd=repo, env=seeded("1"))).splitlines()
    assert [line.split()[2] for line in out[:3]] == [made["prepare"], made["train"], made["plot"]]  # oldest first
    assert all(line.split()[1] == f"{k}/3" and "reproduced identically" in line for k, line in enumerate(out[:3], 1))
    assert out[3] == f"the lineage of {made['plot']} reproduced (3 of 3 steps)"
    broken = run_capsula("rerun", "--upstream", made["plot"], cwd=repo, env=seeded("2"))
    said = broken.stdout.decode()
    assert broken.returncode == 1 and "reproduced identically" in said.splitlines()[0]  # prepare does not read SEED
    assert f"step 2/3 {made['train']}" in said and "not reproduced" in said
    assert said.rstrip().endswith(f"first failed to reproduce at step 2: {made['train']}")
    assert made["plot"] + " (" not in said  # the steps after it are not run
