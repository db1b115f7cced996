"""An SAE's page: its summary (L0, FVU, downstream figures, dead and dense counts, the feature
density histogram on a log scale) over a page of its features, sortable by density and maximum
activation, searchable by their top tokens, with a link to a random live feature."""

from html import escape
from urllib.parse import urlencode

from cache_server.browser.layout import bars, page, shown
from shared.schemas import FeatureList, SaeInfo, SaeSummary

SORTS = {"density": "density", "max": "max activation", "index": "index"}


def _figures(summary: SaeSummary) -> str:
    figures = [("L0", "l0", f"{summary.l0:.1f}"), ("FVU", "fvu", f"{summary.fvu:.3f}"),
               ("dead", "dead", f"{summary.dead:,} of {summary.sae.d_sae:,}"),
               ("dense (fire on over 10% of rows)", "dense", f"{summary.dense:,}")]
    result = summary.evaluation
    if result is not None and result.downstream is not None:
        d = result.downstream
        score = "n/a" if d.ce_loss_score is None else f"{d.ce_loss_score:.3f}"
        figures += [("CE loss score", "ce-score", score), ("KL", "kl", f"{d.kl_div_with_sae:.4f}"),
                    ("CE clean / with SAE", "ce", f"{d.ce_loss_without_sae:.3f} / {d.ce_loss_with_sae:.3f}")]
    elif result is not None:
        figures.append(("downstream", "downstream", result.downstream_unavailable or "n/a"))
    else:
        figures.append(("downstream", "downstream", "not evaluated (POST /v1/evaluations)"))
    return '<p class="figures">' + "".join(f'<span>{escape(label)} <b id="{key}">{escape(value)}</b></span>'
                                           for label, key, value in figures) + "</p>"


def _density(summary: SaeSummary) -> str:
    edges = summary.density_edges
    labels = [f"10^{lo:.2f} to 10^{hi:.2f}" for lo, hi in zip(edges, edges[1:])]
    axis = f'<div class="axis"><span>10^{edges[0]:.1f}</span><span>density (log10)</span><span>1</span></div>'
    return bars(summary.density_counts, labels) + axis


def _link(base: str, **query) -> str:
    return f"{base}/?{escape(urlencode({k: v for k, v in query.items() if v not in ('', None)}))}"


def _table(base: str, listing: FeatureList, sort: str, order: str, q: str, limit: int) -> str:
    heads = "".join(
        f'<th><a href="{_link(base, sort=key, order="descending" if sort != key or order == "ascending" else "ascending", q=q)}">'
        f"{name}{(' ▼' if order == 'descending' else ' ▲') if key == sort else ''}</a></th>"
        for key, name in (("index", "feature"), ("density", "density"), ("max", "max")))
    rows = "".join(f'<tr><td><a href="{base}/features/{f.index}">{f.index}</a></td><td class="num">{f.density:.4%}</td>'
                   f'<td class="num">{f.max_value:.4g}</td><td>{" ".join(f"<code>{shown(t)}</code>" for t in f.top_tokens)}</td></tr>'
                   for f in listing.features)
    pages = []
    if listing.offset > 0:
        pages.append(f'<a href="{_link(base, sort=sort, order=order, q=q, offset=max(listing.offset - limit, 0))}">previous</a>')
    if listing.offset + limit < listing.total:
        pages.append(f'<a href="{_link(base, sort=sort, order=order, q=q, offset=listing.offset + limit)}" id="next-page">next</a>')
    shown_range = f"{listing.offset + 1:,} to {min(listing.offset + limit, listing.total):,}" if listing.features else "none"
    return (f'<p><span id="matches">{listing.total:,}</span> features{" match" if q else ""}; showing {shown_range}. '
            f'{" ".join(pages)}</p><table id="features"><tr>{heads}<th>top tokens</th></tr>{rows}</table>')


