"""The GPU path, measured in one call: matmul ceiling, SAE steps, harvest, loader, end to end.

On a CUDA box (one H200 here: at most ~8 minutes, nothing to install by hand but the wheels below):

    bash bench/gpu_wheels.sh                      # here, once: .whl/ (16 MB), git-ignored
    # there, carrying .whl:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 bench/gpu.py --device cuda

On CPU, ``--tiny`` runs every section at toy sizes (the suite does, so that this script cannot
rot): ``python bench/gpu.py --tiny --device cpu``.

Wheels the box's image lacks (Python 3.12, x86-64; bench/gpu_wheels.sh fetches them): numcodecs
0.16.6 (9.3 MB), pydantic-core 2.50.5 (2.3 MB), transformer-lens 4.3.0 (1.6 MB), fastapi-offline
1.7.7 (0.8 MB), datasets 5.2.0 (0.6 MB), pydantic 2.14.4 (0.5 MB), zarr 3.1.6 (0.3 MB), and under
0.2 MB each: fastapi 0.165.0, multiprocess 0.70.19, dill 0.4.1, uvicorn 0.54.0, pydantic-settings
2.16.3, starlette 1.10.0, google-crc32c 1.9.0, python-dotenv 1.2.4, donfig 0.8.1.post1,
typing-inspection 0.4.5, annotated-types 0.8.0, sniffio 1.3.1: 16.2 MB in all. The MiniLM
package is too big to carry: the model here is ``shakespeare-gpt`` (in the repo).

Sections, each against a baseline run in the same process:
  1. torch.mm at the SAE's shapes (fp32 and bf16): the ceiling the steps are a fraction of;
  2. SAE steps (ReLU + L1 and TopK k=32; d_in 768, d_sae 24,576, batch 4096; fp32 and bf16
     autocast): this trainer's step vs a hand-written PyTorch step, and as a fraction of the ceiling;
  3. harvest: the service's tokens/s vs a bare ``run_with_cache`` loop, same model, tokens, device, bf16;
  4. the loader: rows/s and GB/s of shuffled float32 batches into the device buffer vs a raw
     download of the same bytes with as many connections, at 1, 4 and 16 fetch threads;
  5. ``sae-train``'s training from a server on this machine: tokens/s, and the fraction of step
     time spent waiting for the loader (1 - end-to-end rate / the same step's rate on rows in memory).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache_server.corpora.corpus_store import CorpusStore  # noqa: E402
from cache_server.harvest.harvester import TokenWindows  # noqa: E402
from cache_server.models import ModelRegistry  # noqa: E402
from shared.schemas import HookSpec  # noqa: E402
from trainer.config import RunConfig, SAEConfig, Sweep  # noqa: E402
from trainer.data.client import CacheClient  # noqa: E402
from trainer.data.local_server import LocalServer  # noqa: E402
from trainer.data.stream import ChunkStream  # noqa: E402
from trainer.sae.autoencoder import SparseAutoencoder  # noqa: E402
from trainer.training.schedulers import Warmup  # noqa: E402
from trainer.training.optimizers import adam  # noqa: E402
from trainer.training.train import SAEState, Trainer, train_step  # noqa: E402

FULL = dict(d_in=768, d_sae=24_576, batch=4096, steps=20, model="shakespeare-gpt", harvest_tokens=262_144,
            threads=(1, 4, 16), stream_epochs=3, train_tokens=4096 * 200)
TINY = dict(d_in=64, d_sae=512, batch=256, steps=3, model="tiny-random-gpt", harvest_tokens=16_384,
            threads=(1, 2), stream_epochs=2, train_tokens=256 * 12)
HOOK = "blocks.1.hook_resid_post"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, steps: int, device: torch.device) -> float:
    """Seconds a call, after a warm-up, the device synchronised around the timed calls."""
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def matmul_ceiling(s: dict, device: torch.device, precision: str) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(s["batch"], s["d_in"], device=device, dtype=dtype)
    b = torch.randn(s["d_in"], s["d_sae"], device=device, dtype=dtype)
    return 2 * s["batch"] * s["d_in"] * s["d_sae"] / timed(lambda: a @ b, s["steps"], device)


def handwritten(s: dict, x: torch.Tensor, precision: str):
    """The ReLU + L1 step anyone would write, with Adam: the baseline of section 2."""
    d, n = s["d_in"], s["d_sae"]
    params = [torch.nn.Parameter(torch.randn(d, n, device=x.device) / d**0.5), torch.nn.Parameter(torch.zeros(n, device=x.device)),
              torch.nn.Parameter(torch.randn(n, d, device=x.device) / n**0.5), torch.nn.Parameter(torch.zeros(d, device=x.device))]
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step():
        W_enc, b_enc, W_dec, b_dec = params
        with autocast(x.device, precision):
            acts = torch.relu((x - b_dec) @ W_enc + b_enc)
            loss = ((acts @ W_dec + b_dec) - x).float().pow(2).sum(-1).mean() + 5.0 * acts.float().sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def trainer_step(cfg: SAEConfig, x: torch.Tensor, precision: str):
    sae = SparseAutoencoder(cfg, x.shape[-1]).to(x.device)
    state = SAEState(cfg=cfg, name=cfg.name(), sae=sae, optimizer=adam(sae.parameters(), cfg.lr), lr=Warmup(0, cfg.lr, 1),
                     sparsity=Warmup(0, cfg.l1_coefficient, 1),
                     tokens_since_fired=torch.zeros(1, sae.d_sae, dtype=torch.long, device=x.device),
                     dead_after_tokens=10**12, resample_every=0, last_resample=0)

    def step():
        with autocast(x.device, precision):
            train_step(state, x)

    return step


def section_steps(s: dict, device: torch.device) -> dict:
    x = torch.randn(s["batch"], s["d_in"], device=device)
    dense_flops = 6 * 2 * s["batch"] * s["d_in"] * s["d_sae"]  # encoder and decoder, forward and backward
    rates = {}
    for precision in ("fp32", "bf16"):
        ceiling = matmul_ceiling(s, device, precision)
        base = timed(handwritten(s, x, precision), s["steps"], device)
        print(f"2. {precision}: torch.mm {ceiling / 1e12:.2f} TFLOP/s; hand-written ReLU step {s['batch'] / base:,.0f} tok/s "
              f"({dense_flops / base / ceiling:.2f} of the ceiling)")
        for label, cfg in (("ReLU + L1", SAEConfig(activation="relu", d_sae=s["d_sae"])),
                           ("TopK k=32", SAEConfig(activation="topk", k=32, d_sae=s["d_sae"]))):
            try:
                seconds = timed(trainer_step(cfg, x, precision), s["steps"], device)
            except (RuntimeError, NotImplementedError) as exc:  # a kernel this device lacks in bf16: say so
                print(f"   trainer {label:9} fails under {precision} autocast: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            rates[(label, precision)] = s["batch"] / seconds
            print(f"   trainer {label:9} {s['batch'] / seconds:12,.0f} tok/s  {base / seconds:5.2f}x hand-written  "
                  f"{dense_flops / seconds / ceiling:5.2f} of the ceiling (dense-equivalent FLOPs)")
    return rates


def section_harvest(s: dict, device: torch.device, client: CacheClient, server_url: str) -> dict:
    model = ModelRegistry(None, device, allow_hub=False).get(s["model"])
    with tempfile.TemporaryDirectory() as tmp:
        corpora = CorpusStore(Path(tmp), 1 << 30)
        tokens = np.array(corpora.tokens(corpora.resolve("default"), model.tokenizer, "bench", None))
    context, batch = 128, 32
    n_seq = min(s["harvest_tokens"] // context, len(tokens) // (context - 1))
    windows = TokenWindows(tokens, context, model.bos_token_id)[0:n_seq]
    names, stop = [HOOK], model.stop_at_layer([HookSpec(name=HOOK)])

    def bare():  # what the service does short of storing: the model as loaded, rows cast to bf16 on the host
        with torch.inference_mode():
            for lo in range(0, n_seq, batch):
                cache = model.bridge.run_with_cache(torch.from_numpy(windows[lo:lo + batch]).long().to(device),
                                                    names_filter=names, stop_at_layer=stop)[1]
                cache[HOOK].to(torch.bfloat16).cpu()  # the service stores them on the host too

    bare_rate = n_seq * context / timed(bare, 1, device)
    request = {"model": s["model"], "hooks": [HOOK], "n_tokens": n_seq * context, "context_size": context,
               "dtype": "bfloat16", "batch_size": batch}
    client.wait(client.harvest({**request, "n_tokens": 4 * context}), progress=False)  # the server loads the model
    t0 = time.perf_counter()
    manifest = client.wait(client.harvest(request), progress=False)
    service_rate = manifest.n_items / (time.perf_counter() - t0)
    print(f"3. harvest {s['model']} {HOOK}, {manifest.n_items:,} tokens, bf16: service {service_rate:,.0f} tok/s vs "
          f"bare run_with_cache {bare_rate:,.0f} tok/s: {service_rate / bare_rate:.2f}x (target >= 0.95)")
    return {"manifest": manifest}


def section_loader(s: dict, device: torch.device, client: CacheClient, manifest) -> None:
    d = manifest.hook(HOOK).d
    for threads in s["threads"]:
        stream = ChunkStream(client, manifest, [HOOK], batch_size=s["batch"], window_rows=8 * s["batch"], device=device,
                             eval_chunks=1, fetch_threads=threads)
        # Timed from the second epoch: the first fills the windows built ahead (and compiles numba's kernels).
        warm, seen, counted, t0 = stream.rows_per_epoch, 0, 0, None
        for batch in stream.batches():
            seen += batch.activations.shape[0]
            if t0 is None and seen >= warm:
                sync(device)
                t0 = time.perf_counter()
            elif t0 is not None:
                counted += batch.activations.shape[0]
                if counted + s["batch"] > s["stream_epochs"] * stream.rows_per_epoch:
                    break
        sync(device)
        loader = counted / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: client.chunk_bytes(manifest.dataset_id, HOOK, i),
                          stream.train_chunk_ids * s["stream_epochs"]))
        raw = s["stream_epochs"] * stream.rows_per_epoch / (time.perf_counter() - t0)
        print(f"4. loader, {threads:2} fetch threads: {loader:12,.0f} rows/s ({loader * d * 4 / 1e9:.2f} GB/s float32 on "
              f"{device.type}) vs raw download {raw:12,.0f} rows/s ({raw * d * 2 / 1e9:.2f} GB/s bf16): {loader / raw:.2f}x")


def section_end_to_end(s: dict, device: torch.device, client: CacheClient, manifest, out: Path) -> None:
    cfg = SAEConfig(activation="topk", k=32, d_sae=s["d_sae"] * manifest.hook(HOOK).d // s["d_in"])
    steps = s["train_tokens"] // s["batch"]
    run = RunConfig(batch_size=s["batch"], tokens=s["train_tokens"], device=device.type, eval_chunks=1,
                    log_every=max(1, steps // 2), checkpoint_every=10**9)
    x = torch.randn(s["batch"], manifest.hook(HOOK).d, device=device)
    alone = s["batch"] / timed(trainer_step(cfg, x, "fp32"), s["steps"], device)
    trainer = Trainer(client, manifest, [HOOK], Sweep(run=run, saes=(cfg,)), out, progress=False)
    trainer.prepare(resume=False)
    trainer.train()
    rate = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_second"]  # the second half
    print(f"5. sae-train, TopK k=32 d_sae {cfg.d_sae:,} from the server: {rate:,.0f} tok/s vs the step alone {alone:,.0f}: "
          f"waiting for batches {max(0.0, 1 - rate / alone):.0%} of the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for CPU (the test suite)")
    args = parser.parse_args()
    device, s = torch.device(args.device), TINY if args.tiny else FULL
    if args.tiny:  # several chunks of a toy dataset
        os.environ.setdefault("CACHE_SERVER_CHUNK_BYTES", str(64 * 1024))
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"1. {name}; torch {torch.__version__}; d_in {s['d_in']}, d_sae {s['d_sae']}, batch {s['batch']}")
    section_steps(s, device)
    with tempfile.TemporaryDirectory() as tmp, \
            LocalServer(Path(tmp) / "store", extra_args=["--no-hub", "--device", args.device]) as server, \
            CacheClient(server.url) as client:
        manifest = section_harvest(s, device, client, server.url)["manifest"]
        section_loader(s, device, client, manifest)
        section_end_to_end(s, device, client, manifest, Path(tmp) / "run")


if __name__ == "__main__":
    main()
