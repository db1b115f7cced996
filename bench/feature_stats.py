"""The feature browser's statistics job (cache_server/saes/feature_stats.py): time and memory for an
SAE of --d-sae latents over --rows rows, against its baseline, the two encoding passes alone.

    .venv/bin/python bench/feature_stats.py [--rows 65536] [--d-in 768] [--d-sae 24576] [--vocab 50257]

The job's computation as the server runs it: the two passes with the FVU sums on the first
(``ReconstructionSums``), then the logit lens through a --vocab unembedding (GPT-2's size). Prints
seconds (and per million rows), the ratio to two bare encoding passes over the same blocks, the
logit lens' seconds, and the peak RSS over the process' before the job (the weights already in
memory; the rows are made a chunk at a time, as the server reads them from the store).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache_server.saes.feature_stats import ReconstructionSums, feature_statistics, logit_lens  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=24_576)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50_257)
    args = parser.parse_args()
    torch.manual_seed(0)
    # Rows made a chunk at a time (seeded by the chunk, the same each pass), as the server reads them
    # from the store: the process holds no dataset, so its peak RSS is the job's.
    def chunk_rows(lo: int) -> torch.Tensor:
        return torch.randn(min(args.chunk, args.rows - lo), args.d_in, generator=torch.Generator().manual_seed(lo))
    W = torch.randn(args.d_in, args.d_sae) / args.d_in**0.5
    bias = -2.5 * torch.ones(args.d_sae)  # ~0.6% density, as a trained SAE's typical latent
    encode = lambda x: torch.relu(torch.addmm(bias, x, W))  # noqa: E731
    chunks = lambda: ((chunk_rows(lo), torch.arange(lo, min(lo + args.chunk, args.rows)))  # noqa: E731
                      for lo in range(0, args.rows, args.chunk))
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(2):
            for x, _ in chunks():
                for lo in range(0, x.shape[0], 512):
                    encode(x[lo:lo + 512])
        bare = time.perf_counter() - t0
        before = peak_mb()
        t0 = time.perf_counter()
        sums = ReconstructionSums(W.T.contiguous(), torch.zeros(args.d_in))
        stats = feature_statistics(encode, chunks, args.d_sae, observe=sums.observe)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        logit_lens(W.T.contiguous(), torch.randn(args.d_in, args.vocab))
        lens = time.perf_counter() - t0
    per_million = seconds * 1e6 / args.rows
    print(f"statistics of d_sae {args.d_sae:,} over {args.rows:,} rows (d_in {args.d_in}): {seconds:.1f} s "
          f"({per_million / 60:.1f} min per 1M rows), {seconds / bare:.2f}x two bare encoding passes ({bare:.1f} s); "
          f"logit lens over {args.vocab:,} tokens {lens:.1f} s; peak RSS +{max(0.0, peak_mb() - before):.0f} MB; "
          f"{int((stats.fired == 0).sum())} dead, FVU {sums.squared_error / sums.total_variance:.2f}")


if __name__ == "__main__":
    main()
