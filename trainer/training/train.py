"""The training loop: every SAE of a sweep trains on each streamed batch (one fetch, decode and
shuffle per batch for all of them), with its own Adam, LR warmup, sparsity warmup and token
budget; metrics to ``metrics.jsonl``; checkpoints that resume exactly; evaluation on held-out
chunks; export in SAELens' layout.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shared.devices import resolve_device
from shared.schemas import DatasetManifest
from trainer.config import RunConfig, SAEConfig, Sweep, check_for_run, sae_names, split_cfgs
from trainer.data.client import CacheClient, CacheError
from trainer.data.stream import Batch, ChunkStream, StreamPosition
from trainer.evaluation.metrics import distinct_sequences, evaluate, geometric_median, iid_distinct_sequences
from trainer.outputs.export import export_clt, export_saelens, export_transcoder
from trainer.outputs.sinks import JsonlSink
from trainer.sae.autoencoder import SparseAutoencoder
from trainer.sae.clt import CrossLayerTranscoder
from trainer.sae.objectives import sae_loss
from trainer.sae.resample import resample_dead_neurons
from trainer.training.distributed import World
from trainer.training.memory import memory_problem
from trainer.training.optimizers import at_average, make_optimizer
from trainer.training.refit import MAX_LATENTS, refit_decoder
from trainer.training.schedulers import LRSchedule, Warmup

CHECKPOINT = "checkpoint.pt"
REFIT_LOAD_ROWS = 65_536
RUN_FILE = "run.json"


class RunError(Exception):
    """A problem with the run folder or the data, reported as one line."""


def _to_cpu(state):
    """A state dict's tensors on the CPU (gathered between ranks as pickles, which keep devices)."""
    if torch.is_tensor(state):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


def pick_device(setting: str, world: World = World()) -> torch.device:
    try:
        device = resolve_device(setting)
    except ValueError as exc:
        raise RunError(f"--device: {exc}") from None
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)  # one GPU per rank
    return device


class _Objective(torch.nn.Module):
    """An SAE and its training loss in one forward: what DDP wraps, so the backward of the loss
    all-reduces the SAE's gradients."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, sparsity_coefficient: float, dead: torch.Tensor | None):
        return sae_loss(self.sae, x, sparsity_coefficient, dead, y)


@dataclass
class SAEState:
    cfg: SAEConfig
    name: str
    """Distinct within the sweep (``sae_names``): the SAE's folder and its rows in metrics.jsonl."""
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    lr: LRSchedule
    sparsity: Warmup
    tokens_since_fired: torch.Tensor
    dead_after_tokens: int
    resample_every: int
    """Steps (0: never)."""
    last_resample: int
    """No resampling after this step: a latent resampled later has no time left to train, and an
    untrained one spoils the export (measured, BatchTopK: FVU 0.74 with a resampling at the last
    step). Resampling stops where the LR decay starts, or ``resample_every`` before the end."""
    objective: torch.nn.Module | None = None
    """``_Objective(sae)``; DDP-wrapped under torchrun when training starts."""

    def __post_init__(self):
        self.objective = self.objective or _Objective(self.sae)



def _variance(x: torch.Tensor) -> torch.Tensor:
    """Mean over rows (and components) of the squared distance from the batch mean: the scale of
    the summed-over-d_in MSE."""
    x = x.float()
    return ((x - x.mean(0)) ** 2).sum(-1).mean()


def _progress(groups, cfgs, rows: list[dict]) -> str:
    """The progress bar's summary, a part per group of SAEs: how many, their FVU and L0 ranges."""
    parts = []
    for group in groups:
        mine = [r for c, r in zip(cfgs, rows) if c in group]
        fvu, l0 = sorted(r["fvu"] for r in mine), sorted(r["l0"] for r in mine)
        span = (lambda v, f: f"{v[0]:{f}}" if len(v) == 1 else f"{v[0]:{f}}-{v[-1]:{f}}")
        parts.append(f"{len(mine)} {group[0].activation}: FVU {span(fvu, '.3f')} L0 {span(l0, '.0f')}")
    return " | ".join(parts)


