"""Issue 36: the docs site builds with every link and page checked (``mkdocs build --strict``),
its sweep-file reference is generated from the config classes (every field documented there),
and the notebook page's code runs as written."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from trainer.config import RunConfig, SAEConfig
from trainer.config_docs import field_docs

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_docstring_and_the_cli_help_prints_it():
    for cls in (RunConfig, SAEConfig):
        missing = [name for name, doc in field_docs(cls).items() if len(doc) < 10]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    assert field_docs(SAEConfig)["skip"].startswith("A transcoder's linear skip path")
    help_text = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "overrides [run] tokens: Training tokens per SAE" in " ".join(help_text.split())


def test_the_docs_site_builds_strict_with_the_generated_reference(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
                           capture_output=True, text=True, cwd=ROOT)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    reference = (site / "sweep-file" / "index.html").read_text()
    for cls in (RunConfig, SAEConfig):
        for f in dataclasses.fields(cls):
            assert f"<code>{f.name}</code>" in reference, f.name
    assert "sweep-file-reference" not in reference and "Reading this file" not in reference  # the block was replaced
    assert "fonts.googleapis" not in (site / "index.html").read_text()  # served offline
    assert (site / "api" / "index.html").read_text().count("trainer.api.Cache") > 1  # mkdocstrings rendered it
    # the cache server serves the built site, offline, as it serves /docs
    from tests.server import ServerProcess, free_port

    server = ServerProcess(store=tmp_path / "store", port=free_port(), extra_args=["--guide-dir", str(site)]).start()
    try:
        with server.client() as client:
            assert "Training SAEs" in client.get("/guide/", follow_redirects=True).text
            assert "<code>l1_coefficient</code>" in client.get("/guide/sweep-file/").text
            assert client.get("/guide/nowhere/").status_code == 404
    finally:
        server.stop()


def test_the_notebook_page_runs_as_written(tmp_path):
    """docs/python.md's code blocks, in order, in one fresh interpreter (a notebook's kernel)."""
    page = (ROOT / "docs" / "python.md").read_text()
    code = "\n\n".join(re.findall(r"```python\n(.*?)```", page, re.S))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f]{24} 65536 192", lines[0]), lines
    assert sum(line.startswith("topk-vanilla-x8-k") for line in lines) == 2
    assert re.search(r"CE loss score 0\.\d{3}, KL", run.stdout) and "/saes/" in lines[-1]
    assert "epochs" not in run.stdout + run.stderr  # the page's budget fits its harvest
