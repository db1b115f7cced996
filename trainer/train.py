"""The training loop: every SAE of a sweep trains on each streamed batch (one fetch, decode and
shuffle per batch for all of them), with its own Adam, LR warmup, sparsity warmup and token
budget; metrics to ``metrics.jsonl``; checkpoints that resume exactly; evaluation on held-out
chunks; export in SAELens' layout.
"""

import dataclasses
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shared.schemas import DatasetManifest
from trainer.client import CacheClient
from trainer.config import RunConfig, SAEConfig, Sweep, split_cfgs
from trainer.export import export_saelens
from trainer.metrics import distinct_sequences, evaluate, geometric_median, iid_distinct_sequences
from trainer.objectives import sae_loss
from trainer.resample import resample_dead_neurons
from trainer.sae import SparseAutoencoder
from trainer.schedulers import Warmup
from trainer.sinks import JsonlSink
from trainer.stream import ChunkStream, StreamPosition

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"


class RunError(Exception):
    """A problem with the run folder or the data, reported as one line."""


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but torch sees no CUDA device")
    return device


@dataclass
class SAEState:
    cfg: SAEConfig
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    lr: Warmup
    sparsity: Warmup
    tokens_since_fired: torch.Tensor

    @property
    def name(self) -> str:
        return self.cfg.name()


