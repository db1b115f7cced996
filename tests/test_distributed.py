"""Data-parallel training: ``torchrun`` with 2 CPU ranks (gloo) against a single process, over HTTP."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_trainer_e2e import HOOKS, SWEEP, dataset, sae_train_here  # noqa: F401 (the module's dataset fixture)
from trainer.data.client import CacheClient
from trainer.data.stream import ChunkStream, StreamPosition

STEPS = 60
BATCH = 256


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_rank_exits_without_interpreter_finalization(world_size):
    """A torchrun rank skips finalization (where a gloo worker releasing a Python tensor aborts the
    process), its output flushed; a lone process exits normally. Both keep the exit code."""
    script = ("import atexit; atexit.register(print, 'finalized'); from trainer.training.distributed import exit_process; "
              "print('trained'); exit_process(3)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output to a pipe is buffered
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**env, "WORLD_SIZE": world_size})
    assert result.returncode == 3
    assert result.stdout.split() == (["trained"] if world_size == "2" else ["trained", "finalized"])


def test_a_rank_that_crashes_prints_the_traceback_and_exits_1_the_same_way():
    script = ("import atexit; atexit.register(print, 'finalized'); import trainer.cli as cli; "
              "cli.main = lambda: 1 / 0; cli.run()")  # a bug in the trainer, not bad input
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WORLD_SIZE": "2"})
    assert result.returncode == 1
    assert "ZeroDivisionError" in result.stderr and "finalized" not in result.stdout


def test_lanes_split_every_epoch_between_them(server, dataset):  # noqa: F811
    """Two lanes (two ranks' shares) see disjoint rows whose union is the epoch, every epoch."""
    with CacheClient(server.url) as client:
        lanes = [ChunkStream(client, dataset, HOOKS[:1], batch_size=100, window_rows=2048, seed=5, eval_chunks=4,
                             lane=lane, lanes=2) for lane in range(2)]
        train_rows = torch.cat([torch.arange(i * dataset.chunk_rows, i * dataset.chunk_rows + dataset.rows_in_chunk(i))
                                for i in lanes[0].train_chunk_ids])
        for epoch in range(2):
            seen = []
            for stream in lanes:
                chunks = stream.epoch_order(epoch)
                n_rows = sum(dataset.rows_in_chunk(i) for i in chunks)
                rows = []
                for batch in stream.batches(StreamPosition(epoch, 0)):
                    rows.append(batch.row_ids)
                    if sum(r.numel() for r in rows) >= n_rows:
                        break
                seen.append(torch.cat(rows)[:n_rows])
            assert not set(seen[0].tolist()) & set(seen[1].tolist())
            assert torch.equal(torch.cat(seen).sort().values, train_rows.sort().values)


def _train(server, dataset, out, tokens, lanes=None, ranks=1, resume=False, resample=0, split="data"):  # noqa: F811
    sweep = out.parent / f"{out.name}.toml"
    # No LR decay: it follows the run's budget, so the half run resumed to the whole would differ
    # (so would resampling, which stops where the decay starts or ``resample`` steps before the end).
    text = "\n".join(line for line in SWEEP.splitlines() if not line.startswith("dead_after"))
    text = text.replace("[[sae]]\n", f"[[sae]]\nlr_decay = 0\nresample_every = {resample}\ndead_after = 768\n")
    run = f"[run]\nsplit = \"{split}\"\n" + (f"lanes = {lanes}\n" if lanes else "")
    sweep.write_text(text.replace("[run]\n", run, 1))
    args = ["-m", "trainer", "--cache-url", server.url, "--dataset", dataset.dataset_id, "--hook", HOOKS[0],
            "--config", str(sweep), "--tokens", str(tokens), "--out", str(out), "--no-progress",
            "--downstream-tokens", "0", "--no-browser"]  # the run's checkpoint is what is compared
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    result = subprocess.run([sys.executable, *args, *(["--resume"] if resume else [])],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if ranks > 1:  # the run says how its ranks share the sweep
        assert f'{ranks} ranks, split = "{split}"' in result.stderr, result.stderr[-3000:]
    return torch.load(out / "checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains_under_either_split_and_resume_on_one(server, dataset, tmp_path):  # noqa: F811
    """split = "data": DDP, each rank a lane. split = "saes": rank r trains SAE r on whole batches
    (both lanes), the checkpoint gathered on rank 0. Either way one process's SAEs, and a run
    half-trained on 2 ranks resumes on one."""
    tokens = STEPS * BATCH
    # Resampling every 5 steps: rank 0 draws from every rank's rows, as one process with 2 lanes does.
    resampled = _train(server, dataset, tmp_path / "resampled", tokens, lanes=2, resample=5)
    ranks = _train(server, dataset, tmp_path / "ranks", tokens, ranks=2, resample=5)  # lanes = world size
    single = _train(server, dataset, tmp_path / "single", tokens, lanes=2)
    # No resampling from here: the half run's budget would move its last resample.
    _train(server, dataset, tmp_path / "mixed", tokens // 2, ranks=2)
    mixed = _train(server, dataset, tmp_path / "mixed", tokens, resume=True)  # lanes from the checkpoint
    # Its checkpoint, gathered on rank 0, is one process's format: resuming it on one process is the
    # "mixed" case's load (so not run again here).
    by_saes = _train(server, dataset, tmp_path / "by-saes", tokens, lanes=2, ranks=2, split="saes")
    assert not torch.equal(resampled["saes"][1]["model"]["W_dec"], single["saes"][1]["model"]["W_dec"])  # it resampled
    for reference, other in ((resampled, ranks), (single, mixed), (single, by_saes)):
        assert other["step"] == reference["step"] == STEPS and other["lanes"] == 2
        assert other["positions"] == reference["positions"]  # the same rows, lane by lane
        for a, b in zip(reference["saes"], other["saes"], strict=True):
            assert torch.equal(a["tokens_since_fired"], b["tokens_since_fired"])
            for name, x in a["model"].items():
                # Summed half-batch gradients round differently from one batch's; over the run a ReLU's
                # latents near 0 amplify that to ~2e-4 on some CPUs (seen on one, not on another).
                # Wrong rows or a missed resample differ by orders of magnitude more. (Under split =
                # "saes" an SAE's steps are one process's: equal here to the bit.)
                torch.testing.assert_close(b["model"][name], x, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")
    for run in ("ranks", "by-saes"):  # rank 0 exported both SAEs
        assert len(list((tmp_path / run / "saes").glob("*/sae_weights.safetensors"))) == 2
    assert json.loads((tmp_path / "by-saes" / "run.json").read_text())["run"]["split"] == "saes"
    refused = sae_train_here("--cache-url", server.url, "--dataset", dataset.dataset_id, "--hook", HOOKS[0],
                             "--config", str(tmp_path / "by-saes.toml"), "--tokens", str(tokens),
                             "--out", str(tmp_path / "by-saes"), "--resume", "--split", "data", "--no-progress")
    assert refused.returncode == 1 and "sae-train: error: --out" in refused.stderr and "--split saes" in refused.stderr
