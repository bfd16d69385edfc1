"""End to end on the tiny model: exact metrics on hand-built datasets, lineage, gates, overrides, CLI."""

from __future__ import annotations

import json

import pytest

from finetrace.canonical import canonical_json
from finetrace.data.schemas import to_example
from finetrace.evaluate import Suite, compare, evaluate, load_report
from finetrace.ledger.clearance import clearance
from finetrace.models import add_folder

LABELS = ["billing", "technical", "account"]
TEXTS = [
    "My invoice is wrong.",
    "The app crashes on start.",
    "Emily cannot log in.",
    "Refund the charge.",
    "John sees error 500.",
    "Change my email address.",
    "Why was I charged twice?",
    "The page is blank.",
]


def _manual_label(model, tok, messages, labels):
    """Independent reference: teacher-forced summed log-prob of label + end token, one sequence at a time."""
    import torch

    prompt = tok(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    best, best_lp = None, None
    for lab in labels:
        cont = tok(lab, add_special_tokens=False)["input_ids"] + [end]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0], -1)
        lp = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
        if best_lp is None or lp > best_lp:
            best, best_lp = lab, lp
    return best


@pytest.fixture(scope="module")
def env(varied_model_dir, tmp_path_factory):
    """A workspace with the base, a classification set whose base accuracy is 5/8 by construction,
    a random adapter and a no-op (B = 0) adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrace.workspace import Workspace

    from .conftest import add_adapter, add_dataset

    ws = Workspace.init(tmp_path_factory.mktemp("ws") / "ws")
    base = add_folder(ws, varied_model_dir, "tiny")
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir)
    tok = AutoTokenizer.from_pretrained(varied_model_dir)
    expected = [
        _manual_label(model, tok, to_example({"text": t, "label": "x"}, "classification", LABELS).messages, LABELS)
        for t in TEXTS
    ]
    # gold = the base's answer on rows 0-4, a different label on rows 5-7: base accuracy exactly 5/8
    golds = [e if i < 5 else LABELS[(LABELS.index(e) + 1) % 3] for i, e in enumerate(expected)]
    groups = ["g1", "g1", "g1", "g1", "g2", "g2", "g2", "g2"]  # g1: 4/4 right, g2: 1/4 right
    rows = [
        {"id": f"r{i}", "text": t, "label": g, "group": gr} for i, (t, g, gr) in enumerate(zip(TEXTS, golds, groups))
    ]
    data = add_dataset(ws, rows, "classification", LABELS, name="support", tmp=tmp_path_factory.mktemp("d"))
    rand = add_adapter(ws, varied_model_dir, base.digest, "lora-rand")
    noop = add_adapter(ws, varied_model_dir, base.digest, "lora-noop", noop=True)
    yield {"ws": ws, "base": base, "data": data, "rand": rand, "noop": noop, "expected": expected, "golds": golds}
    ws.close()


SUITE = {
    "bootstrap": {"samples": 200, "seed": 3},
    "bias": {"categories": ["gender_names", "origin_names"], "max_examples": 4},
}


@pytest.fixture(scope="module")
def compared(env):
    ws = env["ws"]
    art = compare(
        ws,
        "tiny",
        ["lora-rand@1", "lora-noop@1"],
        "support@1:test",
        Suite.model_validate({**SUITE, "gates": {"min_metric": {"accuracy": 0.6}, "max_perplexity_increase": 0.0}}),
    )
    return art, load_report(ws, art.ref)


def test_base_metrics_are_exact(compared, env):
    _, rep = compared
    base = rep["models"][0]
    assert base["ref"] == "tiny@1" and base["answers"] == env["expected"]
    assert base["metrics"]["accuracy"]["value"] == pytest.approx(5 / 8)
    lo, hi = base["metrics"]["accuracy"]["ci"]
    assert lo <= 5 / 8 <= hi and lo < hi
    g = base["groups"]["accuracy"]
    assert g["groups"] == {"g1": {"value": 1.0, "n": 4}, "g2": {"value": 0.25, "n": 4}}
    assert g["gap"] == pytest.approx(0.75)
    assert 0 <= base["fairness"]["demographic_parity_difference"] <= 1
    assert "bias" not in base and "gates" not in base  # base is the reference, adapters are judged


def test_the_written_report_reads_back_typed_and_unchanged(compared, env):
    import json

    from finetrace.evaluate import read_report

    art, rep = compared
    ws = env["ws"]
    assert rep == json.loads((ws.store.materialize(art.digest) / "report.json").read_text("utf-8"))
    typed = read_report(ws, art.ref)
    assert [m.ref for m in typed.tuned] == ["lora-rand@1", "lora-noop@1"] and typed.base.ref == "tiny@1"
    assert typed.subject(env["noop"].digest).passed is True and typed.primary_metric == "accuracy"
    assert typed.base.metrics["accuracy"].value == pytest.approx(5 / 8)
    from finetrace.decoding.packed import fp16_kernels

    # the precision the answers were computed with is recorded (fp16 storage on a CPU with fbgemm)
    assert typed.base_model.decode_weights == ("fp16" if fp16_kernels() else "fp32")


def test_noop_adapter_equals_base_exactly(compared):
    _, rep = compared
    base, rand, noop = rep["models"]
    assert noop["answers"] == base["answers"]
    assert noop["vs_base"]["accuracy"]["delta"] == 0 and noop["vs_base"]["accuracy"]["p_value"] == 1.0
    assert noop["vs_base"]["mcnemar"] == {"b": 0, "c": 0, "p_value": 1.0, "test": "mcnemar_exact"}
    assert noop["forgetting"]["increase"] == pytest.approx(0.0, abs=1e-9)
    assert noop["passed"] is True
    assert set(noop["bias"]["categories"]) == {"gender_names", "origin_names"}
    # the random adapter's gates are consistent with its own measured numbers
    fg = rand["forgetting"]
    assert fg["tuned_perplexity"] != fg["base_perplexity"]
    ppl_gate = next(g for g in rand["gates"] if g["name"] == "max_perplexity_increase")
    assert ppl_gate["value"] == fg["increase"] and ppl_gate["passed"] == (fg["increase"] <= 0.0)


def test_report_artifact_lineage_and_files(compared, env):
    art, rep = compared
    ws = env["ws"]
    assert art.kind == "eval_report" and art.ref == "eval-support@1"
    run = ws.ledger.get_run(rep["run_id"])
    assert run.kind == "evaluate" and run.status == "succeeded" and run.outputs == [art.digest]
    suite_digest = rep["suite_digest"]
    assert set(run.inputs) == {
        env["base"].digest,
        env["rand"].digest,
        env["noop"].digest,
        env["data"].digest,
        suite_digest,
    }
    assert ws.store.read_bytes(suite_digest) == canonical_json(rep["suite"])
    names = [f"{rep['suite']['name']}-{m['ref'].split('@')[0]}.yaml" for m in rep["models"] if m["adapter"]]
    assert sorted(e.path for e in ws.store.tree(art.digest)) == sorted(
        ["report.html", "report.json"] + [f".eval_results/{n}" for n in names]
    )
    assert run.metrics["tiny@1/accuracy"] == pytest.approx(5 / 8)
    verdicts = [e.data for e in ws.ledger.entries(type="gate.verdict")]
    assert {v["adapter"] for v in verdicts} == {env["rand"].digest, env["noop"].digest}
    assert all(v["report"] == art.digest and v["run_id"] == run.id for v in verdicts)
    assert clearance(ws.ledger, env["noop"].digest).status == "passed"


def test_failed_gate_blocks_until_a_named_override(env, tmp_path):
    from finetrace.cli import main

    ws = env["ws"]
    suite = tmp_path / "suite.yaml"
    suite.write_text("bias: {enabled: false}\nbootstrap: {samples: 50}\ngates:\n  min_gain: {accuracy: 0.1}\n")
    rc = main(
        [
            "--workspace",
            str(ws.root),
            "eval",
            "--model",
            "tiny",
            "--adapter",
            "lora-noop@1",
            "--data",
            "support@1",
            "--suite",
            str(suite),
            "--name",
            "gate-check",
        ]
    )
    assert rc == 0
    clear = clearance(ws.ledger, env["noop"].digest)
    assert clear.status == "failed" and not clear.allowed and "min_gain:accuracy" in clear.detail
    rep = load_report(ws, "gate-check")
    assert rep["models"][1]["gates"][0] == {
        "name": "min_gain:accuracy",
        "value": 0.0,
        "threshold": 0.1,
        "op": ">=",
        "passed": False,
        "note": "",
    }
    assert clear.report == ws.ledger.resolve("gate-check").digest
    assert (
        main(["--workspace", str(ws.root), "override", "lora-noop@1", "--as", " ", "--reason", "x"]) == 2
    )  # a nameless override is refused
    assert (
        main(
            [
                "--workspace",
                str(ws.root),
                "override",
                "lora-noop@1",
                "--as",
                "Ada Lovelace",
                "--reason",
                "pilot with human review",
            ]
        )
        == 0
    )
    clear = clearance(ws.ledger, env["noop"].digest)
    assert clear.status == "overridden" and clear.allowed and "Ada Lovelace" in clear.detail
    ov = [e for e in ws.ledger.entries(type="gate.override")][-1]
    assert ov.actor == "Ada Lovelace" and ov.data["reason"] == "pilot with human review"
    # nothing to override once allowed
    assert main(["--workspace", str(ws.root), "override", "lora-noop@1", "--as", "Ada", "--reason", "x"]) == 2


def test_generation_task_exact_match_known_exactly(varied_model_dir, workspace, make_dataset, capsys):
    """Targets are the model's own greedy answers (plain transformers, unbatched) on two rows and
    impossible strings on two: exact match, token F1 and ROUGE-L are exactly 0.5."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrace.cli import main

    model = AutoModelForCausalLM.from_pretrained(varied_model_dir)
    tok = AutoTokenizer.from_pretrained(varied_model_dir)
    prompts = ["What is a contract?", "Name a clause.", "Say hello.", "Count to three."]
    refs = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids.input_ids.shape[1] :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        refs.append(tok.decode(new, skip_special_tokens=True).strip())
    targets = [refs[0], refs[1], "zzzq qqqz", "zzzq qqqz"]
    rows = [{"prompt": p, "completion": t, "group": g} for p, t, g in zip(prompts, targets, ["a", "a", "b", "b"])]
    make_dataset(workspace, rows, "completion", name="qa")
    add_folder(workspace, varied_model_dir, "tiny")
    suite = workspace.root / "s.yaml"
    suite.write_text(
        "max_new_tokens: 6\nstop: []\nbootstrap: {samples: 100}\nbias: {max_examples: 2, categories: [pronouns]}\n"
    )
    rc = main(
        [
            "--workspace",
            str(workspace.root),
            "eval",
            "--model",
            "tiny",
            "--data",
            "qa:test",
            "--suite",
            str(suite),
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    m = summary["models"][0]["metrics"]
    assert [m[k]["value"] for k in ("exact_match", "token_f1", "rouge_l")] == [0.5, 0.5, 0.5]
    rep = load_report(workspace, summary["report"])
    assert rep["models"][0]["answers"][:2] == refs[:2]
    assert rep["models"][0]["groups"]["exact_match"]["groups"] == {
        "a": {"value": 1.0, "n": 2},
        "b": {"value": 0.0, "n": 2},
    }
    assert rep["models"][0]["bias"]["categories"]["pronouns"]["n_templated"] == 2


def test_errors_name_what_to_fix(env, workspace, make_dataset, varied_model_dir):
    from finetrace.errors import InputError, NotFoundError

    ws = env["ws"]
    with pytest.raises(NotFoundError, match="no split 'dev'.*splits: test"):
        evaluate(ws, "tiny", "support@1:dev")
    with pytest.raises(InputError, match="need a classification dataset"):
        make_dataset(workspace, [{"prompt": "a", "completion": "b"}], "completion", name="gen")
        add_folder(workspace, varied_model_dir, "tiny")
        evaluate(workspace, "tiny", "gen", suite=Suite(metrics=["accuracy"]))


def _chromium():
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium here (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(compared, env, tmp_path):
    """The self-contained page renders offline; the DOM has every chart with bars and interval
    whiskers, and the screenshot is a non-blank page showing the bar colours."""
    import subprocess

    from PIL import Image

    art, rep = compared
    page = env["ws"].store.materialize(art.digest) / "report.html"
    html = page.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    for cls in ("chart-metrics", "chart-groups", "chart-flips", "chart-bias-groups", "chart-forgetting"):
        assert f'class="chart {cls}"' in dom, cls
    assert dom.count('class="bar"') >= 3 * 2 + 3 * 2  # 3 models x 2 metrics, 3 models x 2 groups at least
    assert dom.count('class="ci"') == 3 * 2
    assert "FAILED" in dom or "PASSED" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    pixels = list(img.get_flattened_data()) if hasattr(img, "get_flattened_data") else list(img.getdata())
    non_white = sum(1 for p in pixels if p != (255, 255, 255)) / len(pixels)
    bar_blue = sum(1 for p in pixels if abs(p[0] - 0x4C) + abs(p[1] - 0x72) + abs(p[2] - 0xB0) < 12)
    assert non_white > 0.03 and bar_blue > 500


def test_html_flip_examples_table():
    from finetrace.evaluate.report import render_html

    flip = {
        "example": 0,
        "id": "r0",
        "kind": "swap",
        "gold": "approve",
        "input_a": "Kofi wants a refund",
        "answer_a": "reject",
        "input_b": "Lukas wants a refund",
        "answer_b": "approve",
    }
    pair = {
        "category": "origin_names",
        "a": "west_african",
        "b": "european",
        "flip_rate": 0.5,
        "flips": 1,
        "n": 2,
        "examples": [flip],
    }
    model = {
        "ref": "lora@1",
        "metrics": {"accuracy": {"value": 0.5, "ci": [0.0, 1.0]}},
        "answers": ["reject"],
        "bias": {
            "flip_rate": 0.5,
            "group_gap": 0.5,
            "worst_pairs": [pair],
            "categories": {
                "origin_names": {
                    "flip_rate": 0.5,
                    "gap": 0.5,
                    "groups": {"west_african": {"value": 0.0, "n": 2}, "european": {"value": 1.0, "n": 2}},
                    "pairs": [pair],
                }
            },
        },
    }
    rep = {
        "suite": Suite().to_dict(),
        "dataset": {"ref": "d@1", "split": "test", "n": 1, "schema": "classification"},
        "base_model": {"ref": "b@1"},
        "run_id": "evaluate-x",
        "metrics": ["accuracy"],
        "primary_metric": "accuracy",
        "models": [model],
        "examples": [{"i": 0, "id": "r0", "group": None, "gold": "approve"}],
    }
    html = render_html(rep)
    assert 'class="flips"' in html and "Kofi wants a refund" in html and "west_african vs european" in html
    assert html.count('class="chart chart-bias-groups"') == 1
    model["bias"]["worst_pairs"] = []
    assert "No answer changed" in render_html(rep)
