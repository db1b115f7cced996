"""The feature browser for a finished run: each exported SAE goes home to the cache server
(``POST /v1/saes``), which computes its feature statistics over the run's held-out chunks (rows no
SAE trained on), so ``/saes/<id>/`` on that server shows what each feature does.

As with the downstream figures, a server that cannot do it costs the run nothing: the reason is
recorded in eval.json and printed instead of the page's address.
"""

import json
import sys
import time
from pathlib import Path

from shared.schemas import DatasetManifest
from trainer.data.client import CacheClient, CacheError
from trainer.evaluation.downstream import exported_parts


def browse_features(client: CacheClient, manifest: DatasetManifest, hooks: list[str], run_dir: Path,
                    results: list[dict], chunk_ids: list[int]) -> list[dict]:
    """Adds ``browser`` (per hook: the SAE's id and page path, or why not) to each result, and
    rewrites the run's and each SAE's eval.json with it. Every job is requested before any is
    waited on (the server's queue stays busy; no poll interval per SAE)."""
    asked = [[(hook, _submit(client, manifest, part, hook, chunk_ids)) for hook, part in exported_parts(run_dir / "saes" / r["sae"], hooks)]
             for r in results]
    for result, jobs in zip(results, asked):
        result["browser"] = {hook: _page(client, *job) for hook, job in jobs}
        (run_dir / "saes" / result["sae"] / "eval.json").write_text(json.dumps(result, indent=1))
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    return results


def _submit(client: CacheClient, manifest: DatasetManifest, folder: Path, hook: str, chunk_ids: list[int]):
    """(the registered SAE, its feature job), or (None, why not)."""
    try:
        sae = client.register_sae(folder, manifest.dataset_id, hook)
        return sae, client.compute_features(sae.sae_id, chunk_ids)
    except CacheError as exc:
        return None, str(exc)


def _page(client: CacheClient, sae, job) -> dict:
    if sae is None:
        return {"unavailable": job}
    try:
        job = client.wait_features(job)
    except CacheError as exc:
        return {"unavailable": str(exc)}
    return {"sae_id": sae.sae_id, "path": f"/saes/{sae.sae_id}/", "n_rows": job.n_rows}


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
    the way out)."""
    print(f"serving the feature browser at {url}/saes/ until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"{prog}: stopped serving", file=sys.stderr)
        return 0
