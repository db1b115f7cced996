"""A harvest through a local Ray cluster against the in-process harvester, in one run.

Starts a Ray head (``ray start``, no dashboard) and three cache servers, a store
folder each: (a) in-process (today's default), (b) ``--ray-address`` with 1 worker holding
every CPU, (c) 2 workers with half the CPUs each, all up for the whole run. Each round harvests the same request on each
server (the dataset deleted after), alternated, and the best round of each is kept, since the
machine is shared and noisy. The Ray workers stay up between rounds (``--ray-idle-seconds``), as
they do between a server's harvests: the first round pays their start and the model load, as the
in-process server's first round pays its model load.
Prints tokens/s (the job's own figure) and the ratios (b)/(a), (c)/(a).

    python bench/ray_harvest.py [--model all-MiniLM-L6-v2] [--tokens 100000] [--rounds 3]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private cluster on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from trainer.data.client import CacheClient  # noqa: E402
from trainer.data.local_server import LocalServer, free_port  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))


def harvest_rate(server: LocalServer, request: dict) -> float:
    with CacheClient(server.url) as client:
        accepted = client.harvest(request)
        client.wait(accepted, progress=False)
        job = client.job(accepted.job_id)
        assert job.status == "completed", job
        client.delete_dataset(accepted.dataset_id)
        return job.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--hooks", nargs="+", default=["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cpus = os.cpu_count() or 2
    request = {"model": args.model, "hooks": args.hooks, "n_tokens": args.tokens,
               "context_size": args.context_size, "batch_size": args.batch_size}
    port = free_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        # both pools stay up: logical CPUs for both (one harvest runs at a time)
                        "--num-cpus", str(2 * cpus), "--num-gpus", "0", "--include-dashboard", "false",
                        "--disable-usage-stats", "--object-store-memory", str(200 << 20)],
                       check=True, capture_output=True)
        ray = ["--ray-address", address, "--ray-idle-seconds", "3600"]
        setups = {
            "in-process": [],
            "ray, 1 worker": [*ray, "--ray-workers", "1", "--ray-worker-cpus", str(cpus)],
            "ray, 2 workers": [*ray, "--ray-workers", "2", "--ray-worker-cpus", str(cpus / 2)],
        }
        rates: dict[str, list[float]] = {name: [] for name in setups}
        try:
            with ExitStack() as stack:
                servers = {name: stack.enter_context(LocalServer(Path(tmp) / f"store{i}", extra_args=["--no-hub", *extra]))
                           for i, (name, extra) in enumerate(setups.items())}
                for _ in range(args.rounds):
                    for name, server in servers.items():
                        rates[name].append(harvest_rate(server, request))
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
    best = {name: max(r) for name, r in rates.items()}
    print(f"model {args.model}, hooks {args.hooks}, {args.tokens} tokens, ctx {args.context_size}, "
          f"batch {args.batch_size}, {cpus} CPUs, best of {args.rounds} alternated rounds")
    for name, r in rates.items():
        ratio = best[name] / best["in-process"]
        print(f"{name:15s}: {best[name]:9,.0f} tokens/s  {ratio:5.2f}x in-process  "
              f"(rounds: {', '.join(f'{x:,.0f}' for x in r)})")


if __name__ == "__main__":
    main()
