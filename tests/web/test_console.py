"""Every console page renders for the pipeline's workspace and shows what it is for (``console_env``)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from .conftest import SCRIPT


@pytest.fixture(scope="module")
def client(console_env):
    from finetrace.web import create_app

    with TestClient(create_app(console_env["root"])) as c:
        yield c


@pytest.fixture(scope="module")
def ws(console_env):
    from finetrace.workspace import Workspace

    w = Workspace.open(console_env["root"])
    yield w
    w.close()


def get(client, url: str) -> str:
    r = client.get(url)
    assert r.status_code == 200, (url, r.status_code, r.text[:500])
    return r.text


def test_runs_timeline_shows_every_run_with_status_duration_and_loss(client, ws):
    page = get(client, "/")
    runs = ws.ledger.runs()
    assert page.count('class="run-bar ') == len(runs) == page.count('<tr class="run-row">')
    for r in runs:
        assert r.id in page
    trains = ws.ledger.runs("train")
    assert page.count('class="loss-curve small"') == len(trains) == 2
    only_train = get(client, "/?kind=train")
    assert only_train.count('<tr class="run-row">') == 2
    run = trains[0]
    page = get(client, f"/runs/{run.id}")
    assert "succeeded" in page and "final_loss" in page
    pts = re.search(r'class="train-loss"[^>]*points="([^"]+)"', page).group(1).split()
    from finetrace.tracking import step_history

    assert len(pts) == len([h for h in step_history(ws, run) if "loss" in h]) == run.metrics["steps"]


def test_artifact_pages_show_digest_alias_history_files_and_clearance(client, console_env, ws):
    adapter = console_env["adapter"]
    page = get(client, f"/a/{adapter.ref}")
    assert f'<code id="digest">{adapter.digest}</code>' in page
    assert "adapter_model.safetensors" in page and "metrics.jsonl" in page
    assert "<b>routing-lora@1</b>" in page  # its own row in the alias history
    assert re.search(r'id="clearance"><b>overridden</b>', page) and "approved by <b>Ada Lovelace</b>" in page
    data = get(client, f"/a/{console_env['dataset'].digest}")
    assert 'class="datasheet"' in data and "Routing tickets" in data
    assert SCRIPT not in data and "&lt;script&gt;alert(" in data
    listing = get(client, "/artifacts")
    assert all(a.digest in listing for a in ws.ledger.artifacts())


def test_lineage_graph_up_and_down_from_an_adapter_and_a_dataset(client, console_env, ws):
    from finetrace.ledger import lineage

    for art, extra in ((console_env["adapter"], {"base_model"}), (console_env["dataset"], {"source"})):
        graph = lineage(ws.ledger, art.digest, "both")
        page = get(client, f"/lineage?ref={art.ref}")
        svg = page[page.index('<svg class="lineage"') : page.index("</svg>", page.index('<svg class="lineage"'))]
        assert svg.count('class="node root"') == 1 and f'class="node root" data-id="{art.digest}"' in svg
        assert svg.count('<g class="node') == len(graph["artifacts"]) + len(graph["runs"])
        assert svg.count('class="edge"') == len(graph["edges"])
        kinds = set(re.findall(r'data-kind="([a-z_]+)"', svg))
        assert {"dataset", "adapter", "eval_report", "run"} | extra <= kinds
        assert f'href="/runs/{art.run_id}"' in svg


def test_lineage_from_an_answer_reaches_the_dataset(client, console_env):
    pid = console_env["provenance_id"]
    page = get(client, f"/lineage?ref={pid}")
    assert f'data-id="{pid}" data-kind="answer"' in page and 'class="node root"' in page
    for digest in (console_env["adapter"].digest, console_env["dataset"].digest):
        assert f'data-id="{digest}"' in page
    assert f'data-id="{console_env["train_run"]}"' in page


def test_provenance_lookup_shows_adapter_training_run_and_dataset_version(client, console_env):
    assert 'name="id"' in get(client, "/provenance")
    page = get(client, f"/provenance?id={console_env['provenance_id']}")
    adapter_row = re.search(r'<tr id="adapter">.*?</tr>', page, re.S).group(0)
    assert console_env["adapter"].ref in adapter_row and console_env["adapter"].digest[:19] in adapter_row
    run_row = re.search(r'<tr id="training-run">.*?</tr>', page, re.S).group(0)
    assert console_env["train_run"] in run_row
    ds_row = re.search(r'<tr class="dataset">.*?</tr>', page, re.S).group(0)
    assert console_env["dataset"].ref == "tickets@1" and "tickets@1" in ds_row
    bad = client.get("/provenance?id=ftp-nope")
    assert bad.status_code == 404 and "no served answer with provenance id" in bad.text


def test_eval_reports_and_the_stored_report_page(client, ws):
    page = get(client, "/reports")
    reports = ws.ledger.artifacts("eval_report")
    assert len(reports) == 3 and all(r.digest in page for r in reports)
    assert page.count("FAILED") == 2  # both strict evaluations
    r = client.get(f"/a/{reports[0].digest}/file/report.html")
    assert r.status_code == 200 and "script-src" not in r.headers["content-security-policy"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert '<p class="banner passed" id="verdict">' in r.text and 'class="confusion"' in r.text


def test_documents_render_from_markdown_with_the_script_inert(client, ws):
    page = get(client, "/documents")
    docs = ws.ledger.artifacts("document")
    assert docs and all(d.digest in page for d in docs)
    carrying = []
    for d in docs:
        for f in ws.store.tree(d.digest):
            if f.path.endswith(".md"):
                text = ws.store.read_bytes(f.digest).decode()
                view = get(client, f"/a/{d.digest}/view/{f.path}")
                assert '<article class="doc" id="document">' in view and "<h1>" in view or "<h2>" in view
                if SCRIPT in text:
                    carrying.append(f.path)
                    assert SCRIPT not in view and "&lt;script&gt;alert(" in view
    assert carrying, "no document carries the datasheet field (the test would prove nothing)"


def test_ledger_state_and_verify_on_demand(client, ws):
    page = get(client, "/ledger")
    assert f'<td id="tree-size">{ws.ledger.size()}</td>' in page
    assert f'<code id="root">{ws.ledger.root().hex()}</code>' in page
    cp = ws.ledger.checkpoints()[-1]
    assert f"size {cp.size}, root <code>{cp.root[:16]}" in page and 'id="verify-result"' not in page
    verified = get(client, "/ledger?verify=1")
    assert 'id="verify-result"' in verified and "verify: OK" in verified
    assert re.search(r"checked \d+ entries", verified)


def test_needs_a_person_lists_awaiting_failed_and_overrides(client, console_env):
    page = get(client, "/attention")
    awaiting = re.search(r'<table id="awaiting">.*?</table>', page, re.S).group(0)
    assert "routing-lora@1" in awaiting and "needs a new approval" in awaiting
    failed = re.search(r'<table id="failed">.*?</table>', page, re.S).group(0)
    assert "strict-lora@1" in failed and "min_metric:accuracy" in failed and "routing-lora" not in failed
    overrides = re.search(r'<table id="overrides">.*?</table>', page, re.S).group(0)
    assert "Grace Hopper" in overrides and "cannot be met" in overrides


def test_token_guards_every_page(console_env):
    from finetrace.web import create_app

    with TestClient(create_app(console_env["root"], token="s3cret"), follow_redirects=False) as c:
        r = c.get("/ledger")
        assert r.status_code == 401 and "needs its token" in r.text and "tree-size" not in r.text
        assert c.get("/ledger", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/ledger", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.get("/ledger?token=s3cret")
        assert r.status_code == 303 and r.headers["location"].endswith("/ledger")
        assert c.get("/ledger").status_code == 200  # the cookie it set


def test_console_refuses_a_non_loopback_host_without_a_token(console_env, capsys):
    from finetrace.cli import main
    from finetrace.errors import InputError
    from finetrace.web import check_bind

    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        with pytest.raises(InputError, match="without a token"):
            check_bind(host, None)
        check_bind(host, "t")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    rc = main(["--workspace", str(console_env["root"]), "ui", "--host", "0.0.0.0", "--port", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and "non-loopback" in err and "without a token" in err and "--token" in err
