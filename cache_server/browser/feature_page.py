"""One feature's page: density, histogram, top and interval examples, decoder neighbours.

Plain HTML with its style inline and no script: it renders offline and in any browser. Every
string from the vocabulary is untrusted text, so each one goes through ``html.escape``.
"""

from html import escape

from shared.schemas import FeatureDetail, FeatureExample

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.figures span { margin-right: 1.5em; } .figures b { font-variant-numeric: tabular-nums; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: .15em 0; }
.example .value { display: inline-block; width: 5.5em; color: #666; }
.tok { border-radius: 2px; } .tok.centre { outline: 1px solid #c33; }
.special { color: #888; font-style: italic; }
.hist { display: flex; align-items: flex-end; height: 80px; gap: 1px; }
.hist div { background: #4a7bd0; flex: 1; min-height: 1px; }
nav a { margin-right: 1em; }
"""
SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>")


def _token(text: str, value: float, max_value: float, centre: bool) -> str:
    """A token shaded by its activation, the value in its title (shown on hover)."""
    alpha = 0 if max_value <= 0 else max(0.0, min(value / max_value, 1.0))
    shown = text.replace("Ġ", " ").replace("Ċ", "⏎")
    shown = shown[2:] if shown.startswith("##") else (shown if shown.startswith(" ") or text in SPECIAL else " " + shown)
    classes = "tok" + (" centre" if centre else "") + (" special" if text in SPECIAL else "")
    return (f'<span class="{classes}" style="background: rgba(220, 80, 40, {alpha:.3f})" '
            f'title="{escape(text)}: {value:.4g}">{escape(shown)}</span>')


def _example(example: FeatureExample, max_value: float) -> str:
    tokens = "".join(_token(t, v, max_value, i == example.position)
                     for i, (t, v) in enumerate(zip(example.tokens, example.values)))
    return f'<div class="example" data-row="{example.row}"><span class="value">{example.value:.3f}</span>{tokens}</div>'


def _histogram(detail: FeatureDetail) -> str:
    top = max(detail.histogram_counts, default=0) or 1
    bars = "".join(f'<div style="height: {100 * c / top:.1f}%" title="{lo:.3g} to {hi:.3g}: {c}"></div>'
                   for c, lo, hi in zip(detail.histogram_counts, detail.histogram_edges, detail.histogram_edges[1:]))
    return f'<div class="hist">{bars}</div>'


def render(detail: FeatureDetail, d_sae: int) -> str:
    base = f"/saes/{detail.sae_id}"
    top = "".join(_example(e, detail.max_value) for e in detail.top) or "<p>It never fires on these rows.</p>"
    intervals = "".join(
        f"<h3>interval {q + 1} of {len(detail.intervals)}</h3>" + "".join(_example(e, detail.max_value) for e in group)
        for q, group in enumerate(detail.intervals) if group)
    neighbours = "".join(f'<li><a href="{base}/features/{i}">feature {i}</a> cosine {c:.3f}</li>'
                         for i, c in detail.neighbours)
    previous = f'<a href="{base}/features/{detail.index - 1}">previous</a>' if detail.index > 0 else ""
    following = f'<a href="{base}/features/{detail.index + 1}">next</a>' if detail.index + 1 < d_sae else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Feature {detail.index} of SAE {detail.sae_id}</title>
<style>{STYLE}</style></head><body>
<nav><a href="{base}/">SAE {detail.sae_id}</a>{previous}{following}</nav>
<h1>Feature {detail.index}</h1>
<p class="figures"><span>density <b id="density">{detail.density:.4%}</b></span>
<span>max <b id="max">{detail.max_value:.4g}</b></span><span>mean when firing <b id="mean">{detail.mean_value:.4g}</b></span>
<span>over <b>{detail.n_rows:,}</b> rows</span></p>
<h2>Activations where it fires</h2>{_histogram(detail)}
<h2>Top activations</h2><section id="top">{top}</section>
<h2>Examples by activation interval</h2><section id="intervals">{intervals}</section>
<h2>Nearest decoder directions</h2><ol id="neighbours">{neighbours}</ol>
</body></html>"""