def _adam(params, lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused Adam needs a recent torch on this device
        return torch.optim.Adam(params, lr=lr)


class Trainer:
    def __init__(self, client: CacheClient, manifest: DatasetManifest, hooks: list[str], sweep: Sweep, out: Path,
                 progress: bool = True, sinks: list | None = None):
        self.client, self.manifest, self.hooks, self.sweep, self.out = client, manifest, hooks, sweep, out
        self.run: RunConfig = sweep.run
        self.progress = progress
        self.extra_sinks = sinks or []  # wandb / tensorboard, besides metrics.jsonl
        unknown = [h for h in hooks if manifest.hook(h) is None]
        if unknown:
            raise RunError(f"dataset {manifest.dataset_id} has no hook '{unknown[0]}'; it holds "
                           f"{[h.name for h in manifest.hooks]}")
        self.device = pick_device(self.run.device)
        self.d_in = manifest.hook(hooks[0]).d
        self.n_components = len(hooks) if len(hooks) > 1 else None
        self.scales = [self._scale(h) for h in hooks]
        self.stream = ChunkStream(
            client, manifest, hooks, batch_size=self.run.batch_size, window_rows=self.run.shuffle_buffer_rows,
            seed=self.run.seed, device=self.device, eval_chunks=self.run.eval_chunks,
            prefetch_windows=max(1, self.run.prefetch_chunks // max(1, self.run.shuffle_buffer_rows // manifest.chunk_rows)),
            fetch_threads=self.run.fetch_threads, scales=self.scales)
        self.step, self.tokens, self.position = 0, 0, StreamPosition()
        self.saes: list[SAEState] = []

    def _scale(self, hook: str) -> float:
        stats = self.manifest.hook(hook).stats
        if self.run.normalize_activations == "none" or stats.mean_norm <= 0:
            return 1.0
        return math.sqrt(self.manifest.hook(hook).d) / stats.mean_norm

    # -- run folder --------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"dataset_id": self.manifest.dataset_id, "hooks": self.hooks,
                "run": dataclasses.asdict(self.run), "saes": [dataclasses.asdict(c) for c in self.sweep.saes]}

    def prepare(self, resume: bool) -> None:
        run_file = self.out / RUN_FILE
        if run_file.exists():
            recorded = json.loads(run_file.read_text())
            if recorded != json.loads(json.dumps(self.identity())):
                raise RunError(f"--out {self.out} holds another run (different dataset, hooks or sweep); "
                               "pick another folder")
            if not resume:
                raise RunError(f"--out {self.out} holds this run already; pass --resume to continue it")
        elif self.out.exists() and any(self.out.iterdir()):
            raise RunError(f"--out {self.out} is not empty and holds no run; pick another folder")
        self.out.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(self.identity(), indent=1))
        checkpoint = self.out / CHECKPOINT
        if resume and checkpoint.exists():
            self._load(checkpoint)
        else:
            self._init_saes()

    def _init_saes(self) -> None:
        sample = self._median_sample()
        sample = sample.unsqueeze(1) if sample.dim() == 2 else sample
        medians = torch.stack([geometric_median(sample[:, c]) for c in range(sample.shape[1])])
        self._build_saes(medians)

    def _build_saes(self, medians: torch.Tensor) -> None:
        self.saes = []
        for cfg in self.sweep.saes:
            sae = SparseAutoencoder(cfg, self.d_in, self.n_components, geometric_median_dataset=medians).to(self.device)
            self.saes.append(SAEState(
                cfg=cfg, sae=sae, optimizer=_adam(sae.parameters(), cfg.lr),
                lr=Warmup(0.0, cfg.lr, cfg.lr_warmup_steps), sparsity=Warmup(0.0, cfg.l1_coefficient, cfg.sparsity_warmup_steps),
                tokens_since_fired=torch.zeros(self.n_components or 1, sae.d_sae, dtype=torch.long, device=self.device)))

    def _median_sample(self, max_rows: int = 8192) -> torch.Tensor:
        """Rows of the first training chunks, for the geometric-median initialisation of b_dec."""
        with ThreadPoolExecutor(self.run.fetch_threads) as pool:
            chunk_ids = self.stream.epoch_order(0)[: max(1, -(-max_rows // self.manifest.chunk_rows))]
            rows, _ = self.stream.load_rows(chunk_ids, pool)
        return rows[:max_rows]

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self) -> None:
        state = {
            "step": self.step, "tokens": self.tokens, "position": dataclasses.asdict(self.position),
            "saes": [{"model": s.sae.state_dict(), "optimizer": s.optimizer.state_dict(), "lr": s.lr.state_dict(),
                      "sparsity": s.sparsity.state_dict(), "tokens_since_fired": s.tokens_since_fired} for s in self.saes],
        }
        tmp = self.out / (CHECKPOINT + ".partial")
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self._build_saes(torch.zeros(self.n_components or 1, self.d_in))  # every value comes from the checkpoint
        for s, saved in zip(self.saes, state["saes"], strict=True):
            s.sae.load_state_dict(saved["model"])
            s.optimizer.load_state_dict(saved["optimizer"])
            s.lr.load_state_dict(saved["lr"])
            s.sparsity.load_state_dict(saved["sparsity"])
            s.tokens_since_fired = saved["tokens_since_fired"]
        self.step, self.tokens = state["step"], state["tokens"]
        self.position = StreamPosition(**state["position"])

    # -- training ------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, should_stop=lambda: False) -> None:
        """Train until the token budget, ``max_steps`` more steps, or ``should_stop()`` (Ctrl-C)."""
        run = self.run
        total_steps = run.tokens // run.batch_size
        groups = split_cfgs(list(self.sweep.saes))
        bar = tqdm(total=total_steps * run.batch_size, initial=self.tokens, unit="tok", unit_scale=True,
                   desc="train", disable=not self.progress)
        rows_per_seq = self.manifest.context_size
        expected = iid_distinct_sequences(run.batch_size, self.manifest.n_items_total, rows_per_seq)
        generator = torch.Generator().manual_seed(run.seed)
        sinks = [JsonlSink(self.out / "metrics.jsonl"), *self.extra_sinks]
        t_last, tokens_last, steps_done = time.perf_counter(), self.tokens, 0
        try:
            for batch in self.stream.batches(self.position):
                if self.step >= total_steps or (max_steps is not None and steps_done >= max_steps) or should_stop():
                    break
                outputs = [self._step(s, batch.activations) for s in self.saes]
                self.step += 1
                steps_done += 1
                self.tokens += run.batch_size
                self.position = batch.position
                bar.update(run.batch_size)
                for s in self.saes:
                    if s.cfg.resample_every and self.step % s.cfg.resample_every == 0:
                        dead = s.tokens_since_fired >= s.cfg.dead_after_tokens
                        if dead.any():
                            resample_dead_neurons(s.sae, s.optimizer, dead, batch.activations, generator)
                            s.tokens_since_fired[dead] = 0
                if self.step % run.log_every == 0 or self.step == total_steps:
                    now = time.perf_counter()
                    rate = (self.tokens - tokens_last) / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, self.tokens
                    shuffle = distinct_sequences(batch.row_ids // rows_per_seq) / expected
                    rows = [{"step": self.step, "tokens": self.tokens, "sae": s.name, "loss": out.loss.item(),
                             "mse": out.mse.item(), "l0": out.l0.item(), "sparsity": out.sparsity.item(),
                             "aux": out.aux.item(), "lr": s.optimizer.param_groups[0]["lr"],
                             "dead": int((s.tokens_since_fired >= s.cfg.dead_after_tokens).sum()),
                             "tokens_per_second": rate, "shuffle_quality": shuffle}
                            for s, out in zip(self.saes, outputs)]
                    for sink in sinks:
                        sink.log(rows)
                    bar.set_postfix_str(" | ".join(
                        f"{g[0].activation}: loss {min(o.loss.item() for s, o in zip(self.saes, outputs) if s.cfg in g):.3g}"
                        f" L0 {min(o.l0.item() for s, o in zip(self.saes, outputs) if s.cfg in g):.0f}" for g in groups))
                if self.step % run.checkpoint_every == 0:
                    self._save()
        finally:
            for sink in sinks:
                sink.close()
            bar.close()
        self._save()

    def _step(self, s: SAEState, x: torch.Tensor):
        lr = s.lr.step()
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        dead = s.tokens_since_fired >= s.cfg.dead_after_tokens
        out = sae_loss(s.sae, x, s.sparsity.step(), dead if dead.any() else None)
        s.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        s.sae.remove_parallel_gradient()
        s.optimizer.step()
        s.sae.post_backwards_hook()
        s.tokens_since_fired += x.shape[0]
        s.tokens_since_fired[out.fired] = 0
        return out

    @property
    def finished(self) -> bool:
        return self.step >= self.run.tokens // self.run.batch_size

    # -- evaluation and export -------------------------------------------------------------------
    def evaluate_and_export(self) -> list[dict]:
        rows, _ = self.stream.evaluation_rows()
        from trainer import plots

        results = []
        for s in self.saes:
            metrics = evaluate(s.sae, rows, batch_size=self.run.batch_size)
            folder = self.out / "saes" / s.name
            for c, hook in enumerate(self.hooks):
                target = folder / hook if self.n_components else folder
                freqs = metrics.freqs.view(self.n_components or 1, -1)[c]
                export_saelens(s.sae, target, component=c, scale=self.scales[c], feature_frequency=freqs, metadata={
                    "model_name": self.manifest.model.name, "hook_name": hook, "hook_head_index": None,
                    "context_size": self.manifest.context_size, "prepend_bos": self.manifest.prepend_bos,
                    "dataset_path": f"{self.client.url}/v1/datasets/{self.manifest.dataset_id}",
                    "dataset_id": self.manifest.dataset_id, "training_tokens": self.tokens})
            summary = {"sae": s.name, **metrics.summary(), "d_sae": s.sae.d_sae, "tokens": self.tokens,
                       "eval_rows": rows.shape[0]}
            (folder / "eval.json").write_text(json.dumps(summary, indent=1))
            plots.histograms(metrics.freqs, metrics.mean_values, folder, s.name)
            results.append(summary)
        plots.curves(self.out / "metrics.jsonl", self.out, [s.name for s in self.saes])
        (self.out / "eval.json").write_text(json.dumps(results, indent=1))
        return results
