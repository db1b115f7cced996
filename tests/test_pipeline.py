"""The README's main job, small: harvest the offline MiniLM, train the default sweep, print the table."""

import subprocess
import sys


def run_pipeline(out) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "trainer.pipeline", "--out", str(out), "--tokens", "24000", "--train-tokens", "20480"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                "HF_HUB_OFFLINE": "1"})


def test_pipeline_runs_end_to_end_and_the_second_run_is_a_cache_hit(tmp_path):
    first = run_pipeline(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    table = first.stdout.split("sae ")[-1].splitlines()
    assert len([line for line in table if line.startswith(("relu-", "topk-"))]) == 5
    assert (tmp_path / "train" / "eval.json").exists() and (tmp_path / "train" / "curves.png").exists()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| SAE | L0 | FVU |" in report and "### Feature" in report and "«" in report
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<table>" in html and "<mark>" in html and (tmp_path / "report" / "curves.png").exists()
    second = run_pipeline(tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cache hit" in second.stdout
