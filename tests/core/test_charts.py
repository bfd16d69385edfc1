"""finetrace.charts: the one way charts are drawn (geometry in Python, SVG from autoescaped Jinja templates)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from finetrace.charts import bar_chart, graph, loss_curve, timeline

SVG = "{http://www.w3.org/2000/svg}"


def test_bar_chart_draws_each_value_with_its_whisker_and_escapes_labels():
    svg = bar_chart(
        "<script>alert(1)</script>",
        ["a&b", "c"],
        [
            {"name": "base", "values": [0.5, None], "ci": [[0.4, 0.6], None]},
            {"name": "tuned <i>", "values": [1.0, 0.25]},
        ],
        "chart-metrics",
        ymax=1.0,
    )
    root = ET.fromstring(str(svg))  # well-formed XML: every label was escaped
    assert root.get("class") == "chart chart-metrics" and "<script>" not in svg
    bars = root.findall(f"{SVG}rect[@class='bar']")
    assert len(bars) == 3  # a None value draws no bar
    heights = [float(b.get("height")) for b in bars]
    assert heights == [105.0, 210.0, 52.5]  # plot height 210 px for ymax 1.0
    assert [b.find(f"{SVG}title").text for b in bars] == [
        "base a&b: 0.500",
        "tuned <i> a&b: 1.000",
        "tuned <i> c: 0.250",
    ]
    (ci,) = root.findall(f"{SVG}g[@class='ci']")
    ys = sorted(float(v) for line in ci for v in (line.get("y1"), line.get("y2")))
    assert ys[0] == 240 - 0.6 * 210 and ys[-1] == 240 - 0.4 * 210


def test_loss_curve_points_span_the_plot():
    svg = str(loss_curve([{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.0, "val_loss": 1.5}]))
    train = re.search(r'class="train-loss"[^>]*points="([^"]+)"', svg).group(1)
    assert train == "40.0,20.0 520.0,180.0" and 'class="val-loss"' in svg and "validation" in svg
    assert loss_curve([]) == "" and 'width="160"' in loss_curve([{"step": 1, "loss": 1.0}], small=True)


def test_timeline_and_graph_link_and_escape():
    runs = [
        {
            "id": "train-1<x>",
            "kind": "train",
            "status": "failed",
            "started": "2026-12-01T10:00:00+00:00",
            "ended": "2026-12-01T10:00:30+00:00",
        },
        {
            "id": "evaluate-2",
            "kind": "evaluate",
            "status": "succeeded",
            "started": "2026-12-01T10:00:30+00:00",
            "ended": "2026-12-01T10:01:00+00:00",
        },
    ]
    root = ET.fromstring(str(timeline(runs)))
    bars = root.findall(f".//{SVG}rect")
    assert [b.get("class") for b in bars] == ["run-bar failed", "run-bar succeeded"]
    assert [float(b.get("width")) for b in bars] == [380.0, 380.0]
    nodes = [
        {
            "id": "sha256:ab",
            "kind": "dataset",
            "l1": "dataset",
            "l2": "d@1 <b>",
            "x": 12,
            "y": 12,
            "w": 180,
            "h": 42,
            "root": True,
            "href": "/artifacts/sha256:ab",
        },
        {
            "id": "run-1",
            "kind": "run",
            "l1": "train run",
            "l2": "run-1",
            "x": 238,
            "y": 12,
            "w": 180,
            "h": 42,
            "root": False,
            "href": None,
        },
    ]
    g = ET.fromstring(str(graph(nodes, [{"x1": 192, "y1": 33, "x2": 238, "y2": 33}], 430, 66)))
    assert [n.get("class") for n in g.iter(f"{SVG}g")] == ["node root", "node"]
    assert [a.get("href") for a in g.iter(f"{SVG}a")] == ["/artifacts/sha256:ab"]
    assert g.find(f"{SVG}path[@class='edge']").get("d") == "M 192 33 C 215.0 33, 215.0 33, 238 33"
