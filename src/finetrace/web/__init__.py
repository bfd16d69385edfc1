"""``finetrace ui``: a read-only web console over one workspace, for people who audit.

    from finetrace.web import create_app, check_bind
    app = create_app(".finetrace", token=None)        # FastAPI app; serve with uvicorn

Pages: the runs timeline (``/``), a run (``/runs/ID``), artifacts (``/artifacts``, ``/a/REF`` with its
digest, alias history and files), the lineage graph as server-rendered SVG (``/lineage?ref=REF`` for an
artifact or an ``ftp-`` answer id), eval reports (``/reports``), documents rendered from Markdown with raw
HTML off (``/documents``), provenance lookup (``/provenance?id=ftp-...``), the ledger's state with verify on
demand (``/ledger``), and what needs a person (``/attention``).

Modules: ``app`` (the factory, the token guard, the bind rule), ``views`` (what each page shows, from the
ledger's own queries), ``svg`` (timeline, loss curves, lineage graph), ``templates/`` (Jinja, autoescaped).
"""

from .app import check_bind, create_app, is_loopback

__all__ = ["check_bind", "create_app", "is_loopback"]
