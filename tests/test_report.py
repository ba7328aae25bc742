"""capsula report: one self-contained HTML page of the vault, rendered for real by headless
Chromium (Debian's chromium package; .ci/run installs it where it can)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_capsula, write_config

import capsula

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here: .ci/run installs Debian's chromium as root")


def rendered(page: Path, fragment: str = "") -> str:
    """The page's DOM once its script ran, as Chromium renders it from disk."""
    assert CHROMIUM is not None
    args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom", f"{page.as_uri()}{fragment}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout


def vault_with_runs(repo: Path) -> list[str]:
    write_config(repo, '[capture]\ninclude-cpu = false\n[monitor.item.model.files]\n"model.txt" = {}\n')
    runs = [
        ["-i", "model", sys.executable, "-c", "open('model.txt', 'w').write('a'); print('epoch 1 loss 0.5')"],
        [sys.executable, "-c", "import sys; sys.exit('diverged')"],
        [sys.executable, "-c", "print('</script><script>document.title = \"owned\"</script>')"],
    ]
    for args in runs:
        run_capsula("monitor", "-q", *args, cwd=repo)
    return sorted(p.name for p in (repo / "vault").iterdir())


def test_the_report_needs_nothing_but_itself(repo: Path) -> None:
    vault_with_runs(repo)
    out = run_capsula("report", "-o", "report.html", cwd=repo)
    assert out.returncode == 0 and out.stdout.decode().strip() == "report.html"
    page = (repo / "report.html").read_text()
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page)  # no external script, font or style
    assert "@import" not in page and "url(" not in page
    assert page.count("</script") == 2  # a capsule's text cannot end a script element


@browser
def test_the_report_in_a_browser_lists_filters_shows_and_compares(repo: Path) -> None:
    names = vault_with_runs(repo)
    assert run_capsula("report", "-o", "report.html", cwd=repo).returncode == 0
    page = repo / "report.html"
    dom = rendered(page)
    assert "3 of 3 capsules" in dom and all(name in dom for name in names)
    assert "<title>Capsula report" in dom and "owned" not in dom.split("</title>")[0]  # the capsule's script never ran
    assert dom.count("<svg") == 2 and "run time (max" in dom and "peak memory (max" in dom
    failed = rendered(page, "#status=failed")
    assert "1 of 3 capsules" in failed and "diverged" not in failed.split("<tbody>")[0]
    assert rendered(page, "#q=sys.exit").count("<tr class=") == 1  # by command
    assert "1 of 3 capsules" in rendered(page, "#q=model")  # by item
    detail = rendered(page, f"#capsule={names[0]}")
    assert f"capsule {names[0]}" in detail and "epoch 1 loss 0.5" in detail and "model.txt" in detail
    compared = rendered(page, f"#compare={names[0]},{names[1]}")
    assert f"{names[0]} and {names[1]} side by side" in compared and 'class="differs"' in compared
    ordered = rendered(page, "#sort=started").split("<tbody>")[1]
    assert ordered.index(f">{names[0]}<") < ordered.index(f">{names[2]}<")  # oldest first
    newest = dom.split("<tbody>")[1]
    assert newest.index(f">{names[2]}<") < newest.index(f">{names[0]}<")  # newest first by default


@browser
@pytest.mark.stress
def test_the_report_stays_readable_with_10000_capsules(tmp_path: Path) -> None:
    one = {"kind": "command", "status": "completed", "exit_code": 0, "run_time": 1.5, "git": {"p": {"sha": "ab" * 20}}}
    one |= {"rerun_of": None, "items": ["train"], "max_rss": 2**27}
    details = {"context": {"cwd": "/x"}, "run": {"exit_code": 0}, "outputs": {}, "stdout": "x" * 2000, "stderr": ""}
    entries = [
        one
        | {"name": f"run_{i:05d}", "started": f"2026-01-{1 + i % 28:02d}T10:{i % 60:02d}:00+00:00"}
        | {"command": f"python train.py --seed {i}", "details": details}
        for i in range(10_000)
    ]
    page = tmp_path / "big.html"
    page.write_text(capsula.report_html(entries, vault=tmp_path))
    assert page.stat().st_size < 40 << 20
    dom = rendered(page)
    assert "10000 match; the first 1000 are shown" in dom and dom.count("<tr class=") == 1000
    assert "1 of 10000 capsules" in rendered(page, "#q=--seed 9999")
