"""One feature's page: density, histogram, top and interval examples, logit lens, decoder
neighbours. Every vocabulary string is escaped (``layout.shown`` and ``escape``)."""

from html import escape

from cache_server.browser.layout import SPECIAL, bars, page, shown
from shared.schemas import FeatureDetail, FeatureExample


def _token(text: str, value: float, max_value: float, centre: bool, byte_level: bool, href: str) -> str:
    """A token shaded by its activation, the value in its title (shown on hover), linked to the
    features active on it."""
    alpha = 0 if max_value <= 0 else max(0.0, min(value / max_value, 1.0))
    classes = "tok" + (" centre" if centre else "") + (" special" if text in SPECIAL else "")
    return (f'<a class="{classes}" href="{href}" style="background: rgba(220, 80, 40, {alpha:.3f})" '
            f'title="{escape(text)}: {value:.4g}">{shown(text, byte_level)}</a>')


def _example(example: FeatureExample, max_value: float, byte_level: bool, base: str) -> str:
    first = example.row - example.position  # the row of the example's first token
    tokens = "".join(_token(t, v, max_value, i == example.position, byte_level, f"{base}/rows/{first + i}")
                     for i, (t, v) in enumerate(zip(example.tokens, example.values)))
    return f'<div class="example" data-row="{example.row}"><span class="value">{example.value:.3f}</span>{tokens}</div>'


def _histogram(detail: FeatureDetail) -> str:
    """The bars with their axes: activation from 0 to the max below, the tallest bar's count beside."""
    edges, counts = detail.histogram_edges, detail.histogram_counts
    labels = [f"{lo:.3g} to {hi:.3g}" for lo, hi in zip(edges, edges[1:])]
    axis = "".join(f"<span>{v:.3g}</span>" for v in (edges[0], edges[len(edges) // 2], edges[-1]))
    return (f'<p class="note">rows a bin (tallest: <b id="hist-top">{max(counts, default=0):,}</b>), by activation:</p>'
            f'{bars(counts, labels)}<div class="axis" id="hist-axis">{axis}</div>')


def _scale(max_value: float) -> str:
    """What a token's shade means: its activation over the feature's max."""
    return (f'<p class="note" id="scale">shade: activation from 0 <span class="ramp"></span> to this feature\'s max '
            f"{max_value:.4g} (hover a token for its value)</p>")


def _lens(detail: FeatureDetail) -> str:
    if detail.logit_lens_note:
        return f'<p class="note" id="lens-note">{escape(detail.logit_lens_note)}</p>'

    def column(title: str, entries: list[tuple[str, float]], key: str) -> str:
        items = "".join(f"<tr><td>{shown(t)}</td><td class=\"num\">{v:+.3f}</td></tr>" for t, v in entries)
        return f'<div><h3>{title}</h3><table id="{key}">{items}</table></div>'

    return f'<div class="lens">{column("promoted", detail.promoted, "promoted")}' \
           f'{column("suppressed", detail.suppressed, "suppressed")}</div>'


def _forms(base: str, index: int, causal: bool) -> str:
    """Try the feature on any text; steer with it (a causal LM's only)."""
    steer = (f'<form method="get" action="{base}/features/{index}/steer" id="steer-form"><input name="prompt" id="prompt" '
             'placeholder="a prompt to continue" size="40"><button type="submit">steer with this feature</button></form>'
             if causal else "")
    return (f'<form method="get" action="{base}/features/{index}/text" id="text-form"><input name="text" id="text" '
            f'placeholder="any text" size="40"><button type="submit">shade a text by this feature</button></form>{steer}')


def render(detail: FeatureDetail, d_sae: int, byte_level: bool = False, causal: bool = False) -> str:
    """The page; ``byte_level``: the vocabulary is byte-level BPE (see ``layout.shown``)."""
    base = f"/saes/{detail.sae_id}"
    top = "".join(_example(e, detail.max_value, byte_level, base) for e in detail.top) or "<p>It never fires on these rows.</p>"
    intervals = "".join(
        f"<h3>interval {q + 1} of {len(detail.intervals)}</h3>" + "".join(_example(e, detail.max_value, byte_level, base) for e in group)
        for q, group in enumerate(detail.intervals) if group)
    dead, mark = set(detail.dead_neighbours), ' <span class="dead">dead</span>'
    neighbours = "".join(f'<li><a href="{base}/features/{i}">feature {i}</a> cosine {c:.3f}{mark if i in dead else ""}</li>'
                         for i, c in detail.neighbours)
    previous = f'<a href="{base}/features/{detail.index - 1}">previous</a>' if detail.index > 0 else ""
    following = f'<a href="{base}/features/{detail.index + 1}">next</a>' if detail.index + 1 < d_sae else ""
    return page(f"Feature {detail.index} of SAE {detail.sae_id}", f"""<nav><a href="{base}/">SAE {detail.sae_id}</a>{previous}{following}</nav>
<h1>Feature {detail.index}</h1>
<p class="figures"><span>density <b id="density">{detail.density:.4%}</b></span>
<span>max <b id="max">{detail.max_value:.4g}</b></span><span>mean when firing <b id="mean">{detail.mean_value:.4g}</b></span>
<span>over <b>{detail.n_rows:,}</b> rows</span></p>
{_forms(base, detail.index, causal)}
<h2>Activations where it fires</h2>{_histogram(detail)}
<h2>Top activations</h2>{_scale(detail.max_value)}<p class="note">Click a token for every feature active on it.</p><section id="top">{top}</section>
<h2>Examples by activation interval</h2><section id="intervals">{intervals}</section>
<h2>Logit lens (decoder direction through the unembedding)</h2>{_lens(detail)}
<h2>Nearest decoder directions</h2><ol id="neighbours">{neighbours}</ol>""")
