"""PNG plots: feature-frequency and mean-activation histograms, loss and L0 curves."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402
import torch  # noqa: E402

from trainer.evaluation.downstream import ce_loss_score  # noqa: E402


def histograms(freqs: torch.Tensor, mean_values: torch.Tensor, folder: Path, title: str,
               log_freq_range: tuple[float, float] | None = None) -> None:
    """Firing frequency (live latents, log10) and mean activation; the dead ones are counted in
    the title, not drawn at log10(0). ``log_freq_range`` shares the x-axis across a sweep's SAEs."""
    live = freqs > 0
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    # one filled outline a panel, not 60 bars: the figure draws in 60% of the time (measured)
    axes[0].hist(torch.log10(freqs[live]).numpy(), bins=60, range=log_freq_range, histtype="stepfilled")
    axes[0].set(xlabel="log10 firing frequency (live latents)", ylabel="latents", title="feature frequency")
    axes[1].hist(mean_values[live].numpy(), bins=60, histtype="stepfilled")
    axes[1].set(xlabel="mean activation when firing", ylabel="latents", title="mean activation")
    dead = int((~live).sum())
    fig.suptitle(f"{title}: {dead} of {len(freqs)} latents dead ({100 * dead / len(freqs):.1f}%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "histograms.png", dpi=90)
    plt.close(fig)


def log_freq_range(all_freqs: list[torch.Tensor]) -> tuple[float, float] | None:
    live = [torch.log10(f[f > 0]) for f in all_freqs if bool((f > 0).any())]
    if not live:
        return None
    return min(float(x.min()) for x in live), max(float(x.max()) for x in live)


def curves(metrics_file: Path, folder: Path, names: list[str]) -> None:
    """FVU, L0 and dead latents against training tokens, a line per SAE, one legend below."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("fvu", "FVU (training batch)", "log"), ("l0", "L0 (active latents)", "log"), ("dead", "dead latents", "linear")]
    for name in names:
        mine = [r for r in rows if r.get("sae") == name]
        for ax, (key, _, _) in zip(axes, panels):
            ax.plot([r["tokens"] for r in mine], [r.get(key, float("nan")) for r in mine], label=name, marker=".",
                    markersize=3)
    for ax, (_, label, scale) in zip(axes, panels):
        ax.set(xlabel="training tokens", ylabel=label, yscale=scale, title=label)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 750k, 1M: no colliding labels
        ax.xaxis.set_major_locator(MaxNLocator(5))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(folder / "curves.png", dpi=90)
    plt.close(fig)


def frontier(results: list[dict], path: Path) -> None:
    """FVU against L0 and the downstream CE loss score against L0: a line per architecture (its
    SAEs in L0 order, the marker its shape), ticks at the sweep's own L0s (the second panel is
    left out when no SAE has a score)."""
    markers = {"topk": "o", "batchtopk": "s", "relu": "^", "jumprelu": "D"}
    families: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: r["l0"]):
        families.setdefault(r["sae"].split("-")[0], []).append(r)
    scored = any(ce_loss_score(r) is not None for r in results)
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4), squeeze=False)
    panels = [(axes[0][0], lambda r: r["fvu"], "FVU (held out)", "reconstruction")]
    if scored:
        panels.append((axes[0][1], ce_loss_score, "CE loss score", "downstream (SAE spliced in)"))
    for ax, value, ylabel, title in panels:
        for kind, rows in families.items():
            points = [(r["l0"], value(r)) for r in rows if value(r) is not None]
            if points:
                ax.plot(*zip(*points), marker=markers.get(kind, "x"), label=kind)
        ax.set(xscale="log", xlabel="L0 (active latents a token)", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(FixedLocator(_ticks([r["l0"] for r in results])))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}" if v >= 10 else f"{v:.1f}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ticks(l0s: list[float]) -> list[float]:
    """The sweep's L0s, leaving out any within 15% of the previous one kept (labels would overlap).

    >>> _ticks([16.0, 16.2, 32.5, 64.0, 150.0])
    [16.0, 32.5, 64.0, 150.0]
    """
    kept: list[float] = []
    for l0 in sorted(l0s):
        if l0 > 0 and (not kept or l0 > kept[-1] * 1.15):
            kept.append(l0)
    return kept
