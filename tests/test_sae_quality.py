"""Every architecture, trained briefly by the real trainer on real activations (MiniLM's residual
stream streamed from the server), becomes sparse and reconstructs well on held-out rows.

Thresholds come from bench/quality.py's runs of these configs (issue 13), with margin: before the
initialisation, loss scale and schedules were fixed, ReLU and JumpReLU stayed dense here (L0 of a
third of the dictionary, FVU above 1) and TopK's FVU was 1.6x SAELens'.
"""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server import ServerProcess, free_port
from trainer.config import RunConfig, SAEConfig, Sweep
from trainer.data.client import CacheClient
from trainer.evaluation.metrics import evaluate
from trainer.outputs.export import load_saelens
from trainer.training.train import Trainer

HOOK = "blocks.3.hook_resid_post"
D_SAE = 1024
# config, (L0 range), highest FVU, highest silent share (never fired on the held-out rows; rare latents
# count too). Dead (never fired on any row, training or held-out): under 1% for every case.
# Measured here (d_sae 1024, 65,536 training tokens; schedule-free Adam at 8e-3 and the decoder
# refit): FVU / silent 0.239 / 0.4%, 0.193 / 0.3%, 0.178 / 0.8%, 0.194 / 4.9%, 0.280 / 0.6%,
# 0.238 / 3.7%. Adam at 1e-3 with no refit needed twice the tokens for 0.271, 0.218, 0.205, 0.223,
# 0.420, 0.284. (At 1536 latents, silent before resampling and the mean-centred start: 18%, 8%,
# 30%, 47%, 0%, 11%.)
CASES = [
    (dict(activation="topk", k=16), (15.9, 16), 0.27, 0.02),  # a row may have fewer than k positive latents
    (dict(activation="topk", k=32), (31.9, 32), 0.22, 0.02),
    (dict(activation="batchtopk", k=32), (28.8, 35.2), 0.21, 0.02),  # calibrated threshold: L0 within 10% of k
    (dict(activation="batchtopk", objective="matryoshka", k=32), (28.8, 35.2), 0.22, 0.06),
    (dict(activation="relu", l1_coefficient=5.0), (5, 150), 0.33, 0.02),  # a coefficient buys more sparsity under schedule-free Adam
    (dict(activation="jumprelu", l1_coefficient=1.0), (15, 150), 0.27, 0.07),
]


@contextlib.contextmanager
def _stopping(server: ServerProcess):
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Its own server with 1 MiB chunks (1,365 rows): the suite's 64 KiB ones make a MiniLM harvest of
    these rows 770 chunk writes, 46 s against 13 s (measured). The SAEs train on 32,768 rows for 2
    epochs (the held-out rows are never trained on); under Adam, 4 epochs of them gave the figures
    65,536 rows did, within 0.01."""
    request = {"model": "all-MiniLM-L6-v2", "hooks": [HOOK], "n_tokens": 32_768, "context_size": 128,
               "batch_size": 16}
    run = RunConfig(batch_size=1024, tokens=65_536, eval_chunks=2, shuffle_buffer_rows=16_384, log_every=64)
    sweep = Sweep(run=run, saes=tuple(SAEConfig(d_sae=D_SAE, **case) for case, *_ in CASES))
    out = tmp_path_factory.mktemp("quality")
    server = ServerProcess(store=tmp_path_factory.mktemp("quality-server") / "store", port=free_port(),
                           env={"CACHE_SERVER_CHUNK_BYTES": str(1 << 20)}).start()
    with _stopping(server), CacheClient(server.url) as client:
        manifest = client.wait(client.harvest(request), progress=False)
        trainer = Trainer(client, manifest, [HOOK], sweep, out, progress=False)
        trainer.prepare(resume=False)
        trainer.train()
        trainer.evaluate_and_export()
        rows, _ = trainer.stream.evaluation_rows()
        with ThreadPoolExecutor(trainer.stream.fetch_threads) as pool:
            train_rows, _ = trainer.stream.load_rows(trainer.stream.train_chunk_ids, pool)
    return trainer, rows / trainer.scales[0], train_rows / trainer.scales[0]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]['activation']}-{c[0].get('objective', 'vanilla')}"
                                                          f"-{c[0].get('k', c[0].get('l1_coefficient'))}" for c in CASES])
@pytest.mark.slow
def test_a_short_run_on_real_activations_is_sparse_and_reconstructs(trained, index):
    trainer, raw_rows, raw_train_rows = trained
    _, (low, high), max_fvu, max_silent = CASES[index]
    state = trainer.saes[index]
    sae, _ = load_saelens(trainer.out / "saes" / state.name)  # the exported files, on the model's units
    m = evaluate(sae, raw_rows)
    dead = int(((m.freqs == 0) & (evaluate(sae, raw_train_rows).freqs == 0)).sum())
    print(state.name, m.summary(), "dead", dead)
    assert low <= m.l0 <= high, m.summary()
    assert m.fvu < max_fvu, m.summary()
    assert dead < 0.01 * D_SAE, f"{dead} of {D_SAE} latents never fire on any row"
    assert m.n_dead <= max_silent * D_SAE, m.summary()
