"""tools / tool_calls through the official client: tools rendered by the model's own chat template (a
Hermes-style one), forced calls constrained to valid arguments, ``tool`` messages accepted, a template that
ignores tools answered with a 400; and the parser of the Hermes and bare-JSON call formats."""

from __future__ import annotations

import json

import openai
import pytest

from finetrace.serve.engine import Engine
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings
from finetrace.serve.structured import parse_tool_calls

from .serve_support import validate_json

HERMES = (
    "{%- if tools %}{{ '<|im_start|>system\\nYou may call these functions:\\n<tools>' }}"
    "{%- for t in tools %}{{ t | tojson }}{% endfor %}"
    '{{ \'</tools>\\nAnswer <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\\n\' }}{%- endif %}'
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}{{ '<|im_start|>assistant\\n' }}"
    "{%- for c in m.tool_calls %}{{ '<tool_call>\\n' }}{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "{{ '\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "unit"],
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["zone"],
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hermes(tmp_path_factory, served_ws):
    """A server with the ChatML `tiny` (its template ignores tools) and `hermes` (its template renders them)."""
    from finetrace.models import add_folder
    from finetrace.models.tiny import build_tiny_model, build_tokenizer
    from finetrace.workspace import Workspace

    tmp = tmp_path_factory.mktemp("hermes")
    model_dir = build_tiny_model(tmp / "model", tokenizer=build_tokenizer(template=HERMES))
    cfg = json.loads((model_dir / "config.json").read_text())  # tool specs take ~450 tiny-BPE tokens
    (model_dir / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    ws = Workspace.init(tmp / "ws")
    add_folder(ws, model_dir, "hermes")
    settings = ServeSettings(max_batch=8)
    with (
        BackgroundServer(Engine(ws, "hermes", [], settings), settings) as srv,
        BackgroundServer(Engine(served_ws, "tiny", [], settings), settings) as chatml,
    ):
        yield (
            openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0),
            openai.OpenAI(base_url=chatml.base_url, api_key="x", max_retries=0),
            srv.engine,
        )
    ws.close()


def test_tools_are_rendered_by_the_chat_template(hermes):
    _, _, engine = hermes
    with_tools = engine.tokenizer.decode(engine.encode_chat(ASK, [WEATHER]))
    assert '"name": "get_weather"' in with_tools and "<tools>" in with_tools
    assert "<tools>" not in engine.tokenizer.decode(engine.encode_chat(ASK))


@pytest.mark.slow  # constrained decoding (llguidance), 8 answers of up to 80 tokens: ~5 s
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call_has_valid_arguments(hermes, choice):
    client, _, _ = hermes
    for seed in range(4):
        r = client.chat.completions.create(
            model="hermes",
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=80,
            temperature=1.0,
            seed=seed,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        validate_json(json.loads(call.function.arguments), spec["parameters"])
        assert call.id.startswith("call_") and call.type == "function"


def test_tool_result_messages_are_accepted(hermes):
    client, _, engine = hermes
    first = client.chat.completions.create(
        model="hermes", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    r = client.chat.completions.create(model="hermes", messages=history, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    from finetrace.serve.protocol import ChatRequest

    messages = ChatRequest(model="hermes", messages=history).plain_messages()
    prompt = engine.encode_chat(messages, [WEATHER])
    assert r.usage.prompt_tokens == len(prompt)  # what the model saw: the call and its result
    text = engine.tokenizer.decode(prompt)
    assert '<tool_response>\n{"temp": 21}' in text and call.function.arguments[:8] in text.replace(" ", "")


def test_a_template_without_tools_is_a_400(hermes):
    _, chatml, _ = hermes
    with pytest.raises(openai.BadRequestError, match="does not render tools") as e:
        chatml.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=4)
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        chatml.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[WEATHER],
            max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert e.value.body["param"] == "tool_choice"


def test_tool_call_parser_formats():
    tools = [WEATHER, TIME]
    content, calls = parse_tool_calls(
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>'
        '{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
        tools,
    )
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "UTC"}),
    ]
    content, calls = parse_tool_calls('{"name": "get_time", "parameters": {"zone": "CET"}}', tools)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "CET"}
    for text in [
        "It is sunny.",
        '<tool_call>{"name": "other", "arguments": {}}</tool_call>',
        "<tool_call>{not json}</tool_call>",
        '{"city": "Paris"}',
    ]:
        assert parse_tool_calls(text, tools) == (text, [])
