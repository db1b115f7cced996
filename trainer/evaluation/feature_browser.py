"""The feature browser for a finished run: each exported SAE goes home to the cache server
(``POST /v1/saes``), which computes its feature statistics over the run's held-out chunks (rows no
SAE trained on), so ``/saes/<id>/`` on that server shows what each feature does.

As with the downstream figures, a server that cannot do it costs the run nothing: the reason is
recorded in eval.json and printed instead of the page's address.
"""

import sys
import time
from pathlib import Path

from shared.schemas import DatasetManifest
from trainer.data.client import CacheClient
from trainer.evaluation.downstream import on_the_server


def browse_features(client: CacheClient, manifest: DatasetManifest, hooks: list[str], run_dir: Path,
                    results: list[dict], chunk_ids: list[int]) -> list[dict]:
    """Adds ``browser`` (per hook: the SAE's id and page path, or why not) to each result, and
    rewrites the run's and each SAE's eval.json with it."""
    return on_the_server(client, manifest, hooks, run_dir, results, "browser",
                         start=lambda sae: client.compute_features(sae.sae_id, chunk_ids),
                         finish=lambda sae, job: {"sae_id": sae.sae_id, "path": f"/saes/{sae.sae_id}/",
                                                  "n_rows": client.wait_features(job).n_rows})


def page_lines(results: list[dict], url: str) -> list[str]:
    """One line per SAE (and hook): the address of its browser page, or why there is none."""
    lines = []
    for result in results:
        for hook, entry in result.get("browser", {}).items():
            where = f"{url}{entry['path']}" if "path" in entry else f"none ({entry['unavailable']})"
            lines.append(f"  {result['sae']} {hook}: {where}")
    return lines


def serve_pages(url: str, prog: str) -> int:
    """Keep a server this command started up for the browser until Ctrl-C (the caller stops it on
    the way out). The line is printed inside the ``try``: a Ctrl-C the moment it appears is a stop,
    not an interruption (a test sending SIGINT on the line got exit code 130)."""
    try:
        print(f"serving the feature browser at {url}/saes/ until Ctrl-C", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"{prog}: stopped serving", file=sys.stderr)
        return 0
