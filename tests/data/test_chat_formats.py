"""OpenAI fine-tuning JSONL (tools, tool calls, weights), ShareGPT and Alpaca: detected by content,
mapped with the mapping recorded, trained on the tiny model; the multi-turn loss mask, token by token."""

from __future__ import annotations

import json
import shutil

import pytest

from finetrace.data import import_dataset, open_dataset, read_split
from finetrace.errors import InputError

from .dataset_files import write_jsonl

# a ChatML template that writes tools, tool calls and tool results (as Qwen-style templates do)
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def openai_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        city = ["Paris", "Oslo", "Rome", "Lima"][i % 4]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You answer weather questions."},
                    {"role": "user", "content": f"Weather in {city} on day {i}?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": f"c{i}",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"temp": 10 + i})},
                    {"role": "assistant", "content": f"It is {10 + i} C in {city}.", "weight": 1},
                    {"role": "user", "content": "Thanks"},
                    {"role": "assistant", "content": "Glad to help (not learned).", "weight": 0},
                ],
                "tools": [WEATHER_TOOL],
            }
        )
    return rows


def sharegpt_rows(n: int) -> list[dict]:
    return [
        {"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": f"{2 * i}."}]}
        for i in range(n)
    ]


def alpaca_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Double the number {i}.",
            "input": "" if i % 2 else f"Show working for {i}",
            "output": f"{2 * i}",
        }
        for i in range(n)
    ]


