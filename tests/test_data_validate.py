"""Structural validation: each bad-record class of the reliability notes gives one problem naming the file, the
1-based line, the field (with the message index) and the reason."""

import pytest

from tunesmith.data.formats import Problem
from tunesmith.data.validate import check_record, raise_problems
from tunesmith.errors import UserError

U = {"role": "user", "content": "question"}
A = {"role": "assistant", "content": "answer"}


@pytest.mark.parametrize(("record", "expected"), [
    ({"messages": "hi"}, "messages: must be a list of messages, got a string"),
    ({"messages": []}, "messages: is empty; an example needs at least a user and an assistant message"),
    ({"messages": [U, "x"]}, "messages[1]: must be an object with role and content, got a string"),
    ({"messages": [U, {"content": "a"}]}, "messages[1].role: missing"),
    ({"messages": [U, {"role": "assistant"}]}, "messages[1].content: missing"),
    ({"messages": [U, {"role": "bot", "content": "a"}, A]}, "messages[1].role: unknown role 'bot' — did you mean "
                                                            "'assistant'?"),
    ({"messages": [U, {"role": "Assistant", "content": "a"}, A]}, "messages[1].role: unknown role 'Assistant' — did "
                                                                  "you mean 'assistant'?"),
    ({"messages": [{"role": "narrator", "content": "a"}, A]}, "messages[0].role: unknown role 'narrator' (expected "
                                                              "one of system, user, assistant, tool)"),
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "messages[1].content: is empty"),
    ({"messages": [U, {"role": "assistant", "content": ["a"]}]}, "messages[1].content: must be a string, got a list"),
    ({"messages": [U, {"role": "assistant", "content": None}]}, "messages[1].content: is null; only an assistant "
                                                                "message with tool_calls may have no content"),
    ({"messages": [U, {**A, "mood": "happy"}]}, "messages[1].mood: unknown key (expected content, name, role, "
                                                "tool_call_id, tool_calls, weight)"),
    ({"messages": [U, A], "meta": 1}, "meta: unknown key (expected messages, parallel_tool_calls, tools)"),
    ({"messages": [U, {"role": "system", "content": "s"}]}, "messages: no assistant message: nothing to learn from"),
    ({"messages": [U, {**A, "weight": 2}]}, "messages[1].weight: must be 0 or 1, got 2"),
    ({"messages": [U, {**A, "weight": 0.5}]}, "messages[1].weight: must be 0 or 1, got 0.5"),
    ({"messages": [U, {**A, "weight": True}]}, "messages[1].weight: must be 0 or 1, got True"),
    ({"messages": [U, {**A, "weight": "1"}]}, "messages[1].weight: must be 0 or 1, got a string"),
    ({"messages": [{**U, "weight": 1}, A]}, "messages[0].weight: only assistant messages have a weight"),
    ({"messages": [U, {**A, "weight": 0}, U, {**A, "weight": 0}]}, "messages: every assistant message has weight 0: "
                                                                   "nothing to learn from"),
    ({"messages": [{**U, "tool_calls": []}, A]}, "messages[0].tool_calls: only assistant messages make tool calls"),
    ({"messages": [U, A], "tools": {"a": 1}}, "tools: must be a list of tool definitions, got an object"),
])
def test_each_bad_record_gives_one_problem_with_line_field_and_reason(record, expected):
    problems = check_record(record, "data.jsonl", 7)
    assert [str(p) for p in problems] == [f"data.jsonl:7: {expected}"]


def test_tool_call_turn_without_content_and_weighted_turns_are_valid():
    record = {"messages": [
        U, {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                  "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "42"}, {**A, "weight": 1}, U, {**A, "weight": 0}]}
    assert check_record(record, "d.jsonl", 1) == []


def test_problem_list_is_capped_and_says_how_many_more():
    problems = [Problem("d.jsonl", line, "bad") for line in range(1, 8)]
    with pytest.raises(UserError) as err:
        raise_problems(problems, max_errors=3)
    text = err.value.message
    assert text.startswith("7 problem(s) in 7 line(s):")
    assert "d.jsonl:3: bad" in text and "d.jsonl:4: bad" not in text
    assert text.endswith("… and 4 more")
    assert "--skip-bad-lines" in err.value.hint
