"""Frozen configs: one ``SAEConfig`` per SAE of a sweep, one ``RunConfig`` for the stream and loop.

A sweep file (TOML) holds a ``[run]`` table and ``[[sae]]`` tables; any SAE key given as a list
expands into one SAE per value (a grid). ``split_cfgs`` groups the SAEs that can share a batch.
"""

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

# The allowed range of every setting is in its type: checked where a sweep is read (``load_sweep``).
# strict: 3.5 is no k, true is no 1, "3" is no number.
Positive = Annotated[int, Field(ge=1, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
Schedule = Annotated[int, Field(ge=0, strict=True)] | Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]
"""Steps (an int), or a fraction of the run (a float from 0 to 1)."""
Seed = Annotated[int, Field(ge=0, lt=2**63, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]

Activation = Literal["relu", "jumprelu", "topk", "batchtopk"]
_SCHEDULES = ("lr_warmup", "lr_decay", "sparsity_warmup", "resample_every")
"""SAEConfig fields read as a fraction of the run's steps (a float) or as steps (an int)."""
_RELATIVE = _SCHEDULES + ("dead_after",)
"""...and those that may not exceed the whole run (a float at most 1)."""
Objective = Literal["vanilla", "matryoshka"]
Hook = Annotated[str, Field(strict=True, min_length=1)]


@dataclass(frozen=True)
class SAEConfig:
    """One SAE. Defaults are the measured recipe (bench/quality.py): TopK k=32 at x8; the tied bias
    at the data's mean (TopK family) or zero, decoder rows from it towards random training rows, at
    norm 0.3 (TopK family) or 0.1, the encoder as their transpose; schedule-free Adam at lr 8e-3
    with gradient-norm clipping; dead latents resampled every twentieth of the run until its last
    fifth; after training, the decoder refit by least squares on training rows.

    Schedules (``lr_warmup``, ``lr_decay``, ``sparsity_warmup``, ``resample_every``) are relative
    to the run: a float is a fraction of its steps, an int a number of steps."""

    activation: Activation = "topk"
    """The latents' nonlinearity: ``topk`` (the k largest a row), ``batchtopk`` (the k x batch largest
    over the batch, so k a row on average; a calibrated threshold at inference), ``relu`` (with an
    L1 penalty) or ``jumprelu`` (a learnt threshold per latent, with a tanh or L0 penalty)."""
    objective: Objective = "vanilla"
    """``vanilla``: reconstruction plus sparsity; ``matryoshka``: the reconstruction of every nested
    prefix of the dictionary (``matryoshka_prefixes``) summed, so early latents stay general."""
    target_hook: Hook | tuple[Hook, ...] | None = None
    """Make this a transcoder: predict this hook's activations (e.g. ``blocks.2.hook_mlp_out``) from
    the input hook's (``--hook``, e.g. ``blocks.2.mlp.hook_in``), both from one harvest, row-aligned.
    A list, one target per ``--hook`` in order: a transcoder per layer in one module (or, with
    ``cross_layer``, a CLT). Unset: an SAE, which reconstructs its input. FVU is measured against
    the target. (A list is one setting here, not a grid axis.)"""
    skip: Annotated[bool, Field(strict=True)] = False
    """A transcoder's linear skip path from input to target (``W_skip``, from zero), trained with
    it: a skip transcoder (Paulo et al., 2025)."""
    cross_layer: Annotated[bool, Field(strict=True)] = False
    """With a list of ``target_hook``, one per ``--hook`` in layer order: a cross-layer transcoder,
    whose latents at each input hook write to that layer's target and every later one's (TopK per
    layer; see ``trainer.sae.clt``)."""
    expansion: Positive = 8
    """d_sae = expansion * d_in (ignored when d_sae is set)."""
    d_sae: Positive | None = None
    """The number of latents; unset: ``expansion * d_in``."""
    k: Positive = 32
    """Active latents per token for topk / batchtopk."""
    l1_coefficient: NonNegativeFloat = 5.0
    """Sparsity coefficient on SAELens' scale (squared error summed over d_in, penalty summed over
    latents, both averaged over rows): L1 of the decoder-norm-weighted activations (relu) or the
    L0 (jumprelu); unused by topk / batchtopk."""
    lr: PositiveFloat = 8e-3
    """The learning rate (the step size of ``signsgd``). 8e-3 is schedule-free Adam's best measured
    (docs/benchmarks.md: TopK, BatchTopK, ReLU, JumpReLU and transcoders, 1,536 to 3,072 latents;
    2x this diverges). Plain ``adam`` wants 1e-3 (past 2e-3 it diverged); larger dictionaries may
    want less (sparsify scales its lr by 1 / sqrt(d_sae))."""
    optimizer: Literal["adam", "signsgd", "schedulefree_adam"] = "schedulefree_adam"
    """``schedulefree_adam``: schedule-free Adam (``schedulefree.AdamWScheduleFree``, beta1 0.9 as
    its interpolation, no weight decay), whose running average of the weights is what gets
    evaluated and exported: it trains stably at 8x Adam's lr, and at matched L0 every architecture
    measured reconstructs better under it than under Adam at 1e-3 (docs/benchmarks.md). ``adam``:
    torch's Adam, with ``lr_decay``. ``signsgd``: EleutherAI sparsify's step, SignSGD (every weight
    moves by ``lr`` along its gradient's sign) under schedule-free averaging (momentum 0.95; sparsify's
    lr for it: 5e-3 / sqrt(d_sae / 16384)), a resampled latent's average restarted
    (``ScheduleFreeSign``). At 100 steps of 4,096 rows and sparsify's lr it beat schedule-free Adam
    on every SAE architecture on shakespeare-gpt (TopK at 0.86-0.9x sparsify's FVU) and the ReLU
    family on MiniLM; at 1,024 rows it wants half that lr; transcoders do worse under it, and by 500
    steps it stops improving where schedule-free Adam goes on (docs/benchmarks.md).
    The schedule-free steps take no LR decay (``lr_decay`` then only ends resampling)."""
    lr_warmup: Schedule = 0.0
    """Linear LR warmup from 0 (fraction of the run's steps, or steps)."""
    lr_decay: Schedule = 0.2
    """Linear LR decay to 0 at the end of the run (fraction of the run's steps, or steps)."""
    sparsity_warmup: Schedule = 0.0
    """Linear warmup of the sparsity coefficient from 0 (fraction of the run's steps, or steps)."""
    max_grad_norm: NonNegativeFloat = 1.0
    """Clip the gradient's norm to this before each step (0: no clipping), as SAELens does."""
    refit_rows: NonNegativeInt = 131_072
    """After training, solve the decoder (its rows and bias) by least squares for the trained
    encoder's latents on this many training rows (at most the dataset's), each row pulled towards
    the trained one by ``refit_ridge`` (``trainer.training.refit``); 0: keep the trained decoder. The
    encoder is untouched, so L0 and dead latents stay as trained; a CLT keeps its decoders. Measured
    at 409,600 training tokens (shakespeare-gpt, TopK, held out): FVU 0.082 -> 0.071 (k=16) and
    0.056 -> 0.050 (k=32) over 131,072 rows; 0.072 over 65,536; 0.079 over 16,384. Costs a
    (d_sae + 1)^2 system per SAE: skipped, with a note, past 16,384 latents."""
    refit_ridge: NonNegativeFloat = 1e-2
    """The refit's pull towards the trained rows, relative to the latents' mean squared activation
    (1e-2 and 1e-3 measured alike over 131,072 rows; 1e-2 is better over 16,384)."""
    decoder_init: Literal["data", "random", "zeros"] = "data"
    """Directions of the decoder rows at initialisation: those of distinct random training rows
    (every latent starts on the data, so fewer die), or random ones (SAELens). ``zeros``: sparsify's
    transcoder init, the decoder from zero and its rows free (the SAE computes with them as stored,
    not at unit norm), the encoder's entries uniform in +-1/sqrt(d_in) (``nn.Linear``'s). Measured on
    transcoders (docs/benchmarks.md): held-out FVU 6-10% higher than from ``data``, CE score 0.002
    lower to 0.011 higher; not for a CLT."""
    decoder_init_norm: PositiveFloat | None = None
    """Norm of the decoder rows at initialisation (the encoder starts as their transpose). Unset:
    0.3 for topk / batchtopk, 0.1 (SAELens') for relu / jumprelu (measured at lr 4e-4: TopK k=32's
    FVU 0.254 at 0.1, 0.200 at 0.3; a ReLU at 0.3 starts with FVU 26 and in 25 steps ends at 26,
    at 0.1 at 0.59)."""
    b_dec_init: Literal["auto", "mean", "zeros", "geometric_median"] = "auto"
    """Decoder bias at initialisation: the mean of a sample of training rows (data-init decoder
    rows then point from it to their rows), zeros (SAELens), or the geometric median
    (sparse_autoencoder). ``auto``: the mean for topk / batchtopk, zeros for relu / jumprelu
    (measured at 100 steps: TopK k=32 leaves 7% of latents dead from the mean, 12% from zeros, at
    the same FVU; a ReLU at coefficient 3 starting from the mean ends at L0 467, not 162)."""

    def row_norm(self) -> float:
        """``decoder_init_norm``, resolved."""
        if self.decoder_init_norm is not None:
            return self.decoder_init_norm
        return 0.3 if self.activation in ("topk", "batchtopk") else 0.1

    def centre(self) -> str:
        """``b_dec_init`` with ``auto`` resolved."""
        if self.b_dec_init != "auto":
            return self.b_dec_init
        return "mean" if self.activation in ("topk", "batchtopk") else "zeros"

    jumprelu_threshold: NonNegativeFloat = 1e-3
    """JumpReLU's initial threshold (in activation units: what a latent adds to the reconstruction)."""
    jumprelu_bandwidth: PositiveFloat = 1e-3
    """Width of the rectangle kernel of the threshold's straight-through gradient."""
    jumprelu_sparsity: Literal["tanh", "step"] = "tanh"
    """JumpReLU's penalty: sum of tanh(jumprelu_tanh_scale * activation) (Anthropic, 2025), whose
    gradient reaches the encoder, or DeepMind's L0 step, whose gradient reaches only the thresholds
    (too slow to sparsify a short run: measured dense)."""
    jumprelu_tanh_scale: PositiveFloat = 4.0
    """The tanh penalty's scale: each latent costs tanh(scale * activation), about 1 once it fires clearly."""
    matryoshka_prefixes: tuple[Positive, ...] = ()
    """Dictionary prefix sizes for matryoshka; default d_sae/8, d_sae/4, d_sae/2, d_sae."""
    aux_k: Positive = 256
    """AuxK (topk, batchtopk): the dead latents that explain the main reconstruction's residual, a row."""
    aux_coefficient: NonNegativeFloat = 1 / 32
    """AuxK's loss weight against the reconstruction's."""
    dead_after: Positive | Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, strict=True)] = 0.05
    """A latent that has not fired for this long counts as dead (AuxK, resampling): a fraction of
    the run's tokens (a float), or tokens (an int). 0.05, not 0.1: latents caught sooner leave fewer
    dead at the end (measured at 100 steps, held-out never-fired: BatchTopK 0.4% not 1.8%, JumpReLU
    at coefficient 3 1.2% not 3.9%, at the same or lower FVU); 0.03 churns Matryoshka (FVU 0.29, not 0.22)."""
    resample_every: Schedule = 0.05
    """Resample dead latents this often (fraction of the run's steps, or steps; 0: never): point
    them at badly reconstructed rows (sparse_autoencoder's method), so that a short run ends with
    almost none dead (measured, TopK k=32 at 100 steps: 0.2% dead, not 12%, at the same FVU)."""
    seed: Seed = 0
    """Initialisation seed. SAEs of a sweep share it unless told otherwise, so a data-initialised
    feature i starts at the same training row in each: feature indices tend to line up across a sweep."""

    def schedule_steps(self, total_steps: int) -> dict[str, int]:
        """``lr_warmup``, ``lr_decay`` and ``sparsity_warmup`` in steps of a run of ``total_steps``."""
        return {name: steps_of(getattr(self, name), total_steps) for name in _SCHEDULES}

    def dead_after_tokens(self, run_tokens: int) -> int:
        return steps_of(self.dead_after, run_tokens)

    def targets(self) -> tuple[str, ...]:
        """The target hooks, one per input hook (none for an SAE)."""
        return () if self.target_hook is None else (self.target_hook,) if isinstance(self.target_hook, str) else self.target_hook

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in

    def prefixes(self, d_in: int) -> tuple[int, ...]:
        d_sae = self.width(d_in)
        return self.matryoshka_prefixes or (d_sae // 8, d_sae // 4, d_sae // 2, d_sae)

    def record(self) -> dict:
        """The settings this SAE uses, for run.json: none that its activation or objective ignores
        (a ReLU has no k, a TopK no l1_coefficient)."""
        unused = set()
        if self.activation not in ("topk", "batchtopk"):
            unused |= {"k", "aux_k", "aux_coefficient"}
        if self.activation not in ("relu", "jumprelu"):
            unused |= {"l1_coefficient", "sparsity_warmup"}
        if self.activation != "jumprelu":
            unused |= {f.name for f in dataclasses.fields(self) if f.name.startswith("jumprelu_")}
        elif self.jumprelu_sparsity != "tanh":
            unused.add("jumprelu_tanh_scale")
        if self.objective != "matryoshka":
            unused.add("matryoshka_prefixes")
        if self.target_hook is None:  # so the run.json of an SAE sweep is what it was before transcoders
            unused |= {"target_hook", "skip", "cross_layer"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}

    def name(self) -> str:
        parts = [self.activation, self.objective, f"x{self.d_sae or self.expansion}"]
        if self.activation in ("topk", "batchtopk"):
            parts.append(f"k{self.k}")
        else:
            parts.append(f"l1_{self.l1_coefficient:g}")
        parts += [f"lr{self.lr:g}", f"s{self.seed}"] + ([self.optimizer] if self.optimizer != "schedulefree_adam" else [])
        if self.target_hook is not None:
            parts.insert(0, "clt" if self.cross_layer else "skip-transcoder" if self.skip else "transcoder")
        return "-".join(parts)


@dataclass(frozen=True)
class RunConfig:
    """The stream and the loop, shared by every SAE of a sweep (the sweep file's ``[run]`` table)."""

    batch_size: Positive = 4096
    """Rows a step (every SAE of the sweep trains on the same batches)."""
    tokens: Positive = 10_000_000
    """Training tokens per SAE (saev's BatchLimiter)."""
    device: Annotated[str, Field(strict=True)] = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    seed: Seed = 0
    """Seeds the epochs' chunk order and the shuffle (and so which chunks are held out)."""
    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    """Scale inputs so their mean norm is sqrt(d_in), using the manifest's statistics."""
    shuffle_buffer_rows: Positive = 262_144
    """Rows mixed before batching: a window of chunks shuffled together (on the CPU about six windows
    of rows x d x 4 bytes are alive at once)."""
    prefetch_chunks: Positive = 8
    """Chunks fetched ahead of the one being read."""
    fetch_threads: Annotated[int, Field(ge=1, le=256, strict=True)] = 4
    """Threads fetching and decoding chunks."""
    lanes: Annotated[int, Field(ge=0, strict=True)] = 0
    """Streams an epoch is split into (0: the world size at the start of the run under ``split =
    "data"``, 1 under ``"saes"``); see trainer.training.distributed. A run keeps its lanes when
    resumed with another world size."""
    split: Literal["data", "saes"] = "data"
    """How ranks under ``torchrun`` share a sweep: ``data`` (DDP: every SAE on every rank, each rank
    its share of every batch's rows, gradients averaged) or ``saes`` (each rank trains every
    ``world size``-th SAE of the sweep on whole batches, no gradient traffic; as sparsify's
    ``distribute_modules``): for a sweep of many SAEs, each rank holds only its own. A run
    resumes under the split it started with."""
    eval_chunks: Positive = 2
    """Chunks held out (never trained on) for evaluation."""
    log_every: Positive = 50
    """Steps between metric lines (loss, L0, FVU, dead latents, tokens/s)."""
    checkpoint_every: Positive = 500
    """Steps between checkpoints (``--resume`` continues from the last; Ctrl-C writes one too)."""


@dataclass(frozen=True)
class Sweep:
    run: RunConfig
    saes: tuple[SAEConfig, ...] = field(default_factory=lambda: (SAEConfig(),))


class ConfigError(ValueError):
    pass


def steps_of(value: float, total_steps: int) -> int:
    """A schedule length: an int is steps, a float a fraction of ``total_steps``.

    >>> steps_of(100, 1000), steps_of(0.05, 1000), steps_of(0.0, 1000)
    (100, 50, 0)
    """
    return value if isinstance(value, int) else round(value * total_steps)


def check_for_run(cfg: SAEConfig, d_in: int, total_steps: int, run_tokens: int) -> list[str]:
    """Refuse (``ConfigError``) what cannot train on this data and budget; return warnings for what
    will train but not as asked. Runs before the first step."""
    where, d_sae = f"SAE {cfg.name()}", cfg.width(d_in)
    if cfg.activation in ("topk", "batchtopk") and cfg.k >= d_sae:
        raise ConfigError(f"{where}: k={cfg.k} must be below d_sae={d_sae} (d_in {d_in} x expansion {cfg.expansion})")
    if cfg.skip and cfg.target_hook is None:
        raise ConfigError(f"{where}: skip = true is a transcoder's skip path: give target_hook too")
    if cfg.cross_layer and (isinstance(cfg.target_hook, str) or len(cfg.targets()) < 2):
        raise ConfigError(f"{where}: cross_layer = true needs target_hook as a list of two or more hooks, one per "
                          "--hook in layer order")
    if cfg.cross_layer and (cfg.activation != "topk" or cfg.objective != "vanilla" or cfg.skip):
        raise ConfigError(f"{where}: a cross-layer transcoder is a vanilla TopK per layer without a skip path here; "
                          f"got activation={cfg.activation!r}, objective={cfg.objective!r}, skip={cfg.skip}")
    if cfg.cross_layer and cfg.decoder_init == "zeros":
        raise ConfigError(f"{where}: decoder_init = \"zeros\" (free decoder rows) is not available for a cross-layer "
                          "transcoder, whose rows compute at unit norm: use \"data\" or \"random\"")
    if cfg.objective == "matryoshka" and not all(0 < m <= d_sae for m in cfg.prefixes(d_in)):
        raise ConfigError(f"{where}: matryoshka_prefixes {list(cfg.prefixes(d_in))} must lie in 1..d_sae={d_sae}")
    steps = cfg.schedule_steps(total_steps)
    if steps["lr_warmup"] + steps["lr_decay"] > total_steps:
        raise ConfigError(f"{where}: lr_warmup ({steps['lr_warmup']} steps) + lr_decay ({steps['lr_decay']} steps) "
                          f"is longer than the run's {total_steps} steps; give them as fractions (e.g. 0.05)")
    warnings = []
    if steps["sparsity_warmup"] > total_steps and cfg.activation in ("relu", "jumprelu"):
        warnings.append(f"{where}: sparsity_warmup ({steps['sparsity_warmup']} steps) outlasts the run's "
                        f"{total_steps} steps: the sparsity coefficient never reaches {cfg.l1_coefficient:g}")
    uses_dead = steps["resample_every"] or cfg.activation in ("topk", "batchtopk")
    if uses_dead and cfg.dead_after_tokens(run_tokens) >= run_tokens:
        warnings.append(f"{where}: dead_after={cfg.dead_after_tokens(run_tokens):,} tokens is not below the run's "
                        f"{run_tokens:,} tokens: no latent will count as dead, so AuxK / resampling never act")
    return warnings


def _build(cls, table: dict, where: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table of settings, not {table!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        cfg = TypeAdapter(cls).validate_python(values)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_problems(exc, values)}") from None
    return cfg


def _problems(exc: ValidationError, values: dict) -> str:
    """One clause per setting: ``key=value: what is wrong``. Of a union's branches (an int or a
    float), the one of the value's own type says it."""
    found: dict[str, str] = {}
    for error in exc.errors():
        name, *rest = error["loc"] or ("?",)
        value = values.get(name, error.get("input"))
        branch = rest[0].removeprefix("constrained-") if rest and isinstance(rest[0], str) else None
        if branch in ("int", "float") and branch != (type(value).__name__ if type(value) in (int, float) else "float"):
            continue  # the other branch's error is the one that speaks to this value
        if branch and (branch.startswith("tuple") != isinstance(value, tuple)) and branch != "none":
            continue  # a hook or a list of hooks: the branch of the value's own shape speaks
        index = "".join(f"[{p}]" for p in rest if isinstance(p, int))
        message = error["msg"].replace("Input should be", "must be")
        if name in _RELATIVE and "less than or equal to 1" in message:
            message = f"a float is a fraction of the run (at most 1); an int counts {'tokens' if name == 'dead_after' else 'steps'}"
        found.setdefault(name, f"{name}{index}={error.get('input') if index else value!r}: {message}")
    return "; ".join(found.values()) or str(exc)


def _expand(table: dict, where: str) -> list[dict]:
    """A list value (other than matryoshka_prefixes and target_hook) is a grid axis."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table of settings ([[sae]]), not {table!r}")
    axes = {k: v for k, v in table.items() if isinstance(v, list) and k not in ("matryoshka_prefixes", "target_hook")}
    empty = [k for k, v in axes.items() if not v]
    if empty:
        raise ConfigError(f"{where}: {empty[0]} = []: an empty list gives no SAE; give one value or several")
    fixed = {k: v for k, v in table.items() if k not in axes}
    return [{**fixed, **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())]


def load_sweep(path: Path | None, overrides: dict | None = None) -> Sweep:
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read sweep file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"sweep file {path} is not valid TOML: {exc}") from None
    return sweep_from_dict(data, overrides)


def sweep_from_dict(data: dict, overrides: dict | None = None) -> Sweep:
    """A sweep from the sweep file's tables as Python values: ``{"run": {...}, "sae": [{...}, ...]}``
    (a list value is a grid axis, as in the file), checked as the file is."""
    unknown = sorted(set(data) - {"run", "sae"})
    if unknown:
        raise ConfigError(f"sweep file: unknown table(s) {unknown}; use [run] and [[sae]]")
    run_table = data.get("run", {})
    if not isinstance(run_table, dict):
        raise ConfigError(f"[run] must be a table of settings, not {run_table!r}")
    run = _build(RunConfig, {**run_table, **(overrides or {})}, "[run]")
    tables = data.get("sae", [{}])
    if isinstance(tables, dict):
        tables = [tables]
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"sae must be one or more [[sae]] tables, not {tables!r}")
    saes = [_build(SAEConfig, t, f"[[sae]] #{i + 1}") for i, table in enumerate(tables)
            for t in _expand(table, f"[[sae]] #{i + 1}")]
    sae_names(saes)  # refuses a config given twice
    return Sweep(run=run, saes=tuple(saes))


def sae_names(cfgs: tuple[SAEConfig, ...] | list[SAEConfig]) -> list[str]:
    """A distinct name per SAE of a sweep (its folder, its rows in metrics.jsonl): ``cfg.name()``,
    plus the settings that tell apart SAEs sharing it (a grid over, say, ``decoder_init_norm``).

    >>> sae_names([SAEConfig(k=16), SAEConfig(decoder_init_norm=0.1), SAEConfig(decoder_init_norm=0.5)])
    ['topk-vanilla-x8-k16-lr0.008-s0', 'topk-vanilla-x8-k32-lr0.008-s0-decoder_init_norm0.1', 'topk-vanilla-x8-k32-lr0.008-s0-decoder_init_norm0.5']
    """
    names = [cfg.name() for cfg in cfgs]
    for name in set(names):
        clash = [i for i, n in enumerate(names) if n == name]
        if len(clash) == 1:
            continue
        differing = [f.name for f in dataclasses.fields(SAEConfig)
                     if len({repr(getattr(cfgs[i], f.name)) for i in clash}) > 1]
        if not differing:
            raise ConfigError(f"SAEs #{clash[0] + 1} and #{clash[1] + 1} of the sweep are the same config ({name}): "
                              "give them different settings (e.g. seeds)")
        for i in clash:
            names[i] = name + "".join(f"-{key}{_short(getattr(cfgs[i], key))}" for key in differing)
    return names


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else "_".join(map(str, value)) if isinstance(value, tuple) else str(value)


# Keys that change the shape of the computation: SAEs that differ in these cannot share a step
# function. Everything else (coefficients, lr, seeds, warmups) trains side by side on a batch.
CANNOT_PARALLELIZE = ("activation", "objective", "target_hook", "skip", "cross_layer")


def split_cfgs(cfgs: list[SAEConfig]) -> list[list[SAEConfig]]:
    """Group configs that can be trained together (saev's ``split_cfgs``).

    >>> groups = split_cfgs([SAEConfig(activation="relu"), SAEConfig(activation="topk"), SAEConfig(activation="relu", lr=1e-3)])
    >>> [len(g) for g in groups]
    [2, 1]
    """
    groups: dict[tuple, list[SAEConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(tuple(getattr(cfg, k) for k in CANNOT_PARALLELIZE), []).append(cfg)
    return list(groups.values())