@pytest.fixture
def tools_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a chat template that renders tools (the plain tiny template does not)."""
    out = tmp_path / "tiny-tools"
    shutil.copytree(tiny_model_dir, out)
    (out / "chat_template.jinja").write_text(TOOLS_TEMPLATE, encoding="utf-8")
    return out


@pytest.mark.parametrize(
    "fmt,rows,schema",
    [
        ("openai", openai_rows(12), "chat"),
        ("sharegpt", sharegpt_rows(12), "chat"),
        ("alpaca", alpaca_rows(12), "completion"),
    ],
)
def test_format_is_detected_mapped_and_recorded(workspace, tmp_path, fmt, rows, schema):
    art = import_dataset(workspace, [write_jsonl(tmp_path / f"{fmt}.jsonl", rows)], fmt, splits=(1, 0, 0))
    _, info, _ = open_dataset(workspace, art.ref)
    assert (info["schema"], info["input_format"], art.metadata["input_format"]) == (schema, fmt, fmt)
    op = next(t for t in info["transforms"] if t["op"] == "format")
    assert op["format"] == fmt and op["detected"] is True and op["mapping"]["schema"] == schema
    got = read_split(workspace, art.ref, "train").to_pylist()
    assert len(got) == 12
    if fmt == "openai":
        r = next(g for g in got if "Paris on day 0" in g["messages"][1]["content"])
        assert [m["role"] for m in r["messages"]] == [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
            "user",
            "assistant",
        ]
        call = json.loads(r["messages"][2]["tool_calls"])
        assert call == [
            {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ]
        assert r["messages"][3]["tool_call_id"] == "c0" and r["messages"][6]["weight"] == 0
        assert json.loads(r["tools"]) == [WEATHER_TOOL]
    elif fmt == "sharegpt":
        assert {tuple(m["role"] for m in g["messages"]) for g in got} == {("user", "assistant")}
    else:
        assert {"prompt": "Double the number 0.\n\nShow working for 0", "completion": "0"} in [
            {k: g[k] for k in ("prompt", "completion")} for g in got
        ]


def test_native_files_say_native_and_a_named_format_must_fit(workspace, tmp_path):
    p = write_jsonl(tmp_path / "n.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    art = import_dataset(workspace, [p], "n", splits=(1, 0, 0))
    assert art.metadata["input_format"] == "native"
    _, info, _ = open_dataset(workspace, art.ref)
    assert "input_format" not in info and all(t["op"] != "format" for t in info["transforms"])
    with pytest.raises(InputError, match="maps to the chat schema, not completion"):
        import_dataset(workspace, [write_jsonl(tmp_path / "o.jsonl", openai_rows(3))], "o", schema="completion")


@pytest.mark.parametrize(
    "row,where",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments is not JSON",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
            "messages[1].weight must be 0 or 1, got 2",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
            "no assistant message to learn from",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "only assistant messages make tool calls",
        ),
    ],
)
def test_malformed_openai_row_names_line_and_field(workspace, tmp_path, row, where):
    rows = openai_rows(3)
    rows.insert(2, row)
    with pytest.raises(InputError) as e:
        import_dataset(workspace, [write_jsonl(tmp_path / "bad.jsonl", rows)], "bad")
    assert str(e.value).startswith(f"{tmp_path / 'bad.jsonl'}:3 field 'messages': ") and where in str(e.value)
    assert "--on-error skip" in e.value.hint


def test_malformed_sharegpt_and_alpaca_rows(workspace, tmp_path):
    rows = sharegpt_rows(3) + [{"conversations": [{"from": "robot", "value": "hi"}]}]
    with pytest.raises(InputError, match=r"bad\.jsonl:4 field 'conversations': conversations\[0\] has from 'robot'"):
        import_dataset(workspace, [write_jsonl(tmp_path / "bad.jsonl", rows)], "s")
    rows = alpaca_rows(3) + [{"instruction": "x", "output": 5}]
    with pytest.raises(InputError, match=r"al\.jsonl:4 field 'output': 'output' must be a string"):
        import_dataset(workspace, [write_jsonl(tmp_path / "al.jsonl", rows)], "a")


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_loss_mask_covers_exactly_the_trained_assistant_turns(workspace, tmp_path, tools_model_dir):
    from finetrace.data.schemas import conversation
    from finetrace.train.data import encode_rows

    art = import_dataset(workspace, [write_jsonl(tmp_path / "o.jsonl", openai_rows(2))], "o", splits=(1, 0, 0))
    row = read_split(workspace, art.ref, "train").to_pylist()[0]
    tok = _tokenizer(tools_model_dir)
    (enc,), _ = encode_rows(tok, [row], "chat", None, 4096, "auto")
    msgs, tools, _ = conversation(row)
    rendered = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert tok.decode(enc.ids) == rendered  # the ids are the template's own rendering
    # the loss positions form one run per trained turn; each run is that turn's text and <|im_end|>
    runs, cur = [], [enc.loss_at[0]]
    for t in enc.loss_at[1:]:
        if t == cur[-1] + 1:
            cur.append(t)
        else:
            runs.append(cur)
            cur = [t]
    runs.append(cur)
    city = "Paris" if "Paris" in msgs[1]["content"] else "Oslo"
    call = '<tool_call>{"arguments": {"city": "%s"}, "name": "get_weather"}</tool_call><|im_end|>' % city  # noqa: UP031
    temp = json.loads(msgs[3]["content"])["temp"]
    assert [tok.decode([enc.ids[t] for t in run]) for run in runs] == [call, f"It is {temp} C in {city}.<|im_end|>"]
    # every other token (system, user, tool result, the weight-0 turn, turn headers) carries no loss
    untrained = "".join(tok.decode([i]) for t, i in enumerate(enc.ids) if t not in set(enc.loss_at))
    assert "Glad to help" in untrained and "Thanks" in untrained and '{"temp"' in untrained
    (last,), _ = encode_rows(tok, [row], "chat", None, 4096, "last")
    assert tok.decode([last.ids[t] for t in last.loss_at]) == f"It is {temp} C in {city}.<|im_end|>"


def test_template_without_tools_is_a_clear_error(workspace, tmp_path, tiny_model_dir):
    from finetrace.train.data import encode_rows

    art = import_dataset(workspace, [write_jsonl(tmp_path / "o.jsonl", openai_rows(2))], "o", splits=(1, 0, 0))
    rows = read_split(workspace, art.ref, "train").to_pylist()
    with pytest.raises(InputError, match="does not render the tool list, tool calls"):
        encode_rows(_tokenizer(tiny_model_dir), rows, "chat", None, 4096, "auto")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "alpaca"])
def test_each_format_trains_on_the_tiny_model(workspace, tmp_path, tools_model_dir, fmt):
    from finetrace.models import add_folder
    from finetrace.train import TrainConfig, train

    add_folder(workspace, tools_model_dir, name="tiny-tools")
    rows = {"openai": openai_rows, "sharegpt": sharegpt_rows, "alpaca": alpaca_rows}[fmt](16)
    data = import_dataset(workspace, [write_jsonl(tmp_path / "d.jsonl", rows)], fmt, splits=(1, 0, 0))
    art = train(
        workspace,
        TrainConfig(
            base_model="tiny-tools",
            dataset=data.ref,
            output_name=f"{fmt}-lora",
            batch_size=4,
            max_steps=2,
            lr=5e-3,
            checkpoint_every=None,
            threads=1,
            compile=False,
        ),
    )
    hist = [json.loads(x) for x in (workspace.store.materialize(art.digest) / "metrics.jsonl").read_text().splitlines()]
    assert len([h for h in hist if "loss" in h]) >= 2 and all(h["loss"] > 0 for h in hist if "loss" in h)
    run = workspace.ledger.get_run(art.run_id)
    assert run.config["loss_turns"] == "auto"
