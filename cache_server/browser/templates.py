"""The pages' Jinja2 templates: autoescaped, so every string from the vocabulary or a request is
escaped unless a filter here marks it as already escaped (``shown`` escapes first)."""

from html import escape

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from cache_server.browser.layout import STYLE, SPECIAL, shown

def _escaped(value):
    """Strings escaped as ``html.escape`` does (quotes as &quot; and &#x27;), the rest as Jinja does."""
    return Markup(escape(value)) if isinstance(value, str) and not isinstance(value, Markup) else value


ENV = Environment(loader=PackageLoader("cache_server.browser", "templates"), autoescape=True, finalize=_escaped,
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.globals |= {"STYLE": Markup(STYLE), "SPECIAL": SPECIAL}
ENV.filters["shown"] = lambda text, byte_level=False: Markup(shown(text, byte_level))


def shade(value: float, max_value: float | None) -> str:
    """A token's background alpha: its activation over the scale's maximum, clipped to [0, 1]."""
    return "0" if not max_value or max_value <= 0 else f"{max(0.0, min(value / max_value, 1.0)):.3f}"


ENV.filters["shade"] = shade
ENV.filters["fmt"] = format


def render(template: str, **context) -> str:
    return ENV.get_template(template).render(**context)
