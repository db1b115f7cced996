"""Save SAEs in the layout SAELens loads (``cfg.json`` + ``sae_weights.safetensors`` +
``sparsity.safetensors``), and load them back.

The input scaling used in training (``normalize_activations``) is folded into the weights, so an
exported SAE works on the model's raw activations. A multi-component SAE exports one folder per
component (SAELens has no component axis). BatchTopK exports as JumpReLU with its learned
inference threshold, as SAELens does.

A transcoder exports as SAELens' ``transcoder`` / ``skip_transcoder`` (ReLU) or
``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (JumpReLU, BatchTopK, and TopK, which
SAELens has no transcoder class for: a JumpReLU at the threshold that fires k latents a row on
average on training rows; the cfg's top-level ``k`` keeps the exact TopK for ``load_saelens`` and
the cache server, as a fixed threshold loses much of it: explained variance 0.46, not 0.62, measured
on the tiny model's MLP). Its input and
target scales are folded in, and the input's centre into ``b_enc`` (SAELens' transcoders do not
centre their input).
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.config import SAEConfig
from trainer.sae.autoencoder import SparseAutoencoder
from trainer.sae.clt import CrossLayerTranscoder

ARCHITECTURES = {"relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "topk": "topk"}


def saelens_state(sae: SparseAutoencoder, component: int, scale: float) -> dict[str, torch.Tensor]:
    """One component's weights with the input scale folded in: x' = scale * x."""
    w = sae.weights()  # the encoder that ranks and thresholds as SAELens does, rows at their refit norms
    state = {
        "W_enc": w.W_enc[component] * scale,
        "b_enc": w.b_enc[component],
        "W_dec": w.W_dec[component] / scale,
        "b_dec": sae.b_dec[component] / scale,
    }
    if sae.cfg.activation == "jumprelu":
        state["threshold"] = sae.log_threshold[component].exp()
    elif sae.cfg.activation == "batchtopk":
        state["threshold"] = sae.threshold[component].expand(sae.d_sae)
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def export_saelens(sae: SparseAutoencoder, folder: Path, *, component: int, scale: float, metadata: dict,
                   feature_frequency: torch.Tensor | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": ARCHITECTURES[sae.cfg.activation],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # folded into the weights
        "reshape_activations": "none",
        "metadata": metadata,
        "trainer": {**_trained_as(sae), "input_scale": scale},
    }
    return _write(sae, folder, cfg, saelens_state(sae, component, scale), feature_frequency)


def _trained_as(sae: SparseAutoencoder) -> dict:
    """cfg.json's ``trainer`` record: activation, objective, and only the sparsity setting it has."""
    sparsity = {"k": sae.cfg.k} if sae.cfg.activation in ("topk", "batchtopk") else {"l1_coefficient": sae.cfg.l1_coefficient}
    return {"activation": sae.cfg.activation, "objective": sae.cfg.objective, **sparsity}


def _write(sae: SparseAutoencoder, folder: Path, cfg: dict, state: dict[str, torch.Tensor],
           feature_frequency: torch.Tensor | None) -> Path:
    """cfg.json (with a TopK's top-level k), the weights, and the log10 feature frequencies."""
    if sae.cfg.activation == "topk":
        cfg["k"] = sae.cfg.k
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    _save_readable(state, folder / "sae_weights.safetensors")
    if feature_frequency is not None:
        _save_readable({"sparsity": torch.log10(feature_frequency.float().cpu() + 1e-10)}, folder / "sparsity.safetensors")
    return folder


def transcoder_state(sae: SparseAutoencoder, scales: tuple[float, float], c: int = 0) -> dict[str, torch.Tensor]:
    """A transcoder's weights on raw activations (component ``c``): ``y = (acts(s_in x) @ W_dec + b_dec
    + s_in x @ W_skip) / s_out``."""
    s_in, s_out = scales
    w = sae.weights()
    state = {
        "W_enc": w.W_enc[c] * s_in,
        "b_enc": w.b_enc[c],
        "W_dec": w.W_dec[c] / s_out,
        "b_dec": sae.b_dec[c] / s_out,
    }
    if sae.cfg.skip:
        state["W_skip"] = sae.W_skip[c].T * (s_in / s_out)  # SAELens': [d_out, d_in]
    if sae.cfg.activation == "jumprelu":
        state["threshold"] = sae.log_threshold[c].exp()
    elif sae.cfg.activation in ("batchtopk", "topk"):
        state["threshold"] = sae.threshold[c].expand(sae.d_sae)
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def export_transcoder(sae: SparseAutoencoder, folder: Path, *, scales: tuple[float, float], metadata: dict,
                      feature_frequency: torch.Tensor | None = None, component: int = 0) -> Path:
    """``scales``: the input's and the target's (``normalize_activations``); ``metadata`` names the
    input ``hook_name`` and the target ``hook_name_out``."""
    folder.mkdir(parents=True, exist_ok=True)
    family = "transcoder" if sae.cfg.activation == "relu" else "jumprelu_transcoder"
    cfg = {
        "architecture": family.replace("transcoder", "skip_transcoder") if sae.cfg.skip else family,
        "d_in": sae.d_in, "d_sae": sae.d_sae, "d_out": sae.d_out, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": metadata,
        "trainer": {**_trained_as(sae), "input_scale": scales[0], "target_scale": scales[1],
                    "target_hook": metadata.get("hook_name_out"), "skip": sae.cfg.skip},
    }
    return _write(sae, folder, cfg, transcoder_state(sae, scales, component), feature_frequency)


