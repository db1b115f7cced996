"""Past one machine, in one run (all servers on 127.0.0.1, the bucket a moto S3 server in this process):

  streaming: rows/s of the trainer's loader (ChunkStream, same shuffle) reading one dataset
    (a) through the cache server over HTTP (the baseline), (b) straight from the store's folder on
    local disk, (c) straight from an S3 bucket (moto: a Python S3 server, far slower than S3 or
    MinIO, so (c) is a floor);
  harvest: tokens/s of one harvest request served by 1 replica vs split between 2 replicas on one
    bucket (both replicas share this machine's cores, so 2 replicas cannot beat 1 here; on two
    machines or GPUs each replica brings its own).

    python bench/distributed.py [--tokens 120000] [--epochs 4]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.data.client import CacheClient, StoreReader  # noqa: E402
from trainer.data.local_server import LocalServer, free_port  # noqa: E402
from trainer.data.stream import ChunkStream  # noqa: E402
from train import BATCH, loader_rate as stream_rate  # noqa: E402  (bench/train.py, beside this file)

HOOK = "blocks.3.hook_resid_post"


def loader_rate(source, manifest, epochs: int) -> float:
    stream = ChunkStream(source, manifest, [HOOK], batch_size=BATCH, window_rows=8 * BATCH, eval_chunks=1)
    return stream_rate(stream, epochs)


def bucket(port: int) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="bench")
    return env


def harvest_rate(servers: list[LocalServer], request: dict) -> float:
    clients = [CacheClient(s.url) for s in servers]
    t0 = time.perf_counter()
    accepted = [c.harvest(request) for c in clients]
    for c, a in zip(clients, accepted):
        c.wait(a, progress=False)
    return request["n_tokens"] / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=120_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bucket(free_port())
    request = {"model": "all-MiniLM-L6-v2", "hooks": [HOOK], "n_tokens": args.tokens, "batch_size": 32}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with LocalServer(tmp / "disk", extra_args=["--no-hub"]) as disk, \
                LocalServer(tmp / "b", extra_args=["--no-hub", "--store", "s3://bench/one", "--state-dir",
                                                   str(tmp / "b")]) as in_bucket:
            server_client, bucket_client = CacheClient(disk.url), CacheClient(in_bucket.url)
            on_disk = server_client.wait(server_client.harvest(request), progress=False)
            one = harvest_rate([in_bucket], request)
            manifest = bucket_client.manifest(on_disk.dataset_id)
            sources = {"(a) through the server": server_client,
                       "(b) local disk": StoreReader(tmp / "disk" / "datasets" / on_disk.dataset_id),
                       "(c) S3 bucket (moto)": StoreReader(manifest.store_url)}
            rates = {name: 0.0 for name in sources}
            for _ in range(args.rounds):  # alternated, best of each: the machine is shared and noisy
                for name, source in sources.items():
                    rates[name] = max(rates[name], loader_rate(source, on_disk, args.epochs))
        base = rates["(a) through the server"]
        print(f"streaming {on_disk.hook(HOOK).d}-wide float16 rows, batch {BATCH}, {args.epochs} epochs, best of {args.rounds}:")
        for name, rate in rates.items():
            print(f"  {name:26} {rate:10,.0f} rows/s  {rate / base:5.2f}x (a)")

        replicas = [LocalServer(tmp / f"r{i}", extra_args=["--no-hub", "--store", "s3://bench/two", "--state-dir",
                                                           str(tmp / f"r{i}"), "--replica", f"r{i}"]) for i in range(2)]
        with replicas[0], replicas[1]:
            two = harvest_rate(replicas, request)
        print(f"harvest {args.tokens:,} tokens of all-MiniLM-L6-v2 into the bucket: 1 replica {one:,.0f} tok/s, "
              f"2 replicas {two:,.0f} tok/s: {two / one:.2f}x (same 2 cores)")


if __name__ == "__main__":
    main()
