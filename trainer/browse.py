"""``sae-browse RUN``: the feature browser for a finished run folder, after the fact.

RUN is a ``sae-train --out`` folder or a ``sae-pipeline --out`` folder. Each SAE it exported goes
home to a cache server that holds the run's dataset (registered there, a cache hit if it already
is), which computes its feature statistics over the run's held-out chunks (again named by the
run's seed and ``eval_chunks``: rows no SAE trained on); the pages' addresses are printed and
recorded in the run's eval.json. With --cache-url, that server; otherwise one started here over
--store (a pipeline folder's own store by default), kept up for the browser until Ctrl-C.

    sae-browse runs/shakespeare-gpt                  # a sae-pipeline folder: serve its SAEs' pages
    sae-browse runs/x --cache-url http://host:8000   # a sae-train folder, on the server it trained from
"""

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.cli import bearer_token
from trainer.data.client import CacheClient, CacheError
from trainer.data.local_server import LocalServer
from trainer.data.stream import chunk_split
from trainer.evaluation.feature_browser import browse_features, page_lines, serve_pages
from trainer.training.train import RUN_FILE


class BrowseError(Exception):
    """A run folder or server that cannot be browsed, said in one line."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-browse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a sae-train or sae-pipeline --out folder")
    parser.add_argument("--cache-url", help="a cache server holding the run's dataset (default: start one over --store)")
    parser.add_argument("--token", type=bearer_token, default=os.environ.get("CACHE_SERVER_TOKEN") or None,
                        help="bearer token of --cache-url (default: $CACHE_SERVER_TOKEN)")
    parser.add_argument("--store", type=Path, help="the store a started server serves (default: RUN/store of a "
                        "sae-pipeline folder)")
    parser.add_argument("--port", type=int, default=None, help="a started server's port (default: a free one)")
    parser.add_argument("--no-serve", action="store_true", help="with a started server: compute the statistics, "
                        "print the addresses and stop it (`python -m cache_server --store ...` serves them later)")
    return parser.parse_args(argv)


def run_folder(run: Path) -> tuple[Path, Path | None]:
    """The folder holding run.json (RUN, or a pipeline folder's train/) and the pipeline's store."""
    if (run / "train" / RUN_FILE).is_file():
        return run / "train", run / "store"
    if (run / RUN_FILE).is_file():
        return run, None
    raise BrowseError(f"{run} holds no sae-train or sae-pipeline run (no {RUN_FILE} in it or in {run / 'train'})")


def finished_results(train_dir: Path) -> list[dict]:
    try:
        return json.loads((train_dir / "eval.json").read_text())
    except FileNotFoundError:
        raise BrowseError(f"the run in {train_dir} has not finished (no eval.json): its SAEs are not exported yet; "
                          "run its training to the end first") from None


@contextmanager
def cache_server(args: argparse.Namespace, store: Path | None) -> Iterator[tuple[str, bool]]:
    """The URL of --cache-url, or of a server started over the store; and whether it was started."""
    if args.cache_url:
        yield args.cache_url.rstrip("/"), False
        return
    store = args.store or store
    if store is None:
        raise BrowseError(f"{args.run} is a sae-train folder: name the cache server that holds its dataset with "
                          "--cache-url, or its store with --store")
    if not store.is_dir():
        raise BrowseError(f"--store {store} is not a folder")
    with LocalServer(store, port=args.port, log=store.parent / "cache-server.log") as server:
        print(f"cache server on {server.url} (store {store})")
        yield server.url, True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_dir, store = run_folder(args.run)
        record = json.loads((train_dir / RUN_FILE).read_text())
        results = finished_results(train_dir)
        with cache_server(args, store) as (url, started), CacheClient(url, token=args.token) as client:
            manifest = client.manifest(record["dataset_id"])
            held_out, _ = chunk_split(manifest.n_chunks_total, record["run"]["seed"], record["run"]["eval_chunks"])
            results = browse_features(client, manifest, record["hooks"], train_dir, results, held_out)
            lines = page_lines(results, url)
            print("feature browser:", *lines, sep="\n", flush=True)
            if any("none (" in line for line in lines):
                print("sae-browse: error: some SAEs have no page (the reason is on their line)", file=sys.stderr)
                return 1
            if started and not args.no_serve:
                return serve_pages(url, "sae-browse")
    except KeyboardInterrupt:
        print("sae-browse: interrupted; the server was stopped", file=sys.stderr)
        return 130
    except (BrowseError, CacheError, RuntimeError) as exc:
        print(f"sae-browse: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
