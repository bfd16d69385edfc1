"""Server-rendered pages over the registry (Jinja2, no JavaScript): search with filters, package pages.

Every value is autoescaped. The model card is rendered from Markdown by markdown-it with raw HTML off
(``render_card``: tags in the card come out as text, links with javascript:/data:/vbscript: URLs are not
links); other uploaded documents are shown as text. The badge is computed by the registry on each view
(``Registry.badge``), not stored.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from ..errors import FinetraceError
from .package import license_needs_acceptance

TEMPLATES = Path(__file__).parent / "templates"


def render_card(markdown: str) -> Markup:
    """Sanitised HTML of a model card: CommonMark and tables, raw HTML escaped, unsafe link schemes dropped."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")
    return Markup(md.render(markdown))


def metric_chart(metrics: dict, base_metrics: dict) -> dict:
    """Bars for the SVG chart: tuned vs base per metric (values assumed in [0, 1] unless larger)."""
    names = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    top = max([1.0, *[metrics[k] for k in names], *[v for v in base_metrics.values() if isinstance(v, (int, float))]])
    bars = []
    for i, k in enumerate(names):
        b = base_metrics.get(k)
        bars.append(
            {
                "name": k,
                "y": 20 + i * 34,
                "tuned": metrics[k],
                "tuned_w": 300 * metrics[k] / top,
                "base": b,
                "base_w": 300 * b / top if isinstance(b, (int, float)) else None,
            }
        )
    return {"bars": bars, "height": 30 + 34 * len(names)}


def register_pages(app: FastAPI, reg, settings) -> None:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(title=settings.title, **ctx), status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def search_page(
        q: str = "",
        domain: str = "",
        task: str = "",
        base: str = "",
        license: str = "",
        min_metric: str = "",
        sort: str = "",
    ):
        form = {
            "q": q,
            "domain": domain,
            "task": task,
            "base": base,
            "license": license,
            "min_metric": min_metric,
            "sort": sort,
        }
        try:
            res = reg.search(
                q,
                domain or None,
                task or None,
                base or None,
                license or None,
                [min_metric] if min_metric.strip() else [],
                sort or None,
                limit=50,
            )
            return page("search.html", form=form, results=res["results"], error=None)
        except FinetraceError as exc:
            return page("search.html", 400, form=form, results=[], error=str(exc))

    def package_page(ns: str, name: str, version: str | None):
        try:
            info = reg.version(ns, name, version)
        except FinetraceError as exc:
            return page("error.html", 404, error=str(exc))
        m = info["manifest"]
        badge = reg.badge(info)
        card = reg.read_text(
            m,
            next(
                (f["path"] for f in m["files"] if f["path"].startswith("documents/model_card")),
                "documents/model_card.md",
            ),
        )
        docs = [f for f in m["files"] if f["path"].startswith("documents/")]
        return page(
            "package.html",
            info=info,
            m=m,
            badge=badge,
            card=render_card(card) if card else None,
            docs=docs,
            chart=metric_chart(m.get("metrics") or {}, m.get("base_metrics") or {}),
            needs_acceptance=license_needs_acceptance(m["license"]),
        )

    @app.get("/p/{ns}/{name}", response_class=HTMLResponse)
    def latest_page(ns: str, name: str):
        return package_page(ns, name, None)

    @app.get("/p/{ns}/{name}/{version}", response_class=HTMLResponse)
    def version_page(ns: str, name: str, version: str):
        return package_page(ns, name, version)
