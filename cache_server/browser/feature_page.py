"""One feature's page: density, histogram, top and interval examples, logit lens, decoder
neighbours, and the forms that try it on a text or steer with it (``templates/feature.html``)."""

from cache_server.browser.templates import render as render_template
from shared.schemas import FeatureDetail


def render(detail: FeatureDetail, d_sae: int, byte_level: bool = False, causal: bool = False) -> str:
    """The page; ``byte_level``: the vocabulary is byte-level BPE (see ``layout.shown``); ``causal``:
    the model generates, so the steering form is shown."""
    edges = detail.histogram_edges
    return render_template(
        "feature.html", d=detail, d_sae=d_sae, byte_level=byte_level, causal=causal, base=f"/saes/{detail.sae_id}",
        bin_labels=[f"{lo:.3g} to {hi:.3g}" for lo, hi in zip(edges, edges[1:])],
        axis=(edges[0], edges[len(edges) // 2], edges[-1]))
