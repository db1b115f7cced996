"""Downstream figures of a finished run: each exported SAE goes home to the cache server, which
splices it into the dataset's model on held-out text (``POST /v1/saes``, ``POST /v1/evaluations``).

The trainer needs no model weights for this. A server that cannot evaluate (a dataset with no
held-out text left, a model it cannot run) costs the run nothing: its reason is recorded and
printed in place of the figures.
"""

import json
from collections.abc import Callable
from pathlib import Path

from trainer.data.client import CacheClient, CacheError
from shared.schemas import DatasetManifest


def evaluate_downstream(client: CacheClient, manifest: DatasetManifest, hooks: list[str], run_dir: Path,
                        results: list[dict], n_tokens: int) -> list[dict]:
    """Adds ``downstream`` (one entry per hook: CE loss score, KL, ... or why not) to each result,
    and rewrites the run's and each SAE's eval.json with it."""
    return on_the_server(client, manifest, hooks, run_dir, results, "downstream",
                         start=lambda sae: client.evaluate({"sae_id": sae.sae_id, "n_tokens": n_tokens}),
                         finish=lambda sae, job: _figures(sae, client.wait_evaluation(job)))


def on_the_server(client: CacheClient, manifest: DatasetManifest, hooks: list[str], run_dir: Path, results: list[dict],
                  key: str, start: Callable, finish: Callable) -> list[dict]:
    """Each result's exported parts registered with the server and a job started for each
    (``start(sae)``) before any is waited on: the server works through its queue while the next
    SAE uploads, and no poll interval is paid per SAE. Then ``finish(sae, job)`` gives each part's
    entry under ``result[key]`` (a CacheError's message as ``unavailable``: it costs the run
    nothing), and the run's and each SAE's eval.json are rewritten with them."""
    asked = [[(hook, *_started(client, manifest, part, hook, start)) for hook, part in
              exported_parts(run_dir / "saes" / r["sae"], hooks)] for r in results]
    for result, parts in zip(results, asked):
        result[key] = {hook: _finished(finish, sae, job) for hook, sae, job in parts}
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


def _started(client: CacheClient, manifest: DatasetManifest, folder: Path, hook: str, start: Callable):
    """(the registered SAE, its job), or (None, why not)."""
    try:
        sae = client.register_sae(folder, manifest.dataset_id, hook)
        return sae, start(sae)
    except CacheError as exc:
        return None, str(exc)


def _finished(finish: Callable, sae, job) -> dict:
    if sae is None:
        return {"unavailable": job}
    try:
        return finish(sae, job)
    except CacheError as exc:
        return {"unavailable": str(exc)}


def _figures(sae, job) -> dict:
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
