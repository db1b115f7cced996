"""The Python entry point for a notebook: one object, a method per job, each waiting for its
result and handing back objects (the CLIs do the same work: ``sae-train``, ``sae-pipeline``).

    from trainer.api import Cache

    with Cache.local("runs/notebook/store") as cache:   # or Cache("http://host:8000", token=...)
        dataset = cache.harvest("shakespeare-gpt", ["blocks.1.hook_resid_post"], tokens=65_536)
        run = cache.train(dataset, ["blocks.1.hook_resid_post"], {"sae": [{"k": [16, 32]}]}, out="runs/notebook/train")
        sae = run.saes[0]                      # a TrainedSae: its torch module, cfg and held-out figures
        cache.evaluate(sae).downstream        # spliced into the model on the server: CE loss score, KL
        cache.browse(sae)                      # the URL of its feature browser page

``docs/python.md`` walks through it, and the test suite runs that page.
"""

import webbrowser
from dataclasses import dataclass
from pathlib import Path

from shared.schemas import DatasetManifest, EvaluationResult, HarvestRequest, TextActivations
from trainer.config import sweep_from_dict
from trainer.data.client import CacheClient, CacheError
from trainer.data.local_server import LocalServer
from trainer.evaluation.downstream import exported_parts
from trainer.outputs.export import load_clt, load_saelens
from trainer.sae.autoencoder import SparseAutoencoder
from trainer.sae.clt import CrossLayerTranscoder
from trainer.training.distributed import World
from trainer.training.train import RunError, Trainer


@dataclass
class TrainedSae:
    """One exported SAE (or transcoder, or CLT) of a run, at one hook."""

    name: str
    hook: str
    folder: Path
    """Its SAELens-layout export (``cfg.json``, ``sae_weights.safetensors``)."""
    module: SparseAutoencoder | CrossLayerTranscoder
    """On raw activations: ``module.encode`` / ``module(x)`` as the export computes them."""
    cfg: dict
    figures: dict
    """Its held-out L0, FVU, dead latents... (the run's ``eval.json`` row)."""
    dataset_id: str
    held_out_chunks: list[int]
    """Chunks of its dataset it never trained on: its feature statistics cover them."""
    sae_id: str | None = None
    """Its id on the server, once registered (``evaluate`` and ``browse`` register it)."""


@dataclass
class Run:
    folder: Path
    dataset: DatasetManifest
    hooks: list[str]
    saes: list[TrainedSae]


class Cache:
    """A cache server, local or remote, and the jobs a notebook runs against it."""

    def __init__(self, url: str, token: str | None = None, _server: LocalServer | None = None):
        self.url = url.rstrip("/")
        self.client = CacheClient(self.url, token=token)
        self._server = _server

    @classmethod
    def local(cls, store: str | Path, port: int | None = None) -> "Cache":
        """Start a cache server on 127.0.0.1 over ``store`` (a folder; kept), stopped by ``close``."""
        server = LocalServer(Path(store), port=port).__enter__()
        return cls(server.url, _server=server)

    def close(self) -> None:
        self.client.close()
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self._server = None

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def harvest(self, model: str, hooks: list[str], tokens: int, context_size: int = 128, corpus: str | dict = "default",
                progress: bool = False, **request) -> DatasetManifest:
        """Harvest ``tokens`` rows of each hook (a cache hit when that dataset exists) and wait for it."""
        body = HarvestRequest(model=model, hooks=hooks, n_tokens=tokens, context_size=context_size, corpus=corpus, **request)
        return self.client.wait(self.client.harvest(body), progress=progress)

    def train(self, dataset: DatasetManifest | str, hooks: list[str], sweep: dict | None = None, out: str | Path = "runs/api",
              progress: bool = False) -> Run:
        """Train a sweep (the sweep file's tables as dicts: ``{"run": {...}, "sae": [{...}]}``; a list
        value is a grid axis) on the dataset's hooks, export every SAE and load them back."""
        manifest = dataset if isinstance(dataset, DatasetManifest) else self.client.manifest(dataset)
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise RunError(f"{out} already holds files; give another folder (a run is never overwritten)")
        world = World.from_env()
        try:
            trainer = Trainer(self.client, manifest, list(hooks), sweep_from_dict(sweep or {}), out, progress=progress,
                              world=world)
            trainer.prepare(resume=False)
            trainer.train()
            results = trainer.evaluate_and_export()
        finally:
            world.close()
        held_out = list(trainer.stream.eval_chunk_ids)
        saes = [_load(result, hook, part, manifest.dataset_id, held_out) for result in results
                for hook, part in exported_parts(out / "saes" / result["sae"], trainer.hooks)]
        return Run(out, manifest, trainer.hooks, saes)

    def evaluate(self, sae: TrainedSae, n_tokens: int = 16_384) -> EvaluationResult:
        """The SAE spliced into the model on held-out text (CE loss score, KL, ...), on the server."""
        job = self.client.wait_evaluation(self.client.evaluate({"sae_id": self._register(sae), "n_tokens": n_tokens}))
        return job.result

    def browse(self, sae: TrainedSae, open_page: bool = False) -> str:
        """Compute the SAE's feature statistics over its held-out chunks and give its page's URL;
        ``open_page``: open it in this machine's browser too."""
        sae_id = self._register(sae)
        self.client.wait_features(self.client.compute_features(sae_id, sae.held_out_chunks))
        url = f"{self.url}/saes/{sae_id}/"
        if open_page:
            webbrowser.open(url)
        return url

    def activations(self, sae: TrainedSae, text: str, feature: int | None = None, top: int = 5) -> TextActivations:
        """Each token of ``text``'s strongest features (and one feature's activations), on the server."""
        body = {"text": text, "top": top, **({"feature": feature} if feature is not None else {})}
        answer = self.client.request("POST", f"/v1/saes/{self._register(sae)}/activations", json=body)
        return TextActivations.model_validate(answer.json())

    def _register(self, sae: TrainedSae) -> str:
        if sae.sae_id is None:
            sae.sae_id = self.client.register_sae(sae.folder, sae.dataset_id, sae.hook).sae_id
        return sae.sae_id


def _load(result: dict, hook: str, folder: Path, dataset_id: str, held_out: list[int]) -> TrainedSae:
    if (folder / "sae_weights.safetensors").exists():
        module, cfg = load_saelens(folder)
    else:
        module = load_clt(folder)
        cfg = {"architecture": "clt"}
    return TrainedSae(name=result["sae"], hook=hook, folder=folder, module=module, cfg=cfg, figures=result,
                      dataset_id=dataset_id, held_out_chunks=held_out)


__all__ = ["Cache", "Run", "TrainedSae", "CacheError", "RunError"]
