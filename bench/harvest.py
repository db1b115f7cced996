"""Harvest throughput against the bare forward pass, in one run.

(a) a bare ``run_with_cache`` loop over the corpus windows (same model, hooks, batch size and
stop_at_layer as the harvest, nothing stored), and (b) the same harvest through a real cache
server on 127.0.0.1 (reshape, cast, statistics, zstd, Zarr writes, commits), alternated over
several rounds (the dataset is deleted between harvests) with the best round of each kept, since
the machine is shared and noisy. Prints tokens/s of both and the ratio (b)/(a); target >= 0.95.

    python bench/harvest.py [--model all-MiniLM-L6-v2] [--tokens 100000]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cache_server.corpora.corpus_store import CorpusStore  # noqa: E402
from cache_server.harvest.harvester import Layout, TokenWindows  # noqa: E402
from cache_server.models import ModelRegistry  # noqa: E402
from shared.schemas import HookSpec  # noqa: E402
from trainer.data.client import CacheClient  # noqa: E402
from trainer.data.local_server import LocalServer  # noqa: E402


def bare_forward(model, windows: np.ndarray, hooks: list[HookSpec], batch: int) -> float:
    names = [h.name for h in hooks]
    stop = model.stop_at_layer(hooks)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(windows), batch):
            tokens = torch.from_numpy(windows[lo : lo + batch]).long()
            model.bridge.run_with_cache(tokens, names_filter=names, stop_at_layer=stop)
    return windows.size / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--hooks", nargs="+", default=["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hooks = [HookSpec(name=h) for h in args.hooks]

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(args.model)
        corpora = CorpusStore(store / "corpora", 1 << 30)
        corpus = corpora.tokens(corpora.resolve("default"), model.tokenizer, "bench", model.separator_token_id)
        layout = Layout(args.context_size, args.tokens, args.context_size)
        windows = TokenWindows(np.array(corpus), args.context_size, model.bos_token_id)[0:layout.n_sequences]
        bare_forward(model, windows[: args.batch_size * 2], hooks, args.batch_size)  # warm-up
        request = {"model": args.model, "hooks": args.hooks, "n_tokens": args.tokens,
                   "context_size": args.context_size, "batch_size": args.batch_size}
        bare_rates, harvest_rates = [], []
        with LocalServer(store, extra_args=["--no-hub"]) as server, CacheClient(server.url) as client:
            for _ in range(args.rounds):
                bare_rates.append(bare_forward(model, windows, hooks, args.batch_size))
                accepted = client.harvest(request)
                client.wait(accepted, progress=False)
                harvest_rates.append(client.job(accepted.job_id).tokens_per_second)
                client.delete_dataset(accepted.dataset_id)
        bare, harvest = max(bare_rates), max(harvest_rates)

    print(f"model {args.model}, hooks {args.hooks}, {args.tokens} tokens, ctx {args.context_size}, batch {args.batch_size}")
    print(f"bare run_with_cache loop : {bare:10,.0f} tokens/s  (rounds: {', '.join(f'{r:,.0f}' for r in bare_rates)})")
    print(f"harvest via the service  : {harvest:10,.0f} tokens/s  (rounds: {', '.join(f'{r:,.0f}' for r in harvest_rates)})")
    print(f"ratio harvest / bare     : {harvest / bare:10.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
