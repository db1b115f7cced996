"""SAEs come home: registered by content hash, bound to a dataset and hook, kept on disk.

An upload is one safetensors file (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``, and ``threshold [d_sae]`` for JumpReLU) whose metadata entry ``cfg`` holds the SAELens
``cfg.json`` text: the trainer's export, in one body. The server runs it the way SAELens does
(``SaeWeights.reconstruct``) and never imports the trainer.

A transcoder (SAELens' ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` and
``jumprelu_skip_transcoder``) is registered at its input hook; its cfg's ``metadata.hook_name_out``
names the target hook, which the dataset must hold too, ``d_out`` wide (``W_dec [d_sae, d_out]``,
``b_dec [d_out]``, and ``W_skip [d_out, d_in]`` for a skip transcoder). Its "reconstruction" is its
prediction of the target. A transcoder cfg with a top-level ``k`` is a TopK (this project's
exports of TopK transcoders, which SAELens, having no TopK transcoder, runs as a JumpReLU at the
file's threshold): the server runs the exact TopK it was trained as.

A cross-layer transcoder (``clt``) is one body holding circuit-tracer's per-layer tensors
(``W_enc_l [d_sae, d_in]``, ``b_enc_l``, ``b_dec_l``, ``threshold_l``, ``W_dec_l [d_sae, L - l,
d_out]``), its cfg naming ``feature_input_hooks`` and ``feature_output_hooks`` (and ``k``: TopK per
layer, else JumpReLU at the thresholds). It computes as one SAE over the layers side by side
(``CltWeights``): inputs ``[n, L * d_in]``, latents ``[n, L * d_sae]`` (layer by layer), and a
block upper-triangular decoder to the outputs ``[n, L * d_out]``.
"""

import asyncio
import functools
import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from cache_server.errors import ServiceError
from cache_server.files import atomic_write
from cache_server.quarantine import Quarantine, reason_of
from shared.ids import content_id, is_valid_id
from shared.schemas import DatasetManifest, SaeInfo

TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
ARCHITECTURES = ("standard", "topk", "jumprelu") + TRANSCODERS + ("clt",)
WEIGHTS_CACHE_BYTES = 2 << 30
"""SAE weights kept in memory for the pages and jobs (the most recently used; the latest always)."""


class SaeError(ServiceError):
    """An SAE upload or reference the service refuses."""


