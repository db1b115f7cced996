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
    and rewrites the run's and each SAE's eval.json with it."""
    for result in results:
        folder = run_dir / "saes" / result["sae"]
        result["downstream"] = {hook: not_on_server(folder) or _one(client, manifest, folder / hook if len(hooks) > 1
                                                                     else folder, hook, n_tokens) for hook in hooks}
        (folder / "eval.json").write_text(json.dumps(result, indent=1))
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    return results


CLT_NOT_YET = "n/a: the cache server does not take cross-layer transcoders yet (no splice, no browser pages)"


def not_on_server(folder: Path) -> dict | None:
    """Why an export cannot go home to the server (a CLT's), or None."""
    cfg = folder / "cfg.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("architecture") == "clt":
        return {"unavailable": CLT_NOT_YET}
    return None


def _one(client: CacheClient, manifest: DatasetManifest, folder: Path, hook: str, n_tokens: int) -> dict:
    try:
        sae = client.register_sae(folder, manifest.dataset_id, hook)
        job = client.wait_evaluation(client.evaluate({"sae_id": sae.sae_id, "n_tokens": n_tokens}))
    except CacheError as exc:
        return {"unavailable": str(exc)}
    result = job.result
    figures = {"sae_id": sae.sae_id, "evaluation_id": job.evaluation_id, "n_tokens": result.n_tokens,
               "l0": result.l0, "explained_variance": result.explained_variance, "l2_ratio": result.l2_ratio}
    if result.downstream is None:
        return {**figures, "unavailable": result.downstream_unavailable}
    return {**figures, **result.downstream.model_dump()}


def ce_loss_score(result: dict) -> float | None:
    """The SAE's CE loss score at its first hook, or None."""
    return next(iter(result.get("downstream", {}).values()), {}).get("ce_loss_score")


def downstream_columns(result: dict) -> tuple[str, str]:
    """The table's 'CE score' and 'KL' cells of one SAE (its first hook)."""
    figures = next(iter(result.get("downstream", {}).values()), None)
    if not figures or figures.get("ce_loss_score") is None:
        return "n/a", "n/a"
    return f"{figures['ce_loss_score']:.3f}", f"{figures['kl_div_with_sae']:.3f}"
