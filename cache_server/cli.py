"""``cache-server``: start the service. Flags override ``CACHE_SERVER_*`` environment variables."""

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path

from pydantic import ValidationError

from cache_server.files import lock_store
from cache_server.settings import Settings
from shared.devices import resolve_device


def parse_settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="cache-server", description=__doc__)
    parser.add_argument("--store", help="folder for datasets, corpora and jobs (default ./store), or an S3 URL "
                        "s3://bucket/prefix for the datasets (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID... from the environment)")
    parser.add_argument("--state-dir", type=Path, help="corpora and jobs when --store is a bucket "
                        "(default ./cache-server-state)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--token", help="bearer token required by mutating endpoints")
    parser.add_argument("--models-dir", type=Path, help="folder of local Hugging Face model folders")
    parser.add_argument("--corpora-dir", type=Path, help="folder of local Hugging Face datasets (save_to_disk "
                        "folders, or folders of parquet / JSONL / arrow files), named by folder")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--ray-address", help="run harvests on a Ray cluster: auto | HOST:PORT | local "
                        "(a private one); unset: in this process")
    parser.add_argument("--ray-workers", type=int, help="Ray actors a harvest runs on (default 1)")
    parser.add_argument("--ray-worker-cpus", type=float, help="CPUs per Ray actor on a cluster without GPUs (default 1)")
    parser.add_argument("--ray-idle-seconds", type=float, help="how long the Ray actors outlive the last harvest "
                        "(default 300)")
    parser.add_argument("--min-free-bytes", type=int, help="disk space a harvest must leave free (default 0)")
    parser.add_argument("--max-json-bytes", type=int, help="largest JSON request body (default 1 MiB)")
    parser.add_argument("--max-corpus-bytes", type=int, help="largest corpus upload (default 16 GiB)")
    parser.add_argument("--corpus-check-bytes", type=int, help="text a harvest submit may tokenise to check its "
                        "corpus holds the tokens asked for (default 8 MiB; the job reads the rest)")
    parser.add_argument("--guide-dir", type=Path, help="a built docs site (mkdocs build) to serve at /guide/ "
                        "(default: the repository's site/ when built)")
    parser.add_argument("--max-sae-bytes", type=int, help="largest SAE file POST /v1/saes accepts (default 1 GiB)")
    parser.add_argument("--no-hub", dest="allow_hub", action="store_false", default=None,
                        help="never load models from the Hugging Face hub")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**args)


def _check_store(store: Path) -> str | None:
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create store folder {store}: {exc.strerror}"
    if not os.access(store, os.W_OK):
        return f"store folder {store} is not writable; pick another with --store"
    return None


def _check_bucket(url: str) -> str | None:
    from cache_server.store.dataset_store import StoreError, open_zarr_store

    try:
        open_zarr_store(url, check=True)
    except StoreError as exc:
        return str(exc)
    return None


def _check_port(host: str, port: int) -> str | None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As uvicorn binds: a port whose last connections are in TIME_WAIT (a server just
        # restarted) is free; one another socket listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use; stop the other server or pass --port"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _check_ray(address: str) -> str | None:
    """Ray installed, and a HOST:PORT address answering (ray.init would wait minutes on a dead one)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return "--ray-address needs Ray: pip install 'sae-cache[ray]'"
    host, _, port = address.rpartition(":")
    if address in ("auto", "local") or address.startswith("ray://") or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        return f"no Ray cluster answers at --ray-address {address} ({exc.strerror or exc}); start one (ray start --head)"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
        print(f"cache-server: error: bad setting {problems}", file=sys.stderr)
        return 2
    try:
        resolve_device(settings.device)
    except ValueError as exc:
        print(f"cache-server: error: --device: {exc}", file=sys.stderr)
        return 2
    problem = (_check_store(settings.local_root)
               or (_check_bucket(settings.store) if settings.store_is_bucket else None)
               or _check_port(settings.host, settings.port)
               or (_check_ray(settings.ray_address) if settings.ray_address else None))
    if problem:
        print(f"cache-server: error: {problem}", file=sys.stderr)
        return 1
    lock = lock_store(settings.local_root)
    if lock is None:
        holder = (settings.local_root / "server.lock").read_text().strip()
        print(f"cache-server: error: another cache server is using the store {settings.local_root}"
              f"{f' (pid {holder})' if holder else ''}; stop it, or give this one its own --store (or "
              "--state-dir beside a bucket); to harvest on several machines, use --ray-address", file=sys.stderr)
        return 1
    import uvicorn

    from cache_server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
