"""One reader for users' data files: the same file is accepted or refused the same way, with the same line-numbered
message, by data prepare, train, advise and eval (they all read through tunesmith.data.formats)."""

from __future__ import annotations

import re

import pytest

from data_cases import config, words, write_jsonl
from tunesmith.advise.dataset_stats import count_dataset
from tunesmith.data import prepare, read_numbered
from tunesmith.errors import UserError
from tunesmith.evaluate.evalset import load_eval_set


def _question(i: int) -> str:
    return f"question {i}: {words(i, 8)}"


def _answer(i: int) -> str:
    return words(10_000 + i, 30)


FORMATS = {
    "openai": lambda i: {"messages": [{"role": "user", "content": _question(i)},
                                      {"role": "assistant", "content": _answer(i)}]},
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": _question(i)},
                                             {"from": "gpt", "value": _answer(i)}]},
    "alpaca": lambda i: {"instruction": _question(i), "input": "", "output": _answer(i)},
    "prompt_completion": lambda i: {"prompt": _question(i), "completion": _answer(i)},
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_file_in_each_accepted_format_is_read_alike_by_data_prepare_train_advise_and_eval(fmt, tmp_path,
                                                                                            tiny_model_dir):
    src = write_jsonl(tmp_path / f"{fmt}.jsonl", [FORMATS[fmt](i) for i in range(6)])
    prepared = prepare(config(tiny_model_dir, eval_fraction=0.0), [src], tmp_path / "out")
    assert prepared.train_examples == 6 and prepared.rejected == 0
    assert [line for line, _ in read_numbered(src)] == [1, 2, 3, 4, 5, 6]  # train's read_records
    assert count_dataset(src).examples == 6  # advise --data
    evals = load_eval_set(src)  # eval.dataset
    assert [e.line for e in evals] == [1, 2, 3, 4, 5, 6]
    assert [(e.input, e.expected) for e in evals] == [(_question(i), _answer(i)) for i in range(6)]


BROKEN = {
    "alpaca without output": ({"instruction": "q"}, r"bad\.jsonl:3: output: missing"),
    "sharegpt unknown speaker": ({"conversations": [{"from": "bot", "value": "x"}]},
                                 r"bad\.jsonl:3: conversations\[0\]\.from: unknown speaker 'bot'"),
    "openai unknown role": ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                            r"bad\.jsonl:3: messages\[0\]\.role: unknown role 'bot' — did you mean 'assistant'\?"),
    "not JSON": ('{"messages": [', r"bad\.jsonl:3: invalid JSON at column 15: Expecting value"),
    "not an object": ("[1, 2]", r"bad\.jsonl:3: expected a JSON object, got a list"),
    "no known keys": ({"text": "hello"}, r"bad\.jsonl:3: messages: missing \(keys found: `text`\)"),
}


def _refusal(read, path) -> str:
    with pytest.raises(UserError) as err:
        read(path)
    return err.value.message


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_line_is_refused_with_the_same_message_by_data_prepare_train_advise_and_eval(case, tmp_path,
                                                                                              tiny_model_dir):
    row, message = BROKEN[case]
    src = write_jsonl(tmp_path / "bad.jsonl", [FORMATS["alpaca"](0), FORMATS["openai"](1), row])
    readers = {"data prepare": lambda p: prepare(config(tiny_model_dir), [p], tmp_path / "out"),
               "train": read_numbered, "advise": count_dataset, "eval": load_eval_set}
    refusals = {name: _refusal(read, src) for name, read in readers.items()}
    for name, text in refusals.items():
        assert re.search(message, text), (name, text)
    # the problem lines, without the count above them, are the same text in all four
    problem_lines = {name: [ln for ln in text.splitlines() if "bad.jsonl:" in ln] for name, text in refusals.items()}
    assert len({tuple(lines) for lines in problem_lines.values()}) == 1, problem_lines


def test_the_advise_file_refused_before_one_reader_is_now_counted(tmp_path):
    # the case: `advise --data alpaca.jsonl` refused a file that `data prepare` accepts
    src = write_jsonl(tmp_path / "alpaca.jsonl", [FORMATS["alpaca"](i) for i in range(3)])
    stats = count_dataset(src)
    assert stats.examples == 3 and stats.supervised_tokens > 0


def test_eval_keeps_its_own_input_expected_shape_and_checks_its_fields(tmp_path):
    src = write_jsonl(tmp_path / "eval.jsonl", [{"input": "2+2", "expected": 4, "id": "a"},
                                                {"input": "x", "expected": "y", "note": "z"}])
    with pytest.raises(UserError, match=r"eval\.jsonl:2: note: unknown key \(expected expected, id, input, tools\)"):
        load_eval_set(src)
    write_jsonl(src, [{"input": "2+2", "expected": 4, "id": "a"}])
    [example] = load_eval_set(src)
    assert example.expected == "4" and example.messages == [{"role": "user", "content": "2+2"}]


def test_an_eval_chat_record_needs_its_last_message_to_be_the_answer_but_not_a_trained_turn(tmp_path):
    answer_weight_zero = {"messages": [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a", "weight": 0}]}
    src = write_jsonl(tmp_path / "eval.jsonl", [answer_weight_zero])
    [example] = load_eval_set(src)  # nothing to learn from is a training rule, not an eval one
    assert example.expected == "a"
    with pytest.raises(UserError, match="nothing to learn from"):
        read_numbered(src)
    write_jsonl(src, [{"messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(UserError, match=r"eval\.jsonl:1: messages\[0\]: the last message must be the assistant"):
        load_eval_set(src)
