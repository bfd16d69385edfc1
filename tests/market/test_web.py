"""The registry's web pages in headless Chromium: search, filter, open a package page, see the badge.

Chromium runs as a separate process against the real server (``--dump-dom`` gives the DOM it rendered,
``--screenshot`` a PNG). Set ``FINETRACE_SCREENSHOT_DIR`` to keep the screenshots.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from finetrace.market import client

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium)")


def _chromium(*args: str) -> str:
    cmd = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1100,1500",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.slow
def test_search_filter_and_package_page_in_chromium(market, server, tmp_path):
    if server.kind != "sqlite":
        pytest.skip("the pages are the same for every database; they run against SQLite")
    client.publish(
        market.pub,
        "legal-lora",
        "acme/web-clauses@1.0",
        server.url,
        server.tokens["acme"],
        domain=["legal"],
        task=["classification"],
        description="Contract clause classifier, web test",
    )

    dom = _chromium("--dump-dom", f"{server.url}/?q=contract&domain=legal&sort=downloads")
    links = re.findall(r'class="package-link" href="([^"]+)"', dom)
    assert "/p/acme/web-clauses/1.0" in links
    assert 'value="legal"' in dom  # the filter is kept in the form

    filtered = _chromium("--dump-dom", f"{server.url}/?q=contract&domain=medical")
    assert 'id="count">0 packages' in filtered and "package-link" not in filtered

    bad = _chromium("--dump-dom", f"{server.url}/?q=x&min_metric=accuracy%3E%3E1")
    assert 'id="error"' in bad and "bad metric filter" in bad

    page = _chromium("--dump-dom", server.url + links[links.index("/p/acme/web-clauses/1.0")])
    assert re.search(r'id="badge" class="badge verified"[^>]*>verified<', page), page[:3000]
    assert "Legal contract classifier" in page  # the model card
    assert 'id="eval-chart"' in page and "tuned 0.930" in page and "base 0.410" in page
    assert re.search(r"<td>gender</td><td>0.020</td>", page)  # bias results
    assert "inclusion proof valid" in page and "Apache-2.0" in page
    assert "producer_run" in page  # lineage summary

    shots = os.environ.get("FINETRACE_SCREENSHOT_DIR") or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    for name, url in (
        ("search", f"{server.url}/?q=contract&domain=legal"),
        ("package", f"{server.url}/p/acme/web-clauses/1.0"),
    ):
        png = os.path.join(shots, f"market-{name}.png")
        _chromium(f"--screenshot={png}", url)
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    missing = _chromium("--dump-dom", f"{server.url}/p/acme/nope")
    assert "no package acme/nope" in missing
