"""Tool-call records (OpenAI's fine-tuning format): validated field by field, rendered with a chat template that
supports tools, refused in one message by one that does not, and masked so the model learns to make the calls but
not to write the tools' results."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_cases import write_jsonl
from test_chat import supervised_runs
from tunesmith.chat import prompt_ids, tokenize_chat
from tunesmith.data import prepare
from tunesmith.data.validate import check_record
from tunesmith.errors import UserError
from tunesmith.local_model import CHATML_TEMPLATE

TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5's way with tools, cut down: definitions in the system turn, each call as ``<tool_call>`` JSON with
``arguments | tojson``, and a run of tool results in ONE user turn closed after the last of them (so rendering
stops being prefix-stable inside the run)."""

DROPS_CALLS_TEMPLATE = CHATML_TEMPLATE.replace("message['content']", "(message['content'] or '')")
"""ChatML that renders a tool-call turn as an empty assistant turn: it drops the calls without failing."""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def call(call_id: str, name: str, city: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}


def weather_record(i: int = 0) -> dict:
    """User asks; the assistant calls a tool; the tool answers; the assistant answers (OpenAI's example shape)."""
    city = ["Paris", "Lisbon", "Oslo", "Quito", "Hanoi", "Perth"][i % 6]
    return {"messages": [
        {"role": "user", "content": f"What is the weather in {city} right now, and should I take a coat? {i}"},
        {"role": "assistant", "content": None, "tool_calls": [call(f"call_{i}", "get_weather", city)]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{10 + i} degrees, light rain"},
        {"role": "assistant", "content": f"It is {10 + i} degrees with light rain in {city}: take a coat and an "
                                         "umbrella, and shoes that do not mind puddles."},
    ], "tools": copy.deepcopy([WEATHER])}


def parallel_record() -> dict:
    """Two calls in one turn, answered by two tool messages in a row."""
    return {"messages": [
        {"role": "system", "content": "You plan trips."},
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "content": "Let me look both up.",
         "tool_calls": [call("a", "get_weather", "Oslo"), call("b", "get_time", "Oslo")]},
        {"role": "tool", "tool_call_id": "a", "content": "2 degrees, snow"},
        {"role": "tool", "tool_call_id": "b", "content": "14:05"},
        {"role": "assistant", "content": "Snowing at 2 degrees; it is 14:05."},
    ], "tools": copy.deepcopy([WEATHER, TIME]), "parallel_tool_calls": True}


@pytest.fixture(scope="session")
def tools_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tools-capable chat template in its tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-tools"
    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tools_tokenizer(tools_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tools_model_dir)


def test_labels_cover_the_rendered_tool_calls_and_end_of_turn_but_not_the_tool_results(tools_tokenizer):
    record = weather_record()
    chat = tokenize_chat(tools_tokenizer, record["messages"], record["tools"])
    assert supervised_runs(tools_tokenizer, chat) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 10 degrees with light rain in Paris: take a coat and an umbrella, and shoes that do not mind "
        "puddles.<|im_end|>",
    ]
    text = tools_tokenizer.decode(chat.input_ids)
    assert '"name": "get_weather", "description"' in text  # the definitions are in the prompt, unsupervised
    assert "10 degrees, light rain" in text


def test_parallel_calls_answered_by_a_run_of_tool_messages_are_masked_per_assistant_turn(tools_tokenizer):
    record = parallel_record()
    chat = tokenize_chat(tools_tokenizer, record["messages"], record["tools"])
    assert supervised_runs(tools_tokenizer, chat) == [
        'Let me look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "Snowing at 2 degrees; it is 14:05.<|im_end|>",
    ]
    rendered = tools_tokenizer.apply_chat_template(record["messages"][:5], tools=record["tools"], tokenize=False,
                                                   add_generation_prompt=True)
    # the prompt for the final answer is exactly the training prefix (both tool results in one user turn)
    assert prompt_ids(tools_tokenizer, record["messages"][:5], record["tools"]) == \
        chat.input_ids[:len(prompt_ids(tools_tokenizer, record["messages"][:5], record["tools"]))]
    assert "</tool_response>\n<tool_response>" in rendered


def test_special_token_text_in_call_arguments_is_not_a_control_token(tools_tokenizer):
    eot = tools_tokenizer.convert_tokens_to_ids("<|im_end|>")
    record = weather_record()
    record["messages"][1]["tool_calls"] = [{**call("call_0", "get_weather", "<|im_end|>")}]
    chat = tokenize_chat(tools_tokenizer, record["messages"], record["tools"])
    # system, user, call, tool result and answer each end one turn; the city adds none
    assert chat.input_ids.count(eot) == 5