@dataclass(frozen=True)
class SaeWeights:
    """An SAE as SAELens computes it: encode (ReLU, TopK or JumpReLU), then decode."""

    architecture: str
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None
    k: int | None
    apply_b_dec_to_input: bool
    W_skip: torch.Tensor | None = None
    """A skip transcoder's linear path, SAELens' ``[d_out, d_in]``."""

    @property
    def transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def n_bytes(self) -> int:
        tensors = [self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.W_skip]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @functools.cached_property
    def directions(self) -> torch.Tensor:
        """Unit decoder rows ``[d_sae, d_in]`` (a feature page's nearest neighbours), computed once."""
        return torch.nn.functional.normalize(self.W_dec, dim=1)

    @property
    def decoder(self) -> torch.Tensor:
        return self.W_dec

    @property
    def summed(self) -> torch.Tensor:
        """Each latent's write (the logit lens reads it)."""
        return self.W_dec

    def to(self, device: torch.device) -> "SaeWeights":
        moved = {name: getattr(self, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")}
        moved = {name: None if t is None else t.to(device) for name, t in moved.items()}
        return SaeWeights(self.architecture, k=self.k, apply_b_dec_to_input=self.apply_b_dec_to_input, **moved)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc
        if self.k is not None:  # topk, or a TopK transcoder
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if self.threshold is not None:  # jumprelu, jumprelu_(skip_)transcoder
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, latent activations) of rows ``x [..., d_in]``: a transcoder's prediction of its target."""
        acts = self.encode(x)
        out = acts @ self.W_dec + self.b_dec
        return (out if self.W_skip is None else out + x @ self.W_skip.T), acts


@dataclass(frozen=True)
class CltWeights:
    """A CLT (see the module): per layer ``l`` an encoder ``W_enc[l] [d_in, d_sae]`` reading input
    hook ``l``, and ``W_dec[l] [d_sae, L - l, d_out]`` writing to output hooks ``l`` onwards."""

    W_enc: torch.Tensor
    """``[L, d_in, d_sae]``."""
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    """``[L, d_out]``."""
    W_dec: tuple[torch.Tensor, ...]
    threshold: torch.Tensor | None
    k: int | None
    architecture: str = "clt"
    W_skip: None = None
    transcoder: bool = True

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_bytes(self) -> int:
        tensors = [self.W_enc, self.b_enc, self.b_dec, *self.W_dec] + ([self.threshold] if self.threshold is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> "CltWeights":
        threshold = None if self.threshold is None else self.threshold.to(device)
        return CltWeights(self.W_enc.to(device), self.b_enc.to(device), self.b_dec.to(device),
                          tuple(w.to(device) for w in self.W_dec), threshold, self.k)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        pre = x @ self.W_enc[layer] + self.b_enc[layer]
        if self.k is not None:
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        return pre.relu() * (pre > self.threshold[layer])

    def predict_layer(self, acts: list[torch.Tensor], layer: int) -> torch.Tensor:
        """Output ``layer``'s prediction from the latents of it and every earlier layer."""
        return self.b_dec[layer] + sum(acts[l] @ self.W_dec[l][:, layer - l] for l in range(layer + 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, L * d_in]`` (the input hooks side by side) -> ``[n, L * d_sae]``."""
        return torch.cat([self.encode_layer(part, l) for l, part in enumerate(x.chunk(self.n_layers, dim=-1))], -1)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = [self.encode_layer(part, l) for l, part in enumerate(x.chunk(self.n_layers, dim=-1))]
        return torch.cat([self.predict_layer(acts, j) for j in range(self.n_layers)], -1), torch.cat(acts, -1)

    @functools.cached_property
    def decoder(self) -> torch.Tensor:
        """The block upper-triangular decoder ``[L * d_sae, L * d_out]`` (the feature statistics' FVU)."""
        L, d_sae, d_out = self.n_layers, self.W_enc.shape[2], self.b_dec.shape[1]
        full = torch.zeros(L * d_sae, L * d_out)
        for l, w in enumerate(self.W_dec):
            full[l * d_sae : (l + 1) * d_sae, l * d_out :] = w.flatten(1)
        return full

    @functools.cached_property
    def directions(self) -> torch.Tensor:
        """Each latent's total write ``[L * d_sae, d_out]`` (its blocks summed: where it moves the
        residual stream), unit norm: a feature page's neighbours."""
        return torch.nn.functional.normalize(self.summed, dim=1)

    @functools.cached_property
    def summed(self) -> torch.Tensor:
        return torch.cat([w.sum(1) for w in self.W_dec])


_FLOATS = {"F64", "F32", "F16", "BF16"}


def read_sae(path: Path) -> tuple[dict, "SaeWeights | CltWeights"]:
    """The cfg and float32 weights of a stored or uploaded SAE file, checked (its header before
    any tensor is read, then each tensor once); SaeError (422) names what is wrong. Tensors are
    read straight into their own memory: the peak is the weights in float32, not the body too."""
    try:
        with safe_open(path, "pt") as f:  # checks the header: offsets, sizes and dtypes agree with the file
            metadata, keys = f.metadata() or {}, list(f.keys())
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in keys}
            dtypes = {name: f.get_slice(name).get_dtype() for name in keys}
    except Exception as exc:  # SafetensorError for a bad header; anything else for a bad body
        raise SaeError(f"the body is not a safetensors file: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    cfg = _check_cfg(metadata)
    names = _check_clt_shapes(cfg, shapes, dtypes) if cfg["architecture"] == "clt" else _check_shapes(cfg, shapes, dtypes)
    t = {}
    for name, value in _read_tensors(path, names, shapes, dtypes):
        t[name] = value.float()
        # A NaN or inf weight would make every figure and page NaN. Checked a block at a time:
        # isfinite makes temporaries the size of its input.
        bad = sum(int((~torch.isfinite(block)).sum()) for block in t[name].reshape(-1).split(1 << 20))
        if bad:
            raise SaeError(f"tensor {name} holds {bad:,} NaN or infinite value(s): only finite weights are accepted")
    architecture, k = cfg["architecture"], cfg.get("k")
    if architecture == "clt":
        L = len(cfg["feature_input_hooks"])
        return cfg, CltWeights(torch.stack([t[f"W_enc_{l}"].T for l in range(L)]), torch.stack([t[f"b_enc_{l}"] for l in range(L)]),
                               torch.stack([t[f"b_dec_{l}"] for l in range(L)]), tuple(t[f"W_dec_{l}"] for l in range(L)),
                               None if k is not None else torch.stack([t[f"threshold_{l}"] for l in range(L)]), k)
    return cfg, SaeWeights(architecture, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"),
                           k if architecture == "topk" or architecture in TRANSCODERS and k is not None else None,
                           architecture not in TRANSCODERS and bool(cfg.get("apply_b_dec_to_input", True)), t.get("W_skip"))


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_tensors(path: Path, names: list[str], shapes: dict, dtypes: dict):
    """``(name, tensor)`` of a file safetensors already checked, each read with plain reads into a
    tensor of its own (an mmap's pages would count in the server's memory beside the copy)."""
    with path.open("rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        for name in names:
            start, end = header[name]["data_offsets"]
            raw = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + header_size + start)
            f.readinto(memoryview(raw.numpy()))
            yield name, raw.view(_TORCH_DTYPES[dtypes[name]]).reshape(shapes[name])


def _check_cfg(metadata: dict) -> dict:
    if "cfg" not in metadata:
        raise SaeError("the safetensors metadata has no 'cfg' entry (the SAELens cfg.json text)")
    try:
        cfg = json.loads(metadata["cfg"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SaeError(f"metadata 'cfg' is not valid JSON: {getattr(exc, 'msg', 'nested too deeply')}") from None
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if architecture not in ARCHITECTURES:
        raise SaeError(f"cfg architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    out = (cfg.get("metadata") or {}).get("hook_name_out") if isinstance(cfg.get("metadata"), dict) else None
    if architecture in TRANSCODERS and not (isinstance(out, str) and out):
        raise SaeError(f"a {architecture} needs its target hook: cfg metadata.hook_name_out")
    if architecture == "clt":
        hooks = [cfg.get("feature_input_hooks"), cfg.get("feature_output_hooks")]
        if not all(isinstance(h, list) and h and all(isinstance(n, str) and n for n in h) for h in hooks) or len(hooks[0]) != len(hooks[1]):
            raise SaeError("a clt's cfg names its hooks, layer by layer: feature_input_hooks and feature_output_hooks, "
                           "two lists of hook names of the same length")
    if cfg.get("normalize_activations", "none") != "none":
        raise SaeError(f"cfg normalize_activations={cfg['normalize_activations']!r}: fold the scaling into "
                       "the weights first (the trainer's exports do)")
    return cfg


def _check_clt_shapes(cfg: dict, shapes: dict[str, tuple], dtypes: dict[str, str]) -> list[str]:
    """A CLT's per-layer tensors, checked as ``_check_shapes`` checks an SAE's."""
    L, k = len(cfg["feature_input_hooks"]), cfg.get("k")
    names = [f"{n}_{l}" for l in range(L) for n in ("W_enc", "b_enc", "b_dec", "W_dec")]
    names += [] if k is not None else [f"threshold_{l}" for l in range(L)]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise SaeError(f"the file lacks tensor(s) {missing[:8]}")
    bad = [n for n in names if dtypes[n] not in _FLOATS]
    if bad:
        raise SaeError(f"tensor {bad[0]} is {dtypes[bad[0]]}; weights must be floating point (F32, F16, BF16, F64)")
    if len(shapes["W_enc_0"]) != 2 or 0 in shapes["W_enc_0"] or len(shapes["W_dec_0"]) != 3:
        raise SaeError(f"W_enc_0 must be [d_sae, d_in] and W_dec_0 [d_sae, {L}, d_out]; got {list(shapes['W_enc_0'])} "
                       f"and {list(shapes['W_dec_0'])}")
    (d_sae, d_in), d_out = shapes["W_enc_0"], shapes["W_dec_0"][-1]
    for l in range(L):
        expected = {f"W_enc_{l}": (d_sae, d_in), f"b_enc_{l}": (d_sae,), f"b_dec_{l}": (d_out,),
                    f"W_dec_{l}": (d_sae, L - l, d_out), f"threshold_{l}": (d_sae,)}
        for name, shape in expected.items():
            if name in names and shapes[name] != shape:
                raise SaeError(f"{name} has shape {list(shapes[name])}; a {L}-layer CLT with W_enc_0 [{d_sae}, {d_in}] "
                               f"needs {list(shape)}")
    if k is not None and not (type(k) is int and 0 < k <= d_sae):
        raise SaeError(f"a clt's k is a whole number from 1 to d_sae={d_sae}; got {k!r}")
    return names


def _check_shapes(cfg: dict, shapes: dict[str, tuple], dtypes: dict[str, str]) -> list[str]:
    """The tensors to read, once their presence, float dtypes and shapes agree with W_enc's."""
    architecture = cfg["architecture"]
    names = (["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture.startswith("jumprelu") else [])
             + (["W_skip"] if "skip" in architecture else []))
    missing = [n for n in names if n not in shapes]
    if missing:
        raise SaeError(f"the file lacks tensor(s) {missing}")
    for name in names:
        if dtypes[name] not in _FLOATS:
            raise SaeError(f"tensor {name} is {dtypes[name]}; weights must be floating point (F32, F16, BF16, F64)")
    if len(shapes["W_enc"]) != 2:
        raise SaeError(f"W_enc must be [d_in, d_sae], got {list(shapes['W_enc'])}")
    d_in, d_sae = shapes["W_enc"]
    if d_in == 0 or d_sae == 0:
        raise SaeError(f"W_enc is [{d_in}, {d_sae}]: an SAE needs at least one input and one latent")
    d_out = shapes["W_dec"][-1] if architecture in TRANSCODERS and len(shapes["W_dec"]) == 2 else d_in
    if d_out == 0:
        raise SaeError("W_dec has no output dimension: a transcoder needs at least one")
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "threshold": (d_sae,),
                "W_skip": (d_out, d_in)}
    for name in names[1:]:
        if shapes[name] != expected[name]:
            raise SaeError(f"{name} has shape {list(shapes[name])}; W_enc [{d_in}, {d_sae}] needs {list(expected[name])}")
    k = cfg.get("k")
    if (architecture == "topk" or architecture in TRANSCODERS and k is not None) and not (type(k) is int and 0 < k <= d_sae):
        raise SaeError(f"a topk SAE (or TopK transcoder) needs cfg k, a whole number from 1 to d_sae={d_sae}; got {k!r}")
    return names


def _hooks(cfg: dict, hook: str, weights) -> dict:
    """SaeInfo's hook fields of an upload registered at ``hook``: a transcoder's target, a CLT's layers."""
    if cfg["architecture"] == "clt":
        if hook != cfg["feature_input_hooks"][0]:
            raise SaeError(f"a CLT is registered at its first input hook, '{cfg['feature_input_hooks'][0]}', not '{hook}'")
        return {"hook_out": None, "hooks_in": cfg["feature_input_hooks"], "hooks_out": cfg["feature_output_hooks"]}
    return {"hook_out": cfg["metadata"]["hook_name_out"] if weights.transcoder else None, "hooks_in": None, "hooks_out": None}


def _check_hook(manifest: DatasetManifest, role: str, hook: str, width: int) -> None:
    """An input or target hook is one of the dataset's, as wide as the SAE's side of it."""
    info = manifest.hook(hook)
    where = "SAE's" if role == "input" else "transcoder's target"
    if info is None:
        raise SaeError(f"the {where} hook '{hook}' is not one of dataset {manifest.dataset_id}'s hooks: "
                       f"{', '.join(h.name for h in manifest.hooks)}")
    if info.d != width:
        side = "d_in" if role == "input" else "d_out"
        raise SaeError(f"the SAE's {side} is {width} but hook '{hook}' of dataset {manifest.dataset_id} has width {info.d}")


class WeightsCache:
    """The most recently used SAEs' weights, up to a byte budget (the latest one always kept);
    one load per SAE at a time, however many requests want it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, SaeWeights] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, sae_id: str, load: Callable[[str], SaeWeights]) -> SaeWeights:
        with self._lock:
            if sae_id in self._kept:
                self._kept.move_to_end(sae_id)
                return self._kept[sae_id]
            loading = self._loading.setdefault(sae_id, threading.Lock())
        with loading:
            with self._lock:
                if sae_id in self._kept:
                    return self._kept[sae_id]
            try:
                weights = load(sae_id)
                self.put(sae_id, weights)
            finally:
                with self._lock:
                    self._loading.pop(sae_id, None)
            return weights

    def put(self, sae_id: str, weights: SaeWeights) -> None:
        with self._lock:
            self._kept[sae_id] = weights
            self._kept.move_to_end(sae_id)
            while len(self._kept) > 1 and sum(w.n_bytes for w in self._kept.values()) > self.max_bytes:
                self._kept.popitem(last=False)

    def drop(self, sae_id: str) -> None:
        with self._lock:
            self._kept.pop(sae_id, None)


class SaeStore:
    """``<root>/saes/<sae_id>.safetensors`` plus ``<sae_id>.json`` (its SaeInfo)."""

    def __init__(self, folder: Path, max_bytes: int, quarantine: Quarantine):
        self.folder = folder
        self.max_bytes = max_bytes
        self.quarantine = quarantine
        self._weights = WeightsCache(WEIGHTS_CACHE_BYTES)
        folder.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        """At start: an SAE whose record or weights file cannot be read is quarantined, both files."""
        for path in sorted(self.folder.glob("*.json")):
            try:
                info = SaeInfo.model_validate_json(path.read_bytes())
                if info.sae_id != path.stem:
                    raise ValueError(f"it names SAE {info.sae_id!r}, not {path.stem!r}")
                clt = info.architecture == "clt"
                with safe_open(self.folder / f"{info.sae_id}.safetensors", "pt") as f:
                    shape = f.get_slice("W_enc_0" if clt else "W_enc").get_shape()
                if list(shape) != ([info.d_sae // len(info.input_hooks()), info.d_in] if clt else [info.d_in, info.d_sae]):
                    raise ValueError(f"its encoder is {shape}, its record says d_in {info.d_in}, d_sae {info.d_sae}")
            except Exception as exc:
                self._quarantine(path.stem, reason_of(exc))

    def _quarantine(self, sae_id: str, reason: str) -> None:
        self._weights.drop(sae_id)
        for suffix in (".json", ".safetensors"):
            self.quarantine.put(self.folder / f"{sae_id}{suffix}", "sae", reason)

    async def upload(self, chunks: AsyncIterator[bytes], manifest: DatasetManifest, hook: str,
                     name: str | None = None) -> SaeInfo:
        """Stream the body to a temp file while hashing it, check it there (tensor by tensor), and
        keep it under its id: the server holds the weights once, in float32, never the body."""
        info = manifest.hook(hook)
        if info is None:
            raise SaeError(f"dataset {manifest.dataset_id} has no hook '{hook}'; its hooks: "
                           f"{', '.join(h.name for h in manifest.hooks)}")
        digest, n_bytes = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    n_bytes += len(chunk)
                    if n_bytes > self.max_bytes:
                        raise SaeError(f"the SAE file is larger than this server's limit of {self.max_bytes} bytes", 413)
                    digest.update(chunk)
                    f.write(chunk)
            cfg, weights = await asyncio.to_thread(read_sae, Path(tmp))
            d_in, d_sae = weights.W_enc.shape[-2:]
            d_sae *= len(weights.W_enc) if isinstance(weights, CltWeights) else 1  # a CLT's features: every layer's
            hooks = _hooks(cfg, hook, weights)
            for role, names, width in (("input", hooks["hooks_in"] or [hook], d_in),
                                       ("target", hooks["hooks_out"] or ([hooks["hook_out"]] if hooks["hook_out"] else []),
                                        weights.b_dec.shape[-1])):
                for name_ in names:
                    _check_hook(manifest, role, name_, width)
            sae_id = content_id({"file": digest.hexdigest(), "dataset_id": manifest.dataset_id, "hook": hook})
            sae = SaeInfo(sae_id=sae_id, dataset_id=manifest.dataset_id, hook=hook, architecture=cfg["architecture"],
                          d_in=d_in, d_sae=d_sae, k=weights.k, n_bytes=n_bytes, name=name, **hooks)
            if (self.folder / f"{sae_id}.json").exists():
                sae = self.info(sae_id)  # registered before: its record (and first name) stands
            else:
                os.replace(tmp, self.folder / f"{sae_id}.safetensors")
                atomic_write(self.folder / f"{sae_id}.json", sae.model_dump_json(indent=1).encode())
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._weights.put(sae_id, weights)
        return sae

    def info(self, sae_id: str) -> SaeInfo:
        path = self.folder / f"{sae_id}.json"
        if not is_valid_id(sae_id) or not path.exists():
            raise SaeError(f"unknown SAE '{sae_id}': register it with POST /v1/saes", 404)
        info = self.quarantine.load(path, "sae", SaeInfo.model_validate_json)
        if info is None:
            raise SaeError(f"SAE '{sae_id}' could not be read; it was moved to quarantine/ (see /health)", 404)
        return info

    def list(self) -> list[SaeInfo]:
        infos = (self.quarantine.load(p, "sae", SaeInfo.model_validate_json) for p in sorted(self.folder.glob("*.json")))
        return [info for info in infos if info is not None]

    def weights(self, sae_id: str) -> SaeWeights:
        """The SAE's weights, read from disk once and kept (the most recently used, up to
        ``WEIGHTS_CACHE_BYTES``): a browser page must not read a large file again per request."""
        self.info(sae_id)
        return self._weights.get(sae_id, self._read)

    def _read(self, sae_id: str) -> SaeWeights:
        try:
            return read_sae(self.folder / f"{sae_id}.safetensors")[1]
        except (SaeError, OSError) as exc:  # changed or removed on disk since it was registered
            self._quarantine(sae_id, reason_of(exc))
            raise SaeError(f"SAE '{sae_id}''s weights could not be read ({reason_of(exc)}); it was moved to "
                           "quarantine/ (see /health)", 409) from None

    def delete(self, sae_id: str) -> None:
        self.info(sae_id)
        self._weights.drop(sae_id)
        (self.folder / f"{sae_id}.json").unlink(missing_ok=True)
        (self.folder / f"{sae_id}.safetensors").unlink(missing_ok=True)
