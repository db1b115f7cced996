"""``sae-pipeline``: the main job on the built-in offline default, in one command.

Starts a cache server on 127.0.0.1, harvests all-MiniLM-L6-v2 (a residual stream and an MLP
output) on the built-in corpus, follows the harvest, prints what was stored, and stops the server
(also on Ctrl-C). A second run is a cache hit.
"""

import argparse
import sys
from pathlib import Path

from trainer.client import CacheClient, CacheError
from trainer.local_server import LocalServer

DEFAULT_HOOKS = ["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/default"), help="folder for the store and outputs")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--hook", action="append", dest="hooks", help="hook to harvest (repeatable)")
    parser.add_argument("--tokens", type=int, default=250_000, help="rows to harvest")
    parser.add_argument("--context-size", type=int, default=128)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = {"model": args.model, "hooks": args.hooks or DEFAULT_HOOKS, "n_tokens": args.tokens,
               "context_size": args.context_size, "batch_size": 32}
    try:
        with LocalServer(args.out / "store", log=args.out / "cache-server.log") as server:
            print(f"cache server on {server.url} (store {args.out / 'store'})")
            with CacheClient(server.url) as client:
                accepted = client.harvest(request)
                if accepted.status == "completed":
                    print(f"cache hit: dataset {accepted.dataset_id} is already harvested")
                manifest = client.wait(accepted)
    except KeyboardInterrupt:
        print("sae-pipeline: interrupted; the server was stopped and the harvest resumes next run", file=sys.stderr)
        return 130
    except (CacheError, RuntimeError) as exc:
        print(f"sae-pipeline: error: {exc}", file=sys.stderr)
        return 1
    print(f"\ndataset {manifest.dataset_id}: {manifest.n_items:,} rows x {len(manifest.hooks)} hooks, "
          f"{manifest.n_chunks} chunks of {manifest.chunk_rows} rows, {manifest.dtype}")
    print(f"{'hook':32} {'d':>5} {'mean norm':>10}")
    for hook in manifest.hooks:
        print(f"{hook.name:32} {hook.d:>5} {hook.stats.mean_norm:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
