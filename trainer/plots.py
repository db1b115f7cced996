"""PNG plots: feature-frequency and mean-activation histograms, loss and L0 curves."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def histograms(freqs: torch.Tensor, mean_values: torch.Tensor, folder: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(torch.log10(freqs + 1e-10).numpy(), bins=60)
    axes[0].set(xlabel="log10 firing frequency", ylabel="latents", title="feature frequency")
    axes[1].hist(mean_values[freqs > 0].numpy(), bins=60)
    axes[1].set(xlabel="mean activation when firing", ylabel="latents", title="mean activation")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "histograms.png", dpi=90)
    plt.close(fig)


def curves(metrics_file: Path, folder: Path, names: list[str]) -> None:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in names:
        mine = [r for r in rows if r.get("sae") == name]
        axes[0].plot([r["tokens"] for r in mine], [r["mse"] for r in mine], label=name)
        axes[1].plot([r["tokens"] for r in mine], [r["l0"] for r in mine], label=name)
    axes[0].set(xlabel="tokens", ylabel="MSE", yscale="log", title="reconstruction loss")
    axes[1].set(xlabel="tokens", ylabel="L0", yscale="log", title="active latents per token")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=90)
    plt.close(fig)


def frontier(results: list[dict], path: Path) -> None:
    """FVU against L0 and the downstream CE loss score against L0, one marker per SAE, the
    architecture by its shape (the second panel is left out when no SAE has a score)."""
    markers = {"topk": "o", "batchtopk": "s", "relu": "^", "jumprelu": "D"}
    scored = [r for r in results if _score(r) is not None]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(10 if scored else 5, 3.5), squeeze=False)
    for r in results:
        kind = r["sae"].split("-")[0]
        axes[0][0].scatter(r["l0"], r["fvu"], marker=markers.get(kind, "x"), label=r["sae"])
        if scored and _score(r) is not None:
            axes[0][1].scatter(r["l0"], _score(r), marker=markers.get(kind, "x"))
    axes[0][0].set(xscale="log", yscale="log", xlabel="L0", ylabel="FVU (held out)", title="reconstruction")
    axes[0][0].legend(fontsize=6)
    if scored:
        axes[0][1].set(xscale="log", xlabel="L0", ylabel="CE loss score", title="downstream (SAE spliced in)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _score(result: dict) -> float | None:
    figures = next(iter(result.get("downstream", {}).values()), {})
    return figures.get("ce_loss_score")
