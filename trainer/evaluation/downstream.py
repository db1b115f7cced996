"""Downstream figures of a finished run: each exported SAE goes home to the cache server, which
splices it into the dataset's model on held-out text (``POST /v1/saes``, ``POST /v1/evaluations``).

The trainer needs no model weights for this. A server that cannot evaluate (a dataset with no
held-out text left, a model it cannot run) costs the run nothing: its reason is recorded and
printed in place of the figures.
"""

import json
from pathlib import Path

from trainer.data.client import CacheClient, CacheError
from shared.schemas import DatasetManifest


def evaluate_downstream(client: CacheClient, manifest: DatasetManifest, hooks: list[str], run_dir: Path,
                        results: list[dict], n_tokens: int) -> list[dict]:
    """Adds ``downstream`` (one entry per hook: CE loss score, KL, ... or why not) to each result,
    and rewrites the run's and each SAE's eval.json with it. Every evaluation is requested before
    any is waited on: the server works through its queue while the next SAE uploads, and no poll
    interval is paid per SAE."""
    asked = [[(hook, _submit(client, manifest, part, hook, n_tokens)) for hook, part in exported_parts(run_dir / "saes" / r["sae"], hooks)]
             for r in results]
    for result, jobs in zip(results, asked):
        result["downstream"] = {hook: _figures(client, *job) for hook, job in jobs}
        (run_dir / "saes" / result["sae"] / "eval.json").write_text(json.dumps(result, indent=1))
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    return results


def exported_parts(folder: Path, hooks: list[str]) -> list[tuple[str, Path]]:
    """An SAE's exports with the hook each is registered at: a folder per hook for a multi-hook SAE
    or per-layer transcoders; the one folder of a CLT, at its first input hook."""
    cfg = folder / "cfg.json"
    if len(hooks) == 1 or cfg.exists() and json.loads(cfg.read_text()).get("architecture") == "clt":
        return [(hooks[0], folder)]
    return [(hook, folder / hook) for hook in hooks]


def _submit(client: CacheClient, manifest: DatasetManifest, folder: Path, hook: str, n_tokens: int):
    """(the registered SAE, its evaluation job), or (None, why not)."""
    try:
        sae = client.register_sae(folder, manifest.dataset_id, hook)
        return sae, client.evaluate({"sae_id": sae.sae_id, "n_tokens": n_tokens})
    except CacheError as exc:
        return None, str(exc)


def _figures(client: CacheClient, sae, job) -> dict:
    if sae is None:
        return {"unavailable": job}
    try:
        job = client.wait_evaluation(job)
    except CacheError as exc:
        return {"unavailable": str(exc)}
    result = job.result
    figures = {"sae_id": sae.sae_id, "evaluation_id": job.evaluation_id, "n_tokens": result.n_tokens,
               "l0": result.l0, "explained_variance": result.explained_variance, "l2_ratio": result.l2_ratio}
    if result.downstream is None:
        return {**figures, "unavailable": result.downstream_unavailable}
    layers = {"layers": [m.model_dump() for m in result.layers]} if result.layers else {}  # a CLT's, one at a time
    return {**figures, **result.downstream.model_dump(), **layers}


def ce_loss_score(result: dict) -> float | None:
    """The SAE's CE loss score at its first hook, or None."""
    return next(iter(result.get("downstream", {}).values()), {}).get("ce_loss_score")


def downstream_columns(result: dict) -> tuple[str, str]:
    """The table's 'CE score' and 'KL' cells of one SAE (its first hook)."""
    figures = next(iter(result.get("downstream", {}).values()), None)
    if not figures or figures.get("ce_loss_score") is None:
        return "n/a", "n/a"
    return f"{figures['ce_loss_score']:.3f}", f"{figures['kl_div_with_sae']:.3f}"