def _stop_if_not_finite(rows: list[dict], step: int, every: int) -> None:
    """A loss gone NaN or infinite stays so: stop the run (nothing exported) and say which SAE."""
    for row in rows:
        if not math.isfinite(row["loss"]):
            raise RunError(f"SAE {row['sae']}: its loss is {row['loss']} at step {step} (checked every {every} "
                           "steps); lower its lr (or its coefficients) and start again; nothing was exported")


def train_step(s: SAEState, x: torch.Tensor, world: World = World(), y: torch.Tensor | None = None):
    """One optimizer step of one SAE on this rank's rows ``x`` (a transcoder's: and their targets
    ``y``), gradients averaged over ranks."""
    lr = s.lr.step()
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    dead = s.tokens_since_fired >= s.dead_after_tokens
    out = s.objective(x, y, s.sparsity.step(), dead if dead.any() else None)
    s.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if s.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(s.sae.parameters(), s.cfg.max_grad_norm, foreach=True)
    s.optimizer.step()
    s.tokens_since_fired += x.shape[0] * world.size
    s.tokens_since_fired[world.any_(out.fired)] = 0
    return out


class Trainer:
    def __init__(self, client: CacheClient, manifest: DatasetManifest, hooks: list[str], sweep: Sweep, out: Path,
                 progress: bool = True, sinks: list | None = None, world: World = World(), chunks=None,
                 server_is_stable: bool = True):
        self.client, self.manifest, self.hooks, self.sweep, self.out = client, manifest, hooks, sweep, out
        self.server_is_stable = server_is_stable
        """False for a server started for one run (sae-pipeline's): its URL is not written into exports."""
        self.chunks = chunks or client
        """Where chunk bytes come from: the server, or a ``StoreReader`` straight from the store."""
        self.run: RunConfig = sweep.run
        self.world = world
        self.by_saes = self.run.split == "saes" and world.size > 1
        self.share = World() if self.run.split == "saes" else world
        if self.by_saes and len(sweep.saes) < world.size:
            raise RunError(f"split = \"saes\" gives each of {world.size} ranks its own SAEs and the sweep has "
                           f"{len(sweep.saes)}: run fewer ranks, or split = \"data\"")
        """The ranks an SAE's step spans: all of them (data split), or this one (each rank its own SAEs)."""
        self.progress = progress and world.main
        self.extra_sinks = sinks or []  # wandb / tensorboard, besides metrics.jsonl
        self.targets = list(dict.fromkeys(h for c in sweep.saes for h in c.targets()))
        """The transcoders' target hooks: streamed after the input hooks, row-aligned with them."""
        self.stream_hooks = hooks + self.targets
        unknown = [h for h in self.stream_hooks if manifest.hook(h) is None]
        if unknown:
            raise RunError(f"dataset {manifest.dataset_id} has no hook '{unknown[0]}'; it holds "
                           f"{[h.name for h in manifest.hooks]}")
        self.device = pick_device(self.run.device, world)
        self.d_in = manifest.hook(hooks[0]).d
        self.n_components = len(hooks) if len(hooks) > 1 else None
        self._check_targets()
        if problem := memory_problem(sweep, self.d_in, len(hooks), self.device, len(self.stream_hooks)):
            raise RunError(problem)
        self.scales = [self._scale(h) for h in self.stream_hooks]
        self.step, self.tokens = 0, 0
        self.saes: list[SAEState] = []
        """This rank's SAEs: all of the sweep's, or under ``split = "saes"`` every ``world.size``-th."""
        self._use_lanes(self.run.lanes or self.share.size)

    def _check_targets(self) -> None:
        for cfg in self.sweep.saes:
            if cfg.target_hook is not None and len(cfg.targets()) != len(self.hooks):
                raise RunError(f"SAE {cfg.name()}: {len(cfg.targets())} target hook(s) for {len(self.hooks)} input "
                               "hook(s) (--hook): a transcoder reads one input hook per target (a list of "
                               "target_hook, one per --hook in order)")
        if both := sorted(set(self.hooks) & set(self.targets)):
            raise RunError(f"target_hook '{both[0]}' is an input hook (--hook): that is an SAE; drop target_hook")
        for hook in self.targets:
            if self.manifest.hook(hook).d != self.d_in:
                raise RunError(f"target_hook '{hook}' is {self.manifest.hook(hook).d} wide and the input "
                               f"'{self.hooks[0]}' {self.d_in}: a run streams hooks of one width")

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Streamed rows ``[n, (stream hook,) d]`` as the SAEs' inputs ``[n, (component,) d]`` and
        each target hook's rows ``[n, d]`` (views: no copy)."""
        if not self.targets:
            return rows, {}
        n = len(self.hooks)
        x = rows[:, 0] if n == 1 else rows[:, :n]
        return x, {hook: rows[:, n + i] for i, hook in enumerate(self.targets)}

    def target_rows(self, cfg: SAEConfig, ys: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """An SAE's target rows: none for an SAE, ``[n, d]`` for one target, ``[n, layer, d]`` for
        several, each at ``out_scales``."""
        if cfg.target_hook is None:
            return None
        if isinstance(cfg.target_hook, str):
            return ys[cfg.target_hook]
        rows = torch.stack([ys[h] for h in cfg.targets()], 1)
        if cfg.cross_layer:
            stream = [self.scales[len(self.hooks) + self.targets.index(h)] for h in cfg.targets()]
            rows *= torch.tensor([o / s for o, s in zip(self.out_scales(cfg), stream)], device=rows.device)[:, None]
        return rows

    def out_scales(self, cfg: SAEConfig) -> list[float]:
        """The scale of each target as the SAE sees it: its hook's, or for a CLT one for all its
        targets (their mean norm at sqrt(d)), so that a latent's decoder row, which spans several
        layers, keeps its direction in the model's units and the export's TopK ranks as training did."""
        scales = [self.scales[len(self.hooks) + self.targets.index(h)] for h in cfg.targets()]
        if not cfg.cross_layer or self.run.normalize_activations == "none":
            return scales
        norms = [self.manifest.hook(h).stats.mean_norm for h in cfg.targets()]
        return [math.sqrt(self.d_in) / (sum(norms) / len(norms))] * len(norms) if all(n > 0 for n in norms) else [1.0] * len(norms)

    def _use_lanes(self, lanes: int) -> None:
        """Stream this rank's lanes; ``positions`` holds each one's place (see trainer.training.distributed)."""
        run, share = self.run, self.share
        if lanes % share.size or run.batch_size % lanes:
            raise RunError(f"{lanes} stream lane(s) cannot be shared by {share.size} rank(s) with batch_size "
                           f"{run.batch_size}: lanes must be a multiple of the world size and divide the batch")
        mine = share.lanes_of_rank(lanes)
        window = max(1, run.shuffle_buffer_rows // lanes)
        self.lanes = lanes
        self.streams = [ChunkStream(
            self.chunks, self.manifest, self.stream_hooks, batch_size=run.batch_size // lanes, window_rows=window,
            seed=run.seed, device=self.device, eval_chunks=run.eval_chunks,
            prefetch_windows=max(1, run.prefetch_chunks // max(1, window // self.manifest.chunk_rows)),
            fetch_threads=max(1, run.fetch_threads // len(mine)), scales=self.scales, lane=lane, lanes=lanes)
            for lane in mine]
        self.positions = {lane: StreamPosition() for lane in mine}

    @property
    def stream(self) -> ChunkStream:
        """This rank's first lane (the only one in a single-process run)."""
        return self.streams[0]

    def _scale(self, hook: str) -> float:
        stats = self.manifest.hook(hook).stats
        if self.run.normalize_activations == "none" or stats.mean_norm <= 0:
            return 1.0
        return math.sqrt(self.manifest.hook(hook).d) / stats.mean_norm

    # -- run folder --------------------------------------------------------------------------
    def identity(self) -> dict:
        """What makes a run folder this run. Not the token budget: ``--resume --tokens N`` trains on."""
        run = {k: v for k, v in dataclasses.asdict(self.run).items()
               if k != "tokens" and (k, v) != ("split", "data")}  # runs from before splits resume
        return {"dataset_id": self.manifest.dataset_id, "hooks": self.hooks,
                "run": run, "saes": [c.record() for c in self.sweep.saes]}

    @property
    def total_steps(self) -> int:
        return self.run.tokens // self.run.batch_size

    def check_sweep(self) -> list[str]:
        """Refuse SAEs that cannot train on this dataset and budget (``ConfigError``); warnings for
        those that will train, but not as asked."""
        if self.total_steps == 0:
            raise RunError(f"tokens={self.run.tokens:,} is less than one batch of {self.run.batch_size:,} rows")
        warnings = [w for cfg in self.sweep.saes for w in check_for_run(cfg, self.d_in, self.total_steps, self.run.tokens)]
        rows = self.stream.rows_per_epoch
        if self.run.tokens > rows:
            warnings.append(f"tokens={self.run.tokens:,} is {self.run.tokens / rows:.1f} epochs of the dataset's "
                            f"{rows:,} training rows: every row is seen more than once (the held-out chunks never); "
                            "harvest more tokens for one pass")
        return warnings

    def prepare(self, resume: bool) -> None:
        """Check (rank 0) and open the run folder; load its checkpoint or initialise the SAEs."""
        warnings = self.check_sweep()
        error = None
        if self.world.main:
            try:
                self._claim_folder(resume)
            except RunError as exc:
                error = str(exc)
        error = self.world.from_main(error)
        if error:
            raise RunError(error)
        for warning in warnings if self.world.main else []:  # after the folder's checks: an error is one line
            print(f"warning: {warning}", file=sys.stderr)
        if self.world.main and self.world.size > 1:
            share = ("each trains every SAE on its share of each batch (DDP)" if self.run.split == "data" else
                     f"rank r trains SAEs r, r + {self.world.size}, ... of the sweep on whole batches")
            print(f"{self.world.size} ranks, split = \"{self.run.split}\": {share}", file=sys.stderr)
        checkpoint = self.out / CHECKPOINT
        if resume and checkpoint.exists():
            self._load(checkpoint)
        else:
            self._init_saes()

    def _claim_folder(self, resume: bool) -> None:
        run_file = self.out / RUN_FILE
        if resume and not run_file.exists():
            raise RunError(f"--resume: --out {self.out} holds no run to resume; drop --resume to start one there")
        if run_file.exists():
            recorded = json.loads(run_file.read_text())
            split = recorded.get("run", {}).get("split", "data")
            if split != self.run.split:
                raise RunError(f"--out {self.out} holds a run trained with split = \"{split}\": resume it with "
                               f"--split {split}")
            if recorded != json.loads(json.dumps(self.identity())):
                raise RunError(f"--out {self.out} holds another run (different dataset, hooks or sweep); "
                               "pick another folder")
            if not resume:
                raise RunError(f"--out {self.out} holds this run already; pass --resume to continue it")
        elif self.out.exists() and any(self.out.iterdir()):
            raise RunError(f"--out {self.out} is not empty and holds no run; pick another folder")
        self.out.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(self.identity(), indent=1))

    def _init_saes(self) -> None:
        cfgs = self.sweep.saes
        centres: dict[str, torch.Tensor | None] = {"zeros": None}
        sample = None
        if any(c.centre() != "zeros" or c.decoder_init == "data" for c in cfgs):
            sample = self._training_sample(max([8192] + [c.width(self.d_in) for c in cfgs if c.decoder_init == "data"]))
            rows = sample.unsqueeze(1) if sample.dim() == 2 else sample  # [n, stream hook, d]
            centres["mean"] = rows.float().mean(0)
        if any(c.centre() == "geometric_median" for c in cfgs):
            centres["geometric_median"] = torch.stack([geometric_median(rows[:8192, c]) for c in range(rows.shape[1])])
        self._build_saes(centres)
        x, ys = self.split(sample) if sample is not None else (None, {})
        for s in self.saes:
            if s.cfg.decoder_init == "data":
                s.sae.initialize_from_data(x, self.target_rows(s.cfg, ys))

    def _mine(self, index: int) -> bool:
        return not self.by_saes or index % self.world.size == self.world.rank

    def _build_saes(self, centres: dict[str, torch.Tensor | None], every: bool = False) -> None:
        """This rank's SAEs (``every``: all of the sweep's); ``centres``: each kind of centre of the
        streamed rows ``[stream hook, d]``. Each SAE draws its weights from its own seed, so which
        others a rank builds changes none."""
        self.saes, self.indices = [], []
        for index, (cfg, name) in enumerate(zip(self.sweep.saes, sae_names(self.sweep.saes))):
            if not (every or self._mine(index)):
                continue
            self.indices.append(index)
            centre, n = centres.get(cfg.centre()), len(self.hooks)
            if cfg.target_hook is None:
                sae = SparseAutoencoder(cfg, self.d_in, self.n_components,
                                        geometric_median_dataset=None if centre is None else centre[:n])
            else:
                if cfg.cross_layer:
                    sae = CrossLayerTranscoder(cfg, self.d_in, n, self.d_in)
                else:
                    sae = SparseAutoencoder(cfg, self.d_in, self.n_components, d_out=self.d_in)
                if centre is not None:
                    sae.initialize_tied_parameters(centre[:n], centre[[n + self.targets.index(h) for h in cfg.targets()]])
            sae = sae.to(self.device)
            steps = cfg.schedule_steps(self.total_steps)
            self.saes.append(SAEState(
                cfg=cfg, name=name, sae=sae, optimizer=make_optimizer(cfg.optimizer, sae.parameters(), cfg.lr),
                dead_after_tokens=cfg.dead_after_tokens(self.sweep.run.tokens),
                resample_every=steps["resample_every"],
                last_resample=self.total_steps - max(steps["lr_decay"], steps["resample_every"]),
                # schedule-free averaging replaces the decay
                lr=LRSchedule(cfg.lr, steps["lr_warmup"], 0 if cfg.optimizer != "adam" else steps["lr_decay"],
                              self.total_steps),
                sparsity=Warmup(0.0, cfg.l1_coefficient, steps["sparsity_warmup"]),
                tokens_since_fired=torch.zeros(self.n_components or 1, sae.d_sae, dtype=torch.long, device=self.device)))

    def _training_sample(self, max_rows: int = 8192) -> torch.Tensor:
        """Rows of the first training chunks (decoder directions, b_dec's geometric median, BatchTopK's threshold)."""
        return torch.cat(list(self._training_rows(max_rows)))

    def _training_rows(self, max_rows: int, load_rows: int | None = None) -> Iterator[torch.Tensor]:
        """The first ``max_rows`` rows of epoch 0's training chunks (at most all of them), loaded the
        chunks of ``load_rows`` rows at a time (None: at once)."""
        chunk_ids = self.stream.epoch_order(0)[: max(1, -(-max_rows // self.manifest.chunk_rows))]
        per_load = len(chunk_ids) if load_rows is None else max(1, load_rows // self.manifest.chunk_rows)
        left = max_rows
        with ThreadPoolExecutor(self.run.fetch_threads) as pool:
            for lo in range(0, len(chunk_ids), per_load):
                rows = self.stream.load_rows(chunk_ids[lo : lo + per_load], pool)[0][:left]
                left -= rows.shape[0]
                yield rows

    # -- checkpoints ---------------------------------------------------------------------------
    def _gathered(self, mine: list) -> list:
        """Per-SAE items of this rank's SAEs (in ``self.indices`` order) as the sweep's, in sweep
        order, on every rank (under ``split = "saes"``; otherwise this rank holds them all)."""
        if not self.by_saes:
            return mine
        pairs = [p for part in self.world.gather(list(zip(self.indices, mine))) for p in part]
        return [item for _, item in sorted(pairs, key=lambda p: p[0])]

    def _save(self) -> None:
        """Checkpoint; never weights gone NaN or infinite (the last good checkpoint stands)."""
        broken = self._gathered([None if all(torch.isfinite(p).all() for p in s.sae.parameters()) else s.name
                                 for s in self.saes])
        if broken := [name for name in broken if name]:
            raise RunError(f"SAE {broken[0]}: its weights are not finite at step {self.step}; lower its lr (or its "
                           "coefficients) and start again; nothing was exported, the last checkpoint stands")
        positions = {lane: dataclasses.asdict(p) for mine in self.world.gather(self.positions)
                     for lane, p in mine.items()}
        portable = _to_cpu if self.by_saes else (lambda state: state)
        saes = self._gathered([portable({
            "model": s.sae.state_dict(), "optimizer": s.optimizer.state_dict(), "lr": s.lr.state_dict(),
            "sparsity": s.sparsity.state_dict(), "tokens_since_fired": s.tokens_since_fired}) for s in self.saes])
        if not self.world.main:
            return
        state = {"step": self.step, "tokens": self.tokens, "lanes": self.lanes, "positions": positions, "saes": saes}
        tmp = self.out / (CHECKPOINT + ".partial")
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def _load(self, path: Path, every: bool = False) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        if any("b_in" in saved["model"] for saved in state["saes"]):
            raise RunError("this run's checkpoint is from an earlier version, whose transcoders subtracted a fixed "
                           "input mean (b_in); this one trains them on the raw input and cannot go on with it: "
                           "start the run again in a new --out")
        self._build_saes({}, every)  # every value comes from the checkpoint
        for s, saved in zip(self.saes, [state["saes"][i] for i in self.indices], strict=True):
            s.sae.load_state_dict(saved["model"])
            s.optimizer.load_state_dict(saved["optimizer"])
            s.lr.load_state_dict(saved["lr"])
            s.sparsity.load_state_dict(saved["sparsity"])
            s.tokens_since_fired = saved["tokens_since_fired"]
        self.step, self.tokens = state["step"], state["tokens"]
        self._use_lanes(state["lanes"])  # the run's lanes, whatever the world size now
        self.positions = {lane: StreamPosition(**state["positions"][lane]) for lane in self.positions}

    # -- training ------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[Batch, dict[int, StreamPosition]]]:
        """This rank's batches (one slice of each of its lanes), with every lane's position after it."""
        with contextlib.ExitStack() as stack:
            lanes = [stack.enter_context(contextlib.closing(stream.batches(self.positions[stream.lane])))
                     for stream in self.streams]
            for parts in zip(*lanes):
                positions = {stream.lane: part.position for stream, part in zip(self.streams, parts)}
                if len(parts) == 1:
                    yield parts[0], positions
                else:
                    yield Batch(torch.cat([b.activations for b in parts]), torch.cat([b.row_ids for b in parts]),
                                parts[0].position), positions

    def train(self, max_steps: int | None = None, should_stop=lambda: False) -> None:
        """Train until the token budget, ``max_steps`` more steps, or ``should_stop()`` (Ctrl-C)."""
        run, world = self.run, self.world
        total_steps = self.total_steps
        groups = split_cfgs(list(self.sweep.saes))
        bar = tqdm(total=total_steps * run.batch_size, initial=self.tokens, unit="tok", unit_scale=True,
                   desc="train", disable=not self.progress)
        rows_per_seq = self.manifest.context_size
        expected = iid_distinct_sequences(run.batch_size // self.share.size, self.manifest.n_items_total, rows_per_seq)
        sinks = [JsonlSink(self.out / "metrics.jsonl"), *self.extra_sinks] if world.main else []
        for s in self.saes:
            s.objective = self.share.wrap(_Objective(s.sae))
        t_last, tokens_last, steps_done = time.perf_counter(), self.tokens, 0
        try:
            for batch, positions in self.batches():
                stop = max_steps is not None and steps_done >= max_steps
                if self.step >= total_steps or stop or world.any_(torch.tensor([should_stop()]))[0]:
                    break
                x, ys = self.split(batch.activations)
                targets = [self.target_rows(s.cfg, ys) for s in self.saes]
                outputs = [train_step(s, x, self.share, y) for s, y in zip(self.saes, targets)]
                self.step += 1
                steps_done += 1
                self.tokens += run.batch_size
                self.positions = positions
                bar.update(run.batch_size)
                for s, y in zip(self.saes, targets):
                    if s.resample_every and self.step % s.resample_every == 0 and self.step <= s.last_resample:
                        self._resample(s, x, y)
                if self.step % run.log_every == 0 or self.step == total_steps:
                    now = time.perf_counter()
                    rate = (self.tokens - tokens_last) / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, self.tokens
                    shuffle = distinct_sequences(batch.row_ids // rows_per_seq) / expected
                    variance = self.share.mean(torch.stack([_variance(x if y is None else y) for y in targets])).tolist()
                    rows = self._gathered([{"step": self.step, "tokens": self.tokens, "sae": s.name,
                                            **self._logged(out, v), "lr": s.optimizer.param_groups[0]["lr"],
                                            "dead": int((s.tokens_since_fired >= s.dead_after_tokens).sum()),
                                            "tokens_per_second": rate, "shuffle_quality": shuffle}
                                           for s, out, v in zip(self.saes, outputs, variance)])
                    for sink in sinks:
                        sink.log(rows)
                    _stop_if_not_finite(rows, self.step, run.log_every)
                    bar.set_postfix_str(_progress(groups, self.sweep.saes, rows))
                if self.step % run.checkpoint_every == 0:
                    self._save()
        except CacheError as exc:  # the server went away for longer than the client retries
            if world.size > 1:  # a checkpoint is a collective: one rank cannot save alone
                raise
            self._save()
            raise CacheError(f"{exc}; checkpoint saved at step {self.step} of {total_steps}: start the server "
                             "and run again (sae-train: with --resume) to continue from it") from None
        finally:
            for sink in sinks:
                sink.close()
            bar.close()
        self._save()

    def _logged(self, out, variance: float) -> dict[str, float]:
        """A step's loss terms averaged over ranks, and its FVU (the batch's squared error over its
        variance: comparable across hooks and scales, where MSE is not)."""
        names = ("loss", "mse", "l0", "sparsity", "aux")
        values = dict(zip(names, self.share.mean(torch.stack([getattr(out, n).detach().float() for n in names])).tolist()))
        return {**values, "fvu": values["mse"] / variance if variance > 0 else float("nan")}

    def _resample(self, s: SAEState, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """sparse_autoencoder-style resampling of dead latents. Rank 0 draws from every rank's rows
        (in lane order, so ranks resample as one process with as many lanes does) with a generator
        seeded by the step (so a resumed run draws what an uninterrupted one draws); the others copy."""
        dead = s.tokens_since_fired >= s.dead_after_tokens
        if not dead.any():
            return
        gathered = (lambda t: torch.cat([part.to(t.device) for part in self.share.gather(t.cpu())])
                    if self.share.size > 1 else t)
        rows, targets = gathered(x), None if y is None else gathered(y)
        if self.share.main:
            generator = torch.Generator().manual_seed(self.run.seed * 1_000_003 + self.step)
            if isinstance(s.sae, CrossLayerTranscoder):
                s.sae.resample(s.optimizer, dead, rows, targets, generator)
            else:
                resample_dead_neurons(s.sae, s.optimizer, dead, rows, generator, targets)
        params = list(s.sae.parameters())
        self.share.broadcast_(params + [v for p in params for v in s.optimizer.state[p].values() if torch.is_tensor(v)])
        s.tokens_since_fired[dead] = 0

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    # -- evaluation and export -------------------------------------------------------------------
    def _export_metadata(self, hook: str) -> dict:
        return {"model_name": self.manifest.model.name, "hook_name": hook, "hook_head_index": None,
                "context_size": self.manifest.context_size, "prepend_bos": self.manifest.prepend_bos,
                "dataset_path": (f"{self.client.url}/v1/datasets/{self.manifest.dataset_id}"
                                 if self.server_is_stable else None),
                "dataset_id": self.manifest.dataset_id, "training_tokens": self.tokens}

    def evaluate_and_export(self) -> list[dict]:
        """Rank 0's part (every SAE: under ``split = "saes"`` read back from the last checkpoint)."""
        if self.by_saes:
            self._load(self.out / CHECKPOINT, every=True)
        for s in self.saes:
            at_average(s.optimizer)  # a schedule-free step's averaged weights are the trained ones
        rows, ys = self.split(self.stream.evaluation_rows()[0])
        from trainer.outputs import plots

        thresholded = [s for s in self.saes if s.cfg.activation == "batchtopk" or s.sae.transcoder and s.cfg.activation == "topk"]
        if thresholded:  # BatchTopK, and a TopK transcoder (SAELens has none), export as JumpReLU
            sample = self.split(self._training_sample().to(self.device))[0]
            for s in thresholded:
                s.sae.calibrate_threshold(sample)
        refit_rows = {s.name: self._refit(s) for s in self.saes}
        results, drawn = [], []
        for s in self.saes:
            metrics = evaluate(s.sae, rows, batch_size=self.run.batch_size, targets=self.target_rows(s.cfg, ys))
            folder = self.out / "saes" / s.name
            self._export(s, folder, metrics)
            summary = {"sae": s.name, **metrics.summary(), "d_sae": s.sae.d_sae, "tokens": self.tokens,
                       "eval_rows": rows.shape[0], "refit_rows": refit_rows[s.name]}
            (folder / "eval.json").write_text(json.dumps(summary, indent=1))
            drawn.append((metrics, folder, s.name))
            results.append(summary)
        shared = plots.log_freq_range([m.freqs for m, _, _ in drawn])  # one x-axis for the sweep
        for metrics, folder, name in drawn:
            plots.histograms(metrics.freqs, metrics.mean_values, folder, name, shared)
        plots.curves(self.out / "metrics.jsonl", self.out, [s.name for s in self.saes])
        (self.out / "eval.json").write_text(json.dumps(results, indent=1))
        return results

    def _refit(self, s: SAEState) -> int:
        """The decoder's least-squares refit (``trainer.training.refit``) on training rows: the first
        ``refit_rows`` of epoch 0's chunk order, loaded ``REFIT_LOAD_ROWS`` at a time. Returns the
        rows it used (0: none, the trained decoder stands). Each SAE reads the rows again: one Gram
        matrix, (d_sae + 1)^2, is in memory at a time, not the sweep's."""
        if not s.cfg.refit_rows or s.cfg.cross_layer:
            return 0

        def batches():
            for rows in self._training_rows(s.cfg.refit_rows, REFIT_LOAD_ROWS):
                x, ys = self.split(rows.to(self.device))
                y = self.target_rows(s.cfg, ys)
                for b in range(0, x.shape[0], self.run.batch_size):
                    yield x[b : b + self.run.batch_size], None if y is None else y[b : b + self.run.batch_size]

        used = refit_decoder(s.sae, batches(), s.cfg.refit_ridge)
        if not used:
            print(f"SAE {s.name}: no decoder refit past {MAX_LATENTS:,} latents (its system is d_sae^2); "
                  "the trained decoder is exported", file=sys.stderr)
        return used

    def _export(self, s: SAEState, folder: Path, metrics) -> None:
        """SAELens' layout, a folder per hook for a multi-hook SAE or per-layer transcoders;
        circuit-tracer's for a CLT."""
        targets, n = s.cfg.targets(), len(self.hooks)
        out_scales = self.out_scales(s.cfg)
        if s.cfg.cross_layer:
            export_clt(s.sae, folder, in_scales=self.scales[:n], out_scales=out_scales, hooks=self.hooks, targets=list(targets),
                       metadata=self._export_metadata(self.hooks[0]))
            return
        freqs = metrics.freqs.view(self.n_components or 1, -1)
        for c, hook in enumerate(self.hooks):
            part = folder / hook if self.n_components else folder
            if targets:
                export_transcoder(s.sae, part, component=c, scales=(self.scales[c], out_scales[c]), feature_frequency=freqs[c],
                                  metadata={**self._export_metadata(hook), "hook_name_out": targets[c]})
            else:
                export_saelens(s.sae, part, component=c, scale=self.scales[c], feature_frequency=freqs[c],
                               metadata=self._export_metadata(hook))

