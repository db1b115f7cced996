"""The README's main job, small: harvest the shipped causal LM, train the default sweep, evaluate each SAE
spliced into the model, print the table, write the report."""

import json
import subprocess
import sys


def run_pipeline(out) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "trainer.pipeline", "--out", str(out), "--tokens", "24000", "--train-tokens", "20480",
            "--downstream-tokens", "2048"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                "HF_HUB_OFFLINE": "1"})


def test_pipeline_runs_end_to_end_and_the_second_run_is_a_cache_hit(tmp_path):
    first = run_pipeline(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    table = first.stdout.split("sae ")[-1].splitlines()
    rows = [line.split() for line in table if line.startswith(("relu-", "topk-"))]
    assert len(rows) == 6 and "CE score" in first.stdout
    assert "training: 6 SAE(s) together at" in first.stdout  # one rate: they share every batch
    for row in rows:  # sae, L0, FVU, dead %, CE score, KL: every SAE scored downstream
        score, kl = float(row[4]), float(row[5])
        assert 0 < score < 1.05 and kl > 0, row
    assert (tmp_path / "train" / "eval.json").exists() and (tmp_path / "train" / "curves.png").exists()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| SAE | L0 | FVU | dead % | CE loss score | KL |" in report and "trained together on every batch" in report and "### Feature" in report and "«" in report
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 1000
    cfg = json.loads(next((tmp_path / "train" / "saes").glob("topk-*/cfg.json")).read_text())
    # the pipeline's own server is gone after the run: its port is not written as the dataset's place
    assert cfg["metadata"]["dataset_path"] is None and len(cfg["metadata"]["dataset_id"]) == 24
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<table>" in html and "<mark>" in html and (tmp_path / "report" / "curves.png").exists()
    second = run_pipeline(tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cache hit" in second.stdout


def test_ctrl_c_stops_the_server_it_started(tmp_path):
    import signal
    import time

    args = [sys.executable, "-m", "trainer.pipeline", "--out", str(tmp_path), "--tokens", "200000"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    log = tmp_path / "cache-server.log"
    deadline = time.monotonic() + 180
    while "POST /v1/harvests" not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    server_pid = int(log.read_text().split("Started server process [")[1].split("]")[0])
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    try:
        __import__("os").kill(server_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the cache server outlived the pipeline"


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    """No harvest, no server, nothing written: one error line and exit 2 (issue 16)."""
    sae_run = tmp_path / "a-sae-train-run"
    sae_run.mkdir()
    (sae_run / "run.json").write_text("{}")
    cases = [(["--train-tokens", "0"], "argument --train-tokens: must be positive, got 0"),
             (["--tokens", "-5"], "argument --tokens: must be positive, got -5"),
             (["--train-tokens", "100"], "--train-tokens 100 is less than one batch of 1024"),
             (["--out", str(sae_run)], "is not a sae-pipeline folder")]
    for extra, message in cases:
        out = ["--out", str(tmp_path / "new")] if "--out" not in extra else []
        result = subprocess.run([sys.executable, "-m", "trainer.pipeline", *out, *extra], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists() and sorted(p.name for p in sae_run.iterdir()) == ["run.json"]


def test_ctrl_c_during_training_checkpoints_and_the_next_run_continues(tmp_path):
    """Issue 16: the first Ctrl-C stops after the step and saves; running again picks up there."""
    import json
    import os
    import signal
    import time

    args = [sys.executable, "-m", "trainer.pipeline", "--out", str(tmp_path), "--tokens", "24000",
            "--train-tokens", "61440", "--downstream-tokens", "1024"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "checkpoint saved; run again to continue from it" in stderr
    assert (tmp_path / "train" / "checkpoint.pt").exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    per_sae = len({json.loads(line)["sae"] for line in metrics.read_text().splitlines()})
    assert len(steps) == len(set(steps)) * per_sae and max(steps) == 60  # no step trained twice, all trained


def test_the_default_budget_fits_the_corpus(tmp_path):
    """The default harvest leaves enough of the built-in corpus for the default downstream tokens."""
    import torch

    from cache_server.corpora import CorpusStore
    from cache_server.models import ModelRegistry
    from trainer.pipeline import DEFAULT_MODEL, parse_args

    args = parse_args([])
    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(DEFAULT_MODEL)
    corpora = CorpusStore(tmp_path, 1 << 30)
    stream = corpora.tokens(corpora.resolve("default"), model.tokenizer, model.info.fingerprint, model.separator_token_id)
    body = args.context_size - 1  # BOS leads every window
    harvested = -(-args.tokens // args.context_size) * body
    assert len(stream) - harvested >= -(-args.downstream_tokens // args.context_size) * body
    assert args.train_tokens <= args.tokens