def render(summary: SaeSummary, listing: FeatureList, sort: str, order: str, q: str, limit: int) -> str:
    sae = summary.sae
    base = f"/saes/{sae.sae_id}"
    rows = f"chunks {', '.join(map(str, summary.chunk_ids))}" if summary.chunk_ids else "its first rows"
    search = (f'<form method="get" action="{base}/"><input type="search" name="q" value="{escape(q)}" '
              f'placeholder="a token, e.g. the" id="search"><input type="hidden" name="sort" value="{escape(sort)}">'
              f'<button type="submit">search top tokens</button></form>')
    title = escape(sae.name or sae.sae_id)
    return page(f"SAE {sae.name or sae.sae_id}", f"""<nav><a href="/saes/">SAEs</a><a href="{base}/random" id="random">a random feature</a>
<a href="{base}/text" id="try-text">any text</a></nav>
<h1>SAE {title}</h1>
<p>{escape(sae.label())}, {sae.d_sae:,} features on <code>{escape(sae.hook)}</code>
(d_in {sae.d_in}) of dataset <code>{escape(sae.dataset_id)}</code>; figures over {summary.n_rows:,} rows ({escape(rows)}).</p>
{_figures(summary)}
<form method="get" action="{base}/text" id="text-form"><input name="text" id="text" placeholder="any text: what fires on it?"
size="50"><button type="submit">encode</button></form>
<h2>Feature density (live features)</h2>{_density(summary)}
<h2>Features</h2>{search}{_table(base, listing, sort, order, q, limit)}""")


INDEX_SORTS = ("name", "architecture", "l0", "fvu", "ce", "dead")


def _ce(summary: SaeSummary | None) -> float | None:
    down = summary.evaluation.downstream if summary and summary.evaluation else None
    return down.ce_loss_score if down else None


def render_index(saes: list[tuple[SaeInfo, SaeSummary | None]], sort: str) -> str:
    """Every registered SAE with its name, architecture and figures (from its feature statistics
    and latest evaluation, where computed), sortable by each; '-' where a figure is not computed."""
    keys = {"name": lambda s, m: s.name or s.sae_id, "architecture": lambda s, m: s.label(),
            "l0": lambda s, m: m and m.l0, "fvu": lambda s, m: m and m.fvu, "ce": lambda s, m: _ce(m),
            "dead": lambda s, m: m and m.dead / s.d_sae}
    descending = sort == "ce"  # a higher score is better; lower is better for the rest
    ordered = sorted(saes, key=lambda p: (keys[sort](*p) is None, keys[sort](*p) or 0) if sort not in ("name", "architecture")
                     else keys[sort](*p))
    if descending:
        known = [p for p in ordered if keys[sort](*p) is not None]
        ordered = known[::-1] + [p for p in ordered if keys[sort](*p) is None]

    def cell(value: float | None, fmt: str) -> str:
        return f'<td class="num">{"-" if value is None else format(value, fmt)}</td>'

    rows = "".join(
        f'<tr><td><a href="/saes/{s.sae_id}/">{escape(s.name or s.sae_id)}</a></td><td>{escape(s.label())}</td>'
        + cell(m and m.l0, ".1f") + cell(m and m.fvu, ".3f") + cell(_ce(m), ".3f")
        + cell(m and 100 * m.dead / s.d_sae, ".1f")
        + f'<td class="num">{s.d_sae:,}</td><td><code>{escape(s.hook)}</code></td><td><code>{s.dataset_id}</code></td></tr>'
        for s, m in ordered)
    heads = "".join(f'<th><a href="/saes/?sort={key}">{label}</a></th>' for key, label in (
        ("name", "SAE"), ("architecture", "architecture"), ("l0", "L0"), ("fvu", "FVU"), ("ce", "CE score"),
        ("dead", "dead %")))
    return page("SAEs", f'<h1>SAEs</h1><table id="saes"><tr>{heads}<th>features</th><th>hook</th><th>dataset</th></tr>'
                        f"{rows}</table><p>L0, FVU and dead % over the rows of each SAE's feature statistics; CE score "
                        "from its latest evaluation.</p>"
                        + ("" if saes else "<p>None registered yet (POST /v1/saes).</p>"))
