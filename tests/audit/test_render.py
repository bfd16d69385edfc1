"""The Annex IV document looked at as a person would: headless Chromium renders the HTML and the PDF."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from finetrace.audit import generate_documents
from finetrace.audit.documents import ANNEX_IV_HEADINGS
from finetrace.audit.render import CHROMIUM_NAMES

CHROMIUM = next((p for p in (shutil.which(n) for n in CHROMIUM_NAMES) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (apt-get install -y chromium)")


def _ink(img) -> tuple[float, int]:
    """Share of non-white pixels, and pixels of the h2 band colour (#e8eef7)."""
    import numpy as np

    px = np.asarray(img.convert("RGB")).astype(int).reshape(-1, 3)
    non_white = float((px != 255).any(axis=1).mean())
    band = int((np.abs(px - [0xE8, 0xEE, 0xF7]).sum(axis=1) < 6).sum())
    return non_white, band


def _heading_ink(img) -> int:
    """Pixels of the heading text colour (#1d3557, h1-h3)."""
    import numpy as np

    px = np.asarray(img.convert("RGB")).astype(int).reshape(-1, 3)
    return int((np.abs(px - [0x1D, 0x35, 0x57]).sum(axis=1) < 40).sum())


@pytest.mark.slow
@needs_chromium
def test_annex_iv_html_and_pdf_render_with_every_heading(audit_env, tmp_path):
    from PIL import Image

    from finetrace.audit import render

    ws, g = audit_env
    arts = generate_documents(ws, g["refs"]["adapter"], intended_use=g["intended_use"], formats=("html", "pdf"))
    annex = next(a for a in arts if a.metadata["document"] == "annex_iv")
    assert annex.metadata["files"] == ["annex_iv.html", "annex_iv.md", "annex_iv.pdf"]
    folder = ws.store.materialize(annex.digest)
    page = folder / "annex_iv.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: renders offline, years later
    dom = render.dump_dom(page)
    for heading in ANNEX_IV_HEADINGS:
        assert f"<h2>{heading}</h2>" in dom, heading
    assert dom.count("<table>") >= 3 and "not provided" in dom

    shot = render.screenshot(page, tmp_path / "annex_iv.png", 1200, 1800)
    if os.environ.get("FINETRACE_KEEP_SCREENSHOTS"):
        shutil.copy(shot, os.environ["FINETRACE_KEEP_SCREENSHOTS"])
    img = Image.open(shot)
    assert img.size == (1200, 1800)
    non_white, band = _ink(img)
    assert non_white > 0.05 and band > 2000, (non_white, band)  # text, tables and the shaded h2 bands

    pdf = folder / "annex_iv.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")
    if shutil.which("pdftotext"):
        text = subprocess.run(
            ["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
        ).stdout
        flat = " ".join(text.split())
        for heading in ANNEX_IV_HEADINGS:
            assert " ".join(heading.split()) in flat, heading
    if shutil.which("pdftoppm"):
        subprocess.run(
            ["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "2", str(pdf), str(tmp_path / "page")],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pages = sorted(tmp_path.glob("page-*.png"))
        assert len(pages) == 2
        for p in pages:
            nw, _ = _ink(Image.open(p))
            heading = _heading_ink(Image.open(p))
            assert nw > 0.02 and heading > 200, (p.name, nw, heading)
        if os.environ.get("FINETRACE_KEEP_SCREENSHOTS"):
            shutil.copy(pages[0], os.environ["FINETRACE_KEEP_SCREENSHOTS"] + ".pdf-page1.png")


def test_pdf_without_chromium_says_how_to_get_it(audit_env, monkeypatch):
    from finetrace.audit import render
    from finetrace.errors import DependencyError

    ws, g = audit_env
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    with pytest.raises(DependencyError, match="apt-get install -y chromium"):
        generate_documents(ws, g["refs"]["adapter"], formats=("pdf",))
    assert not ws.ledger.runs("document")[-1].outputs  # the failed run recorded no documents
    assert ws.ledger.runs("document")[-1].status == "failed"
