"""SAEs come home: registered by content hash, bound to a dataset and hook, kept on disk.

An upload is one safetensors file (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``, and ``threshold [d_sae]`` for JumpReLU) whose metadata entry ``cfg`` holds the SAELens
``cfg.json`` text: the trainer's export, in one body. The server runs it the way SAELens does
(``SaeWeights.reconstruct``) and never imports the trainer.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

from cache_server.errors import ServiceError
from cache_server.files import atomic_write
from cache_server.quarantine import Quarantine, reason_of
from shared.ids import content_id, is_valid_id
from shared.schemas import DatasetManifest, SaeInfo

ARCHITECTURES = ("standard", "topk", "jumprelu")


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

    def to(self, device: torch.device) -> "SaeWeights":
        moved = {name: getattr(self, name).to(device) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        threshold = self.threshold.to(device) if self.threshold is not None else None
        return SaeWeights(self.architecture, threshold=threshold, k=self.k,
                          apply_b_dec_to_input=self.apply_b_dec_to_input, **moved)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, latent activations) of rows ``x [..., d_in]``."""
        acts = self.encode(x)
        return acts @ self.W_dec + self.b_dec, acts


def parse_sae(body: bytes) -> tuple[dict, SaeWeights]:
    """The cfg and weights of an upload, checked for consistency; SaeError (422) names what is wrong."""
    try:
        tensors = load(body)
        metadata = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise SaeError(f"the body is not a safetensors file: {exc}") from None
    if "cfg" not in metadata:
        raise SaeError("the safetensors metadata has no 'cfg' entry (the SAELens cfg.json text)")
    try:
        cfg = json.loads(metadata["cfg"])
    except json.JSONDecodeError as exc:
        raise SaeError(f"metadata 'cfg' is not valid JSON: {exc.msg}") from None
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if architecture not in ARCHITECTURES:
        raise SaeError(f"cfg architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    if cfg.get("normalize_activations", "none") != "none":
        raise SaeError(f"cfg normalize_activations={cfg['normalize_activations']!r}: fold the scaling into "
                       "the weights first (the trainer's exports do)")
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
    if architecture == "jumprelu" and "threshold" not in tensors:
        missing.append("threshold")
    if missing:
        raise SaeError(f"the file lacks tensor(s) {missing}")
    t = {name: value.float() for name, value in tensors.items()}
    if t["W_enc"].dim() != 2:
        raise SaeError(f"W_enc must be [d_in, d_sae], got {list(t['W_enc'].shape)}")
    d_in, d_sae = t["W_enc"].shape
    if d_in == 0 or d_sae == 0:
        raise SaeError(f"W_enc is [{d_in}, {d_sae}]: an SAE needs at least one input and one latent")
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if name in t and tuple(t[name].shape) != shape:
            raise SaeError(f"{name} has shape {list(t[name].shape)}; W_enc [{d_in}, {d_sae}] needs {list(shape)}")
    for name, value in t.items():  # a NaN or inf weight would make every figure and page NaN
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise SaeError(f"tensor {name} holds {bad:,} NaN or infinite value(s): only finite weights are accepted")
    k = cfg.get("k")
    if architecture == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
        raise SaeError(f"a topk SAE needs cfg k, a whole number from 1 to d_sae={d_sae}; got {k!r}")
    weights = SaeWeights(architecture, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"),
                         k if architecture == "topk" else None, bool(cfg.get("apply_b_dec_to_input", True)))
    return cfg, weights


class SaeStore:
    """``<root>/saes/<sae_id>.safetensors`` plus ``<sae_id>.json`` (its SaeInfo)."""

    def __init__(self, folder: Path, max_bytes: int, quarantine: Quarantine):
        self.folder = folder
        self.max_bytes = max_bytes
        self.quarantine = quarantine
        folder.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        """At start: an SAE whose record or weights file cannot be read is quarantined, both files."""
        for path in sorted(self.folder.glob("*.json")):
            try:
                info = SaeInfo.model_validate_json(path.read_bytes())
                if info.sae_id != path.stem:
                    raise ValueError(f"it names SAE {info.sae_id!r}, not {path.stem!r}")
                with safe_open(self.folder / f"{info.sae_id}.safetensors", "pt") as f:
                    shape = f.get_slice("W_enc").get_shape()
                if list(shape) != [info.d_in, info.d_sae]:
                    raise ValueError(f"its W_enc is {shape}, its record says [{info.d_in}, {info.d_sae}]")
            except Exception as exc:
                self._quarantine(path.stem, reason_of(exc))

    def _quarantine(self, sae_id: str, reason: str) -> None:
        for suffix in (".json", ".safetensors"):
            self.quarantine.put(self.folder / f"{sae_id}{suffix}", "sae", reason)

    async def upload(self, chunks: AsyncIterator[bytes], manifest: DatasetManifest, hook: str) -> SaeInfo:
        info = manifest.hook(hook)
        if info is None:
            raise SaeError(f"dataset {manifest.dataset_id} has no hook '{hook}'; its hooks: "
                           f"{', '.join(h.name for h in manifest.hooks)}")
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > self.max_bytes:
                raise SaeError(f"the SAE file is larger than this server's limit of {self.max_bytes} bytes", 413)
        cfg, weights = parse_sae(bytes(body))
        d_in, d_sae = weights.W_enc.shape
        if d_in != info.d:
            raise SaeError(f"the SAE's d_in is {d_in} but hook '{hook}' of dataset {manifest.dataset_id} "
                           f"has width {info.d}")
        sae_id = content_id({"file": hashlib.sha256(body).hexdigest(), "dataset_id": manifest.dataset_id,
                             "hook": hook})
        sae = SaeInfo(sae_id=sae_id, dataset_id=manifest.dataset_id, hook=hook, architecture=cfg["architecture"],
                      d_in=d_in, d_sae=d_sae, k=weights.k, n_bytes=len(body))
        if not (self.folder / f"{sae_id}.json").exists():
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".partial")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                os.replace(tmp, self.folder / f"{sae_id}.safetensors")
            finally:
                Path(tmp).unlink(missing_ok=True)
            atomic_write(self.folder / f"{sae_id}.json", sae.model_dump_json(indent=1).encode())
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
        self.info(sae_id)
        try:
            return parse_sae((self.folder / f"{sae_id}.safetensors").read_bytes())[1]
        except (SaeError, OSError) as exc:  # changed or removed on disk since it was registered
            self._quarantine(sae_id, reason_of(exc))
            raise SaeError(f"SAE '{sae_id}''s weights could not be read ({reason_of(exc)}); it was moved to "
                           "quarantine/ (see /health)", 409) from None

    def delete(self, sae_id: str) -> None:
        self.info(sae_id)
        (self.folder / f"{sae_id}.json").unlink(missing_ok=True)
        (self.folder / f"{sae_id}.safetensors").unlink(missing_ok=True)
