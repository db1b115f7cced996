"""bench/gpu.py, the GPU path's one prepared run (issue 19), in its tiny CPU mode: every section
runs here, so the script works the day a GPU box is at hand."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_script_runs_every_section_on_cpu_at_toy_sizes():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for section in ("1. CPU", "2. fp32: torch.mm", "2. bf16: torch.mm", "3. harvest", "4. loader,  1 fetch threads",
                    "4. loader,  2 fetch threads", "5. sae-train"):
        assert any(line.startswith(section) for line in lines), (section, run.stdout)
    for sae in ("trainer ReLU + L1", "trainer TopK k=32"):  # a step in fp32 and one under bf16 autocast
        assert sum(sae in line and "tok/s" in line for line in lines) == 2, run.stdout