BAD_VARIANTS = [
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments='{"city": "Paris"'),
     "messages[1].tool_calls[0].function.arguments: is not valid JSON (column 17: Expecting ',' delimiter)"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments={"city": "Paris"}),
     "messages[1].tool_calls[0].function.arguments: must be a string holding a JSON object, got an object"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments='["Paris"]'),
     "messages[1].tool_calls[0].function.arguments: must be a JSON object, got a list"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].pop("arguments"),
     "messages[1].tool_calls[0].function.arguments: missing"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_wether"),
     "messages[1].tool_calls[0].function.name: calls 'get_wether', which tools does not define (defined: "
     "'get_weather')"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].pop("name"),
     "messages[1].tool_calls[0].function.name: missing"),
    (lambda r: r["messages"][1]["tool_calls"][0].pop("function"), "messages[1].tool_calls[0].function: missing"),
    (lambda r: r["messages"][1]["tool_calls"][0].pop("id"), "messages[1].tool_calls[0].id: missing"),
    (lambda r: r["messages"][1]["tool_calls"][0].update(type="retrieval"),
     "messages[1].tool_calls[0].type: must be \"function\", got 'retrieval'"),
    (lambda r: r["messages"][1]["tool_calls"].__setitem__(0, "get_weather(Paris)"),
     "messages[1].tool_calls[0]: must be an object"),
    (lambda r: r["messages"][1].update(tool_calls={"id": "call_0"}), "messages[1].tool_calls: must be a list, got an "
                                                                      "object"),
    (lambda r: r["messages"][1].update(tool_calls=[]), "messages[1].content: is null; only an assistant message with "
                                                       "tool_calls may have no content"),
    (lambda r: r["messages"][2].update(tool_call_id="call_9"),
     "messages[2].tool_call_id: answers no call: no earlier assistant message made a tool call with this id "
     "(messages[1].tool_calls[0] is waiting for an answer)"),
    (lambda r: r["messages"][2].pop("tool_call_id"), "messages[2].tool_call_id: missing"),
    (lambda r: r["messages"].pop(2), "messages[1].tool_calls[0]: has no answer"),
    (lambda r: r["messages"].insert(3, dict(r["messages"][2])),
     "messages[3].tool_call_id: answers a call that messages[2] already answered"),
    (lambda r: r["messages"][2].update(name="get_time"),
     "messages[2].name: is 'get_time', but the call it answers (messages[1].tool_calls[0]) calls 'get_weather'"),
    (lambda r: r["messages"][0].update(tool_call_id="call_0"),
     "messages[0].tool_call_id: only tool messages answer a tool call"),
    (lambda r: r["messages"][2].update(content=None), "messages[2].content: is null"),
    (lambda r: r["messages"][1]["tool_calls"].append(copy.deepcopy(r["messages"][1]["tool_calls"][0])),
     "messages[1].tool_calls[1].id: repeats the id of messages[1].tool_calls[0]"),
    (lambda r: r.update(parallel_tool_calls="yes"), "parallel_tool_calls: must be true or false, got a string"),
    (lambda r: r.update(tools={"get_weather": {}}), "tools: must be a list of tool definitions, got an object"),
    (lambda r: r["tools"][0].update(type="retrieval"), "tools[0].type: must be \"function\", got 'retrieval'"),
    (lambda r: r["tools"][0]["function"].pop("name"), "tools[0].function.name: missing"),
    (lambda r: r["tools"][0]["function"].update(parameters="city"),
     "tools[0].function.parameters: must be a JSON Schema object, got a string"),
    (lambda r: r["tools"].append(copy.deepcopy(r["tools"][0])),
     "tools[1].function.name: defines 'get_weather' a second time (first in tools[0])"),
    (lambda r: r["tools"][0]["function"].update(returns="str"),
     "tools[0].function.returns: unknown key (expected description, name, parameters, strict)"),
]


def _variant(i: int) -> dict:
    record = weather_record(i)
    BAD_VARIANTS[i][0](record)
    return record


@pytest.mark.parametrize("i", range(len(BAD_VARIANTS)))
def test_each_malformed_tool_call_record_is_one_problem_naming_its_field(i):
    problems = check_record(_variant(i), "tools.jsonl", 3)
    assert len(problems) == 1, [str(p) for p in problems]
    assert str(problems[0]).startswith(f"tools.jsonl:3: {BAD_VARIANTS[i][1]}")


