"""Save SAEs in the layout SAELens loads (``cfg.json`` + ``sae_weights.safetensors`` +
``sparsity.safetensors``), and load them back.

The input scaling used in training (``normalize_activations``) is folded into the weights, so an
exported SAE works on the model's raw activations. A multi-component SAE exports one folder per
component (SAELens has no component axis). BatchTopK exports as JumpReLU with its learned
inference threshold, as SAELens does.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.config import SAEConfig
from trainer.sae.autoencoder import SparseAutoencoder

ARCHITECTURES = {"relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "topk": "topk"}


def saelens_state(sae: SparseAutoencoder, component: int, scale: float) -> dict[str, torch.Tensor]:
    """One component's weights with the input scale folded in: x' = scale * x."""
    w = sae.weights()  # unit-norm decoder rows: what SAELens' tools expect
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
        "trainer": {"activation": sae.cfg.activation, "objective": sae.cfg.objective, "input_scale": scale,
                    # only the sparsity setting this architecture has
                    **({"k": sae.cfg.k} if sae.cfg.activation in ("topk", "batchtopk")
                       else {"l1_coefficient": sae.cfg.l1_coefficient})},
    }
    if sae.cfg.activation == "topk":
        cfg["k"] = sae.cfg.k
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    _save_readable(saelens_state(sae, component, scale), folder / "sae_weights.safetensors")
    if feature_frequency is not None:
        _save_readable({"sparsity": torch.log10(feature_frequency.float().cpu() + 1e-10)}, folder / "sparsity.safetensors")
    return folder


def _save_readable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors writes its files 0600; the rest of a run folder is as the umask says."""
    save_file(tensors, path)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def load_saelens(folder: Path | str) -> tuple[SparseAutoencoder, dict]:
    """An exported SAE, on raw activations (``n_components`` None). It computes what the file's
    weights compute (decoder rows of any norm); a TopK's latents are ranked by what they add to
    the reconstruction, which is the file's ranking when its rows share one norm (SAELens folds
    them to 1; this project's exports have 1 / input scale)."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    state = load_file(folder / "sae_weights.safetensors")
    activation = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[cfg["architecture"]]
    sae_cfg = SAEConfig(activation=activation, d_sae=cfg["d_sae"], k=cfg.get("k", 32))
    sae = SparseAutoencoder(sae_cfg, cfg["d_in"])
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(state[name].unsqueeze(0))
        if activation == "jumprelu":
            # The SAE thresholds what a latent adds through a unit-norm row: the file's threshold
            # times its decoder row's norm (1 / input scale for this project's exports).
            threshold = state["threshold"] * state["W_dec"].norm(dim=-1)
            sae.log_threshold.copy_(threshold.clamp_min(1e-12).log().unsqueeze(0))
    return sae, cfg
