"""Downstream-evaluation throughput against the bare forward pass, in one process.

(a) a bare forward loop (logits) over token windows of the built-in corpus, and (b) the server's
evaluation of an SAE on the same windows (``cache_server.saes.downstream.evaluate``: clean, spliced,
zero- and mean-ablated forward passes, log-softmax, CE and KL sums), alternated over rounds with
the best of each kept. An evaluation runs four forward passes, so (b)/(a) has a ceiling of 0.25;
the figure says how much the rest costs on top.

    python bench/evaluation.py [--model shakespeare-gpt] [--hook blocks.2.hook_resid_post] [--tokens 16384]
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
from cache_server.saes.downstream import evaluate  # noqa: E402
from cache_server.harvest.harvester import Layout, TokenWindows  # noqa: E402
from cache_server.models import ModelRegistry  # noqa: E402
from cache_server.saes.registry import SaeWeights  # noqa: E402


def bare_forward(model, windows: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(windows), batch):
            model.bridge(torch.from_numpy(windows[lo : lo + batch]).long())
    return windows.size / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shakespeare-gpt")
    parser.add_argument("--hook", default="blocks.2.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        corpora = CorpusStore(Path(tmp), 1 << 30)
        stream = corpora.tokens(corpora.resolve("default"), model.tokenizer, model.info.fingerprint,
                                model.separator_token_id)
    n_windows = Layout(args.context, args.tokens, args.context).n_sequences
    windows = TokenWindows(np.array(stream), args.context, model.bos_token_id)[0:n_windows]
    d = model.info.d_model
    d_sae, k = 8 * d, 32
    sae = SaeWeights("topk", torch.randn(d, d_sae) / d**0.5, torch.zeros(d_sae), torch.randn(d_sae, d) / d**0.5,
                     torch.zeros(d), None, k, True)
    mean = torch.zeros(d)
    bare, evaluated = [], []
    for _ in range(args.rounds):
        bare.append(bare_forward(model, windows, args.batch))
        t0 = time.perf_counter()
        evaluate(model, ([args.hook], [args.hook]), sae, windows, mean[None], args.batch, causal=True)
        evaluated.append(windows.size / (time.perf_counter() - t0))
    a, b = max(bare), max(evaluated)
    print(f"{args.model} {args.hook}, {windows.size:,} tokens, batch {args.batch}, TopK d_sae {d_sae}")
    print(f"(a) bare forward  {a:10,.0f} tok/s")
    print(f"(b) evaluation    {b:10,.0f} tok/s   (b)/(a) = {b / a:.3f} (4 forward passes: ceiling 0.25)")


if __name__ == "__main__":
    main()