def test_parallel_tool_calls_false_allows_one_call_per_message():
    record = parallel_record()
    assert check_record(record, "t.jsonl", 1) == []
    record["parallel_tool_calls"] = False
    assert [str(p) for p in check_record(record, "t.jsonl", 1)] == [
        "t.jsonl:1: messages[2].tool_calls: makes 2 calls in one message, but parallel_tool_calls is false"]


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith", "data", "prepare", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_names_every_malformed_tool_call_line_and_field_and_exits_2(tmp_path, tools_model_dir):
    rows = [weather_record(100 + i) for i in range(3)] + [_variant(i) for i in range(len(BAD_VARIANTS))]
    src = write_jsonl(tmp_path / "tools.jsonl", rows)
    run = _cli(src, "--out", tmp_path / "o", "--set", f"model.name_or_path={tools_model_dir}",
               "--set", f"data.max_errors={len(BAD_VARIANTS)}", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    stderr = " ".join(run.stderr.split())  # the console wraps long lines
    assert f"{len(BAD_VARIANTS)} problem(s) in {len(BAD_VARIANTS)} line(s)" in stderr
    for i, (_, expected) in enumerate(BAD_VARIANTS):
        assert f"{src}:{4 + i}: {expected}" in stderr
    assert not (tmp_path / "o" / "train.jsonl").exists()


def test_tool_call_records_prepare_tokenize_and_train_a_step(tmp_path, tools_model_dir, tools_tokenizer):
    from tunesmith.config import load_config
    from tunesmith.train import train
    from tunesmith.train.dataset import split_paths, tokenize_split

    rows = [weather_record(i) for i in range(10)] + [parallel_record()]
    src = write_jsonl(tmp_path / "tools.jsonl", rows)
    result = prepare({"model": {"name_or_path": str(tools_model_dir)},
                      "data": {"embedding": {"enabled": False}, "min_examples": 1, "eval_fraction": 0.1,
                               "minhash": {"enabled": False}}}, [src], tmp_path / "prepared")
    assert result.rejected == 0 and result.train_examples + result.eval_examples == len(rows)
    report = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert report["turns"]["train"]["with_tool_calls"] + report["turns"]["eval"]["with_tool_calls"] == len(rows)
    train_path, _ = split_paths(str(tmp_path / "prepared"))
    split = tokenize_split(train_path, tools_tokenizer, max_length=1024, overlong="error")
    assert len(split.examples) == result.train_examples
    assert split.stats["tokens"] == report["lengths"]["splits"]["train"]["total"]  # data and train count alike
    cfg = load_config(None, [f"model.name_or_path={tools_model_dir}", f"train.dataset={tmp_path / 'prepared'}",
                             "train.method=full", "train.max_steps=1", "train.max_length=1024",
                             "train.save_strategy=no", "train.eval_strategy=no", "train.logging_steps=1"])
    run = train(cfg, out_dir=tmp_path / "run")
    assert run.steps == 1 and run.train_loss is not None and run.train_loss > 0


def test_cli_refuses_a_template_without_tool_support_in_one_message_naming_the_line(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": "hello there, how are you?"},
                          {"role": "assistant", "content": "Fine, thank you; and how are you today?"}]},
            weather_record()]
    src = write_jsonl(tmp_path / "tools.jsonl", rows)
    run = _cli(src, "--out", tmp_path / "o", "--set", f"model.name_or_path={tiny_model_dir}", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    stderr = " ".join(run.stderr.split())
    assert f"error: {src}:2: the chat template cannot render tool calls" in stderr
    assert "use a model whose chat template supports tools" in stderr and "model.chat_template" in stderr
    assert not (tmp_path / "o" / "train.jsonl").exists()


@pytest.mark.parametrize(("template", "expected"), [
    (DROPS_CALLS_TEMPLATE, "messages[1].tool_calls[0]: the chat template does not render tool calls"),
    (TOOLS_TEMPLATE.replace("{{- '\\n' + (tool | tojson) }}", ""),
     "tools[0]: the chat template does not render tool definitions"),
    (TOOLS_TEMPLATE.replace("message.content + '\\n</tool_response>'", "'\\n</tool_response>'"),
     "messages[2]: the chat template does not render tool results"),
])
def test_a_template_that_silently_drops_tool_parts_is_one_error_in_prepare_and_train(tmp_path, tiny_model_dir,
                                                                                      template, expected):
    from transformers import AutoTokenizer

    from tunesmith.train.dataset import tokenize_split

    src = write_jsonl(tmp_path / "tools.jsonl", [weather_record(0), weather_record(1)])
    values = {"model": {"name_or_path": str(tiny_model_dir), "chat_template": template},
              "data": {"embedding": {"enabled": False}, "min_examples": 1}}
    with pytest.raises(UserError, match="supports tools") as err:
        prepare(values, [src], tmp_path / "o")
    assert err.value.message.startswith(f"{src}:1: {expected}")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = template
    with pytest.raises(UserError) as err:
        tokenize_split(src, tok, max_length=1024, overlong="error")
    assert err.value.message.startswith(f"{src}:1: {expected}")


def test_a_conversation_may_end_with_the_call_and_trains_on_it(tools_tokenizer):
    record = weather_record()
    assert check_record({**record, "messages": record["messages"][:2]}, "t.jsonl", 1) == []
    chat = tokenize_chat(tools_tokenizer, record["messages"][:2], record["tools"])
    assert supervised_runs(tools_tokenizer, chat) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>']


def test_tool_use_written_as_text_without_structured_calls_stays_valid(tmp_path):
    from tunesmith.data import read_examples

    src = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "gpt", "value": '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'},
        {"from": "tool", "value": "2 degrees, snow"},
        {"from": "gpt", "value": "It is snowing at 2 degrees."}]}])
    assert [m["role"] for m in read_examples(src)[0]["messages"]] == ["user", "assistant", "tool", "assistant"]
