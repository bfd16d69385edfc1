"""The console as Chromium renders it, over a real socket: key content in the DOM, and screenshots that
show it (the timeline's status colours, the lineage graph's highlighted root), not merely a non-blank page."""

from __future__ import annotations

import re

import pytest

from finetrace.audit.render import CHROMIUM_NAMES

CHROMIUM = next((n for n in CHROMIUM_NAMES if __import__("shutil").which(n)), None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium)"),
]

WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def url(console_env):
    from finetrace.web import create_app
    from finetrace.web.snapshot import serve_in_thread

    with serve_in_thread(create_app(console_env["root"])) as base:
        yield base


def test_runs_page_in_chromium(url, console_env, tmp_path):
    from finetrace.web.snapshot import colour_share, dump_dom, screenshot
    from finetrace.workspace import Workspace

    with Workspace.open(console_env["root"]) as ws:
        runs = ws.ledger.runs()
    dom = dump_dom(url + "/")
    assert dom.count('class="run-bar ') == len(runs) and console_env["train_run"] in dom
    assert dom.count('class="loss-curve small"') == 2
    png = screenshot(url + "/", tmp_path / "runs.png", 1280, 900)
    assert 1 - colour_share(png, WHITE, 0) > 0.03  # not blank
    assert colour_share(png, (0x55, 0xA8, 0x68)) > 0.0005  # succeeded bars, drawn green
    assert colour_share(png, (0x4C, 0x72, 0xB0)) > 0.0001  # the loss sparklines


def test_lineage_provenance_and_attention_in_chromium(url, console_env, tmp_path):
    from finetrace.web.snapshot import colour_share, dump_dom, screenshot

    adapter, dataset = console_env["adapter"], console_env["dataset"]
    dom = dump_dom(f"{url}/lineage?ref={adapter.ref}")
    assert f'class="node root" data-id="{adapter.digest}"' in dom and f'data-id="{dataset.digest}"' in dom
    png = screenshot(f"{url}/lineage?ref={adapter.ref}", tmp_path / "lineage.png", 1400, 700)
    assert colour_share(png, (0xFD, 0xEB, 0xD8), 6) > 0.001  # adapter nodes' fill
    assert colour_share(png, (0xC4, 0x4E, 0x52), 30) > 0.0002  # the root's red outline
    prov = dump_dom(f"{url}/provenance?id={console_env['provenance_id']}")
    assert adapter.ref in re.search(r'<tr id="adapter">.*?</tr>', prov, re.S).group(0)
    assert console_env["train_run"] in prov and dataset.ref in prov
    att = dump_dom(f"{url}/attention")
    assert "strict-lora@1" in re.search(r'<table id="failed">.*?</table>', att, re.S).group(0)