def export_clt(clt: CrossLayerTranscoder, folder: Path, *, in_scales: list[float], out_scales: list[float],
               hooks: list[str], targets: list[str], metadata: dict) -> Path:
    """circuit-tracer's CLT layout: per layer ``l``, ``W_enc_l.safetensors`` (``W_enc_l [d_sae, d_in]``,
    ``b_enc_l``, ``b_dec_l``, ``threshold_l``: a JumpReLU at the calibrated threshold) and
    ``W_dec_l.safetensors`` (``W_dec_l [d_sae, layers - l, d_out]``), on raw activations (each
    input's scale folded into its encoder, each target's scale into the decoders);
    ``cfg.json`` names the hooks and keeps ``k``, the exact TopK for ``load_clt``."""
    folder.mkdir(parents=True, exist_ok=True)
    W_enc, b_enc, W_dec = clt.weights()
    out = torch.tensor(out_scales, device=clt.b_dec.device)
    for l in range(clt.n_layers):
        encoder = {f"W_enc_{l}": (W_enc[l] * in_scales[l]).T, f"b_enc_{l}": b_enc[l],
                   f"b_dec_{l}": clt.b_dec[l] / out_scales[l], f"threshold_{l}": clt.threshold[l].expand(clt.d_sae)}
        _save_readable({k: v.detach().float().contiguous().cpu() for k, v in encoder.items()}, folder / f"W_enc_{l}.safetensors")
        decoder = W_dec[l] / out[l:, None]
        _save_readable({f"W_dec_{l}": decoder.detach().float().contiguous().cpu()}, folder / f"W_dec_{l}.safetensors")
    cfg = {"architecture": "clt", "n_layers": clt.n_layers, "d_in": clt.d_in, "d_sae": clt.d_sae, "d_out": clt.d_out,
           "k": clt.cfg.k, "activation_function": "jump_relu", "feature_input_hooks": hooks, "feature_output_hooks": targets,
           "metadata": metadata, "trainer": {"input_scales": in_scales, "target_scales": out_scales}}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_clt(folder: Path | str) -> CrossLayerTranscoder:
    """A CLT export, on raw activations ``[batch, layer, d_in]``: the exact TopK it trained as (its
    decoder rows share one norm, the targets' common scale, so the ranking is the training's)."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    clt = CrossLayerTranscoder(SAEConfig(activation="topk", k=cfg["k"], d_sae=cfg["d_sae"]), cfg["d_in"], cfg["n_layers"],
                               cfg["d_out"])
    with torch.no_grad():
        for l in range(clt.n_layers):
            enc, dec = load_file(folder / f"W_enc_{l}.safetensors"), load_file(folder / f"W_dec_{l}.safetensors")
            clt.W_enc[l] = enc[f"W_enc_{l}"].T
            clt.b_enc[l], clt.b_dec[l] = enc[f"b_enc_{l}"], enc[f"b_dec_{l}"]
            clt.W_dec[l].copy_(dec[f"W_dec_{l}"])
            clt.threshold[l] = enc[f"threshold_{l}"][0]
    return clt


def _save_readable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors writes its files 0600; the rest of a run folder is as the umask says."""
    save_file(tensors, path)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def load_saelens(folder: Path | str) -> tuple[SparseAutoencoder, dict]:
    """An exported SAE, on raw activations (``n_components`` None). It computes what SAELens computes
    from the file: latents from its encoder (a TopK ranked by them, a JumpReLU thresholded on
    them), decoded through its rows at their norms (``decoder_gain``)."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    state = load_file(folder / "sae_weights.safetensors")
    if "transcoder" in cfg["architecture"]:
        return _load_transcoder(cfg, state), cfg
    activation = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[cfg["architecture"]]
    sae_cfg = SAEConfig(activation=activation, d_sae=cfg["d_sae"], k=cfg.get("k", 32))
    sae = SparseAutoencoder(sae_cfg, cfg["d_in"])
    _copy_weights(sae, state)
    return sae, cfg


def _copy_weights(sae: SparseAutoencoder, state: dict[str, torch.Tensor]) -> None:
    """The file's weights, its decoder rows stored at unit norm with their norms as the gain (so the
    SAE's encoder is the file's); a JumpReLU's threshold as it is."""
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(sae, name).copy_(state[name].unsqueeze(0))
        norm = state["W_dec"].norm(dim=-1)
        sae.W_dec.copy_((state["W_dec"] / norm.clamp_min(1e-12)[:, None]).unsqueeze(0))
        sae.decoder_gain.copy_(norm.unsqueeze(0))
        if sae.cfg.activation == "jumprelu":
            sae.log_threshold.copy_(state["threshold"].clamp_min(1e-12).log().unsqueeze(0))


def _load_transcoder(cfg: dict, state: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """A transcoder's export, on raw activations: this project's exact TopK where it trained one, else
    what the architecture says (a JumpReLU at the file's threshold)."""
    activation = "relu" if cfg["architecture"] in ("transcoder", "skip_transcoder") else "jumprelu"
    if "k" in cfg:
        activation = "topk"
    sae_cfg = SAEConfig(activation=activation, d_sae=cfg["d_sae"], k=cfg.get("k", 32), skip="W_skip" in state,
                        target_hook=cfg["metadata"].get("hook_name_out") or "target")
    sae = SparseAutoencoder(sae_cfg, cfg["d_in"], d_out=cfg["d_out"])
    _copy_weights(sae, state)
    if sae_cfg.skip:
        with torch.no_grad():
            sae.W_skip.copy_(state["W_skip"].T.unsqueeze(0))
    return sae
