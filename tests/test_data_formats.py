"""Readers: every accepted format becomes the canonical chat record; every bad line is a Problem naming the
file and the 1-based line (never a traceback, never the line's text); file-level problems are UserErrors."""

import json
import tracemalloc

import pytest

from data_cases import chat, write_jsonl
from tunesmith.data.formats import read_file
from tunesmith.errors import UserError


def _only_problem(examples, line):
    [ex] = [e for e in examples if e.line == line]
    assert ex.record is None and len(ex.problems) == 1
    return str(ex.problems[0])


def test_openai_chat_lines_pass_through_with_weight_and_tool_calls(tmp_path):
    record = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "weight": 0,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "wx", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "weight": 1}],
        "tools": [{"type": "function", "function": {"name": "wx", "parameters": {"type": "object"}}}]}
    [ex] = read_file(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert ex.record == record and ex.format == "openai" and ex.problems == [] and ex.line == 1


def test_alpaca_sharegpt_and_prompt_completion_become_chat_messages(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "sys"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
        {"prompt": "2+2=", "completion": "4"},
    ]
    exs = read_file(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [e.format for e in exs] == ["alpaca", "alpaca", "sharegpt", "prompt_completion"]
    assert exs[0].record["messages"] == [{"role": "system", "content": "sys"},
                                         {"role": "user", "content": "Translate\n\nbonjour"},
                                         {"role": "assistant", "content": "hello"}]
    assert exs[1].record["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert exs[2].record["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]
    assert exs[3].record["messages"] == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]


def test_sharegpt_unknown_speaker_names_the_turn(tmp_path):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    exs = read_file(write_jsonl(tmp_path / "s.jsonl", [chat(0), row]))
    assert _only_problem(exs, 2) == f"{tmp_path / 's.jsonl'}:2: conversations[1].from: unknown speaker 'bot' " \
                                    "(expected one of human, user, gpt, assistant, system, tool)"


def test_bom_crlf_and_trailing_blank_line_are_accepted(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(chat(i)) for i in range(3)).encode() + b"\r\n\r\n")
    exs = read_file(path)
    assert [e.line for e in exs] == [1, 2, 3]
    assert all(e.problems == [] for e in exs)
    assert exs[2].record == chat(2)


def test_empty_or_blank_file_is_an_error_naming_the_file(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n   \n\t\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=rf"{name}: no examples \(the file is empty or only blank lines\)"):
            read_file(tmp_path / name)


def test_a_json_array_is_read_as_rows_from_a_json_file_and_refused_in_a_jsonl_file(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([chat(0), chat(1)], indent=2))
    assert [(ex.id, ex.record) for ex in read_file(path)] == [(f"{path}: row 1", chat(0)), (f"{path}: row 2", chat(1))]
    path = path.rename(tmp_path / "array.jsonl")
    with pytest.raises(UserError, match=r"array.jsonl:1: this is a JSON array; a .jsonl file holds one JSON object "
                                        "per line") as err:
        read_file(path)
    assert "rename it to array.json" in err.value.hint and "jq -c" in err.value.hint


def test_pretty_printed_json_is_refused_with_a_jsonl_hint(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(chat(0), indent=2) + "\n" + json.dumps(chat(1), indent=2))
    with pytest.raises(UserError, match=r"pretty.json:1: this is pretty-printed JSON spread over several lines"):
        read_file(path)


def test_invalid_json_reports_line_and_column(tmp_path):
    exs = read_file(write_jsonl(tmp_path / "a.jsonl", [chat(0), chat(1), '{"messages": [}']))
    assert _only_problem(exs, 3) == f"{tmp_path / 'a.jsonl'}:3: invalid JSON at column 15: Expecting value"


def test_invalid_utf8_and_nul_bytes_report_byte_position(tmp_path):
    good = json.dumps(chat(0)).encode() + b"\n"
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(good + b'{"messages": "\xff"}\n' + b'{"a": "\x00"}\n')
    exs = read_file(path)
    bad_at = len(good) + 14
    assert _only_problem(exs, 2) == f"{path}:2: invalid UTF-8 at byte {bad_at} of the file (column 15 of the line)"
    nul_at = len(good) + len(b'{"messages": "\xff"}\n') + 7
    assert _only_problem(exs, 3) == f"{path}:3: NUL byte at byte {nul_at} of the file (column 8 of the line)"


def test_line_that_is_not_an_object_is_a_problem(tmp_path):
    exs = read_file(write_jsonl(tmp_path / "a.jsonl", [chat(0), '"just text"', "[1, 2]", "42"]))
    assert [str(e.problems[0]).split(": ", 1)[1] for e in exs[1:]] == [
        "expected a JSON object, got a string", "expected a JSON object, got a list",
        "expected a JSON object, got a number"]


def test_unknown_format_names_the_expected_keys(tmp_path):
    exs = read_file(write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}]))
    msg = _only_problem(exs, 1)
    assert msg.startswith(f"{tmp_path / 'a.jsonl'}:1: messages: missing (keys found: `text`)")
    assert "`conversations` (ShareGPT)" in msg and "`prompt`/`completion`" in msg


def test_over_long_line_is_rejected_without_being_read_into_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(json.dumps(chat(0)).encode() + b"\n")
        fh.write(b'{"messages": "' + b"x" * (8 * 2**20) + b'"}\n')  # an 8 MiB line
        fh.write(json.dumps(chat(2)).encode() + b"\n")
    tracemalloc.start()
    exs = read_file(path, max_line_bytes=4096)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20  # the 8 MiB line never sat in memory whole (drained 256 KiB at a time)
    assert _only_problem(exs, 2) == (f"{path}:2: line is {8 * 2**20 + 17:,} bytes, over data.max_line_bytes (4,096); "
                                     "it was not read")
    assert exs[2].line == 3 and exs[2].record == chat(2)


def test_deeply_nested_json_and_huge_integers_are_problems_not_crashes(tmp_path):
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    shallow_but_over = '{"messages": [{"role": "user", "content": "x", "tool_calls": ' + "[" * 40 + "]" * 40 + "}]}"
    huge = '{"messages": [], "weight": ' + "9" * 5000 + "}"
    exs = read_file(write_jsonl(tmp_path / "h.jsonl", [deep, shallow_but_over, huge]), max_depth=32)
    assert _only_problem(exs, 1).endswith(":1: JSON nested too deeply (over data.max_depth=32)")
    assert _only_problem(exs, 2).endswith(":2: JSON nested too deeply (over data.max_depth=32)")
    assert "invalid JSON value: Exceeds the limit" in _only_problem(exs, 3)
