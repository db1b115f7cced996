"""Frozen configs: one ``SAEConfig`` per SAE of a sweep, one ``RunConfig`` for the stream and loop.

A sweep file (TOML) holds a ``[run]`` table and ``[[sae]]`` tables; any SAE key given as a list
expands into one SAE per value (a grid). ``split_cfgs`` groups the SAEs that can share a batch.
"""

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Activation = Literal["relu", "jumprelu", "topk", "batchtopk"]
Objective = Literal["vanilla", "matryoshka"]


@dataclass(frozen=True)
class SAEConfig:
    activation: Activation = "relu"
    objective: Objective = "vanilla"
    expansion: int = 8
    """d_sae = expansion * d_in (ignored when d_sae is set)."""
    d_sae: int | None = None
    k: int = 32
    """Active latents per token for topk / batchtopk."""
    l1_coefficient: float = 1e-3
    """Sparsity coefficient: L1 (relu) or L0 (jumprelu); unused by topk / batchtopk."""
    lr: float = 4e-4
    lr_warmup_steps: int = 100
    sparsity_warmup_steps: int = 500
    jumprelu_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    matryoshka_prefixes: tuple[int, ...] = ()
    """Dictionary prefix sizes for matryoshka; default d_sae/8, d_sae/4, d_sae/2, d_sae."""
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (AuxK, resampling)."""
    resample_every: int = 0
    """Resample dead latents every N steps (0: never), sparse_autoencoder style."""
    seed: int = 0

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in

    def prefixes(self, d_in: int) -> tuple[int, ...]:
        d_sae = self.width(d_in)
        return self.matryoshka_prefixes or (d_sae // 8, d_sae // 4, d_sae // 2, d_sae)

    def name(self) -> str:
        parts = [self.activation, self.objective, f"x{self.d_sae or self.expansion}"]
        if self.activation in ("topk", "batchtopk"):
            parts.append(f"k{self.k}")
        else:
            parts.append(f"l1_{self.l1_coefficient:g}")
        parts += [f"lr{self.lr:g}", f"s{self.seed}"]
        return "-".join(parts)


@dataclass(frozen=True)
class RunConfig:
    batch_size: int = 4096
    tokens: int = 10_000_000
    """Training tokens per SAE (saev's BatchLimiter)."""
    device: str = "auto"
    seed: int = 0
    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    """Scale inputs so their mean norm is sqrt(d_in), using the manifest's statistics."""
    shuffle_buffer_rows: int = 262_144
    prefetch_chunks: int = 8
    fetch_threads: int = 4
    lanes: int = 0
    """Streams an epoch is split into (0: the world size at the start of the run); see
    trainer.distributed. A run keeps its lanes when resumed with another world size."""
    eval_chunks: int = 2
    """Chunks held out (never trained on) for evaluation."""
    log_every: int = 50
    checkpoint_every: int = 500


@dataclass(frozen=True)
class Sweep:
    run: RunConfig
    saes: tuple[SAEConfig, ...] = field(default_factory=lambda: (SAEConfig(),))


class ConfigError(ValueError):
    pass


def _build(cls, table: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check(cfg, where)
    return cfg


def _check(cfg, where: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = getattr(f.type, "__args__", None) if getattr(f.type, "__origin__", None) is Literal else None
        if allowed and value not in allowed:
            raise ConfigError(f"{where}: {f.name}={value!r} is not one of {list(allowed)}")
        if f.type in (int, float, "int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {f.name}={value!r} is not a number")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{where}: {f.name}={value!r} must not be negative")
    for name in ("expansion", "k", "lr", "batch_size", "tokens"):
        if hasattr(cfg, name) and getattr(cfg, name) == 0:
            raise ConfigError(f"{where}: {name} must be positive")


def _expand(table: dict) -> list[dict]:
    """A list value (other than matryoshka_prefixes) is a grid axis."""
    axes = {k: v for k, v in table.items() if isinstance(v, list) and k != "matryoshka_prefixes"}
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
    unknown = sorted(set(data) - {"run", "sae"})
    if unknown:
        raise ConfigError(f"sweep file: unknown table(s) {unknown}; use [run] and [[sae]]")
    run = _build(RunConfig, {**data.get("run", {}), **(overrides or {})}, "[run]")
    tables = data.get("sae", [{}])
    if isinstance(tables, dict):
        tables = [tables]
    saes = [_build(SAEConfig, t, f"[[sae]] #{i + 1}") for i, table in enumerate(tables) for t in _expand(table)]
    return Sweep(run=run, saes=tuple(saes))


# Keys that change the shape of the computation: SAEs that differ in these cannot share a step
# function. Everything else (coefficients, lr, seeds, warmups) trains side by side on a batch.
CANNOT_PARALLELIZE = ("activation", "objective")


def split_cfgs(cfgs: list[SAEConfig]) -> list[list[SAEConfig]]:
    """Group configs that can be trained together (saev's ``split_cfgs``).

    >>> groups = split_cfgs([SAEConfig(l1_coefficient=1e-3), SAEConfig(activation="topk"), SAEConfig(lr=1e-3)])
    >>> [len(g) for g in groups]
    [2, 1]
    """
    groups: dict[tuple, list[SAEConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(tuple(getattr(cfg, k) for k in CANNOT_PARALLELIZE), []).append(cfg)
    return list(groups.values())
