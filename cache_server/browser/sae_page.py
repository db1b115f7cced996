"""An SAE's page: its summary (L0, FVU, downstream figures, dead and dense counts, the feature
density histogram on a log scale) over a page of its features, sortable by density and maximum
activation, searchable by their top tokens, with a link to a random live feature; and the list of
every SAE (``templates/sae.html``, ``templates/saes.html``)."""

from urllib.parse import urlencode

from cache_server.browser.templates import render as render_template
from shared.schemas import FeatureList, SaeInfo, SaeSummary

SORTS = {"density": "density", "max": "max activation", "index": "index"}


def _figures(summary: SaeSummary) -> list[tuple[str, str, str]]:
    """(label, element id, shown value) of each figure."""
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
    return figures


def render(summary: SaeSummary, listing: FeatureList, sort: str, order: str, q: str, limit: int) -> str:
    sae = summary.sae
    base = f"/saes/{sae.sae_id}"

    def link(**query) -> str:
        return f"{base}/?{urlencode({k: v for k, v in query.items() if v not in ('', None)})}"

    pages = []
    if listing.offset > 0:
        pages.append(("previous", link(sort=sort, order=order, q=q, offset=max(listing.offset - limit, 0)), None))
    if listing.offset + limit < listing.total:
        pages.append(("next", link(sort=sort, order=order, q=q, offset=listing.offset + limit), "next-page"))
    edges = summary.density_edges
    return render_template(
        "sae.html", sae=sae, summary=summary, listing=listing, sort=sort, order=order, q=q, base=base, link=link,
        pages=pages, figures=_figures(summary),
        rows=f"chunks {', '.join(map(str, summary.chunk_ids))}" if summary.chunk_ids else "its first rows",
        shown_range=(f"{listing.offset + 1:,} to {min(listing.offset + limit, listing.total):,}"
                     if listing.features else "none"),
        density_labels=[f"10^{lo:.2f} to 10^{hi:.2f}" for lo, hi in zip(edges, edges[1:])],
        columns=(("index", "feature"), ("density", "density"), ("max", "max")))


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
    rows = [{"sae": s, "figures": [(m and m.l0, ".1f"), (m and m.fvu, ".3f"), (_ce(m), ".3f"),
                                   (m and 100 * m.dead / s.d_sae, ".1f")]} for s, m in ordered]
    columns = (("name", "SAE"), ("architecture", "architecture"), ("l0", "L0"), ("fvu", "FVU"), ("ce", "CE score"),
               ("dead", "dead %"))
    return render_template("saes.html", rows=rows, columns=columns)
