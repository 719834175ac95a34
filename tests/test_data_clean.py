"""Cleaning rules, one by one, on plain values: which positions go, which survive, and the reason."""

import json

import pytest

from data_cases import chat, words
from tunesmith.chat import tokenize_chat
from tunesmith.data import clean


def _texts(records):
    return [clean.normalize(clean.conversation_text(r)) for r in records]


def test_exact_duplicates_ignore_case_and_whitespace_and_keep_the_first():
    a = {"messages": [{"role": "user", "content": "Hello  World"}, {"role": "assistant", "content": "Hi there"}]}
    b = {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": " hi\tthere"}]}
    c = {"messages": [{"role": "user", "content": "hello world!"}, {"role": "assistant", "content": "hi there"}]}
    keys = [clean.exact_key(t) for t in _texts([a, b, c, a])]
    assert clean.exact_duplicates(keys) == {1: clean.Match(0), 3: clean.Match(0)}


def test_minhash_drops_near_copies_of_a_kept_example_and_keeps_distinct_ones():
    base = chat(1, answer_words=60)
    near = json.loads(json.dumps(base))
    near["messages"][1]["content"] = near["messages"][1]["content"].replace(
        near["messages"][1]["content"].split()[30], "changed")  # one word of 68 differs
    records = [base, chat(2, 60), near, chat(3, 60), near]
    sigs = clean.minhash_signatures(_texts(records), num_perm=128, shingle_size=3)
    dups = clean.minhash_duplicates(sigs, threshold=0.8, num_perm=128)
    assert sorted(dups) == [2, 4]
    assert {m.of for m in dups.values()} == {0}  # both point at the kept original, not at each other
    assert all(0.8 <= m.score <= 1.0 for m in dups.values())


def test_minhash_matches_find_train_examples_that_copy_a_reference():
    eval_records = [chat(100, 50), chat(101, 50)]
    train = [chat(1, 50), json.loads(json.dumps(eval_records[1])), chat(2, 50)]
    train[1]["messages"][0]["content"] += " please"
    sigs = clean.minhash_signatures(_texts(train), 128, 3)
    ref = clean.minhash_signatures(_texts(eval_records), 128, 3)
    assert list(clean.minhash_matches(sigs, ref, 0.8, 128)) == [1]


def test_minhash_leaves_queries_that_differ_in_a_number_or_a_quoted_name_alone():
    texts = [clean.normalize(t) for t in (
        "user: How many products have an id greater than 61593?\nassistant: SELECT COUNT(*) FROM products WHERE id > "
        "61593 AND status = 'active' ORDER BY id;",
        "user: How many products have an id greater than 61596?\nassistant: SELECT COUNT(*) FROM products WHERE id > "
        "61596 AND status = 'active' ORDER BY id;",
        "user: How many products have an id greater than 61593?\nassistant: SELECT COUNT(*) FROM products WHERE id > "
        "61593 AND status = 'retired' ORDER BY id;",
        "user: how many products have an ID greater than 61593?\nassistant: SELECT COUNT(*) FROM products WHERE id > "
        "61593 AND status = 'active' ORDER BY id ;")]
    sigs = clean.minhash_signatures(texts, 128, 3)
    groups = [clean.literal_key(t) for t in texts]
    assert len(clean.minhash_duplicates(sigs, 0.6, 128)) >= 2  # without the guard, siblings look like copies
    assert {i: m.of for i, m in clean.minhash_duplicates(sigs, 0.6, 128, groups).items()} == {3: 0}
    assert list(clean.minhash_matches(sigs[1:], sigs[:1], 0.6, 128, groups[1:], groups[:1])) == [2]


def test_a_paraphrase_shares_too_few_word_shingles_for_minhash():
    texts = ["user: How do I reset my password?\nassistant: Open Settings, choose Account, then click Reset password "
             "and follow the emailed link.",
             "user: How can I reset my password?\nassistant: Go to Settings, pick Account, then click Reset password "
             "and follow the link in the email."]
    sigs = clean.minhash_signatures([clean.normalize(t) for t in texts], 128, 3)
    assert clean.minhash_duplicates(sigs, 0.8, 128) == {}  # the embedding rule's job (tests/test_data_embedding.py)


def test_short_outputs_are_counted_with_the_model_tokenizer(tiny_tokenizer):
    answer = words(5, 6)
    n = len(tiny_tokenizer(answer, add_special_tokens=False)["input_ids"])
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}
    assert clean.short_outputs([record], tiny_tokenizer, min_tokens=n) == {}
    assert clean.short_outputs([record], tiny_tokenizer, min_tokens=n + 1) == {
        0: f"messages[1]: assistant output is {n} tokens, under {n + 1}"}


def test_short_output_rule_skips_turns_with_weight_zero(tiny_tokenizer):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": words(1, 40)}]}
    assert clean.short_outputs([record], tiny_tokenizer, min_tokens=20) == {}
    record["messages"][1]["weight"] = 1
    assert list(clean.short_outputs([record], tiny_tokenizer, min_tokens=20)) == [0]


def _answer(content, weight=None):
    msg = {"role": "assistant", "content": content, **({"weight": weight} if weight is not None else {})}
    return {"messages": [{"role": "user", "content": "give json"}, msg]}


def test_json_outputs_must_parse_and_match_the_schema(tmp_path):
    schema = tmp_path / "person.schema.json"
    schema.write_text(json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                                  "required": ["name", "age"],
                                  "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}))
    records = [_answer('{"name": "Ann", "age": 3}'), _answer('{"name": "Ann", "age": "three"}'),
               _answer("Sure! {\"name\": 1}"), _answer("not json", weight=0), _answer('{"name": "Bo"}')]
    assert clean.json_output_problems(records, None) == {
        2: "messages[1]: assistant output is not JSON (column 1: Expecting value)"}
    problems = clean.json_output_problems(records, clean.load_json_schema(str(schema)))
    assert sorted(problems) == [1, 2, 4]
    assert problems[1] == "messages[1]: assistant output does not match the schema at $.age: 'three' is not of " \
                          "type 'integer'"
    assert problems[4].endswith("does not match the schema at $: 'age' is a required property")


def test_a_broken_json_schema_file_is_a_user_error(tmp_path):
    from tunesmith.errors import UserError

    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 12}')
    with pytest.raises(UserError, match="is not a valid JSON Schema"):
        clean.load_json_schema(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        clean.load_json_schema(str(tmp_path / "missing.json"))


def test_truncation_removes_whole_turns_and_never_cuts_an_answer(tiny_tokenizer):
    first = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": words(1, 10)}]
    record = {"messages": [*first, {"role": "user", "content": "q2"}, {"role": "assistant", "content": words(2, 200)}]}
    one_turn = clean.token_lengths([{"messages": first}], tiny_tokenizer)[0]
    assert clean.truncate_to_fit(record, tiny_tokenizer, max_length=one_turn) == {"messages": first}
    assert clean.truncate_to_fit(record, tiny_tokenizer, max_length=one_turn - 1) is None


def test_special_token_text_in_content_is_found_and_reported(tiny_tokenizer):
    records = [chat(1), {"messages": [{"role": "user", "content": "say <|im_end|> now"},
                                      {"role": "assistant", "content": "ok <|im_start|>"}]}]
    assert clean.special_token_hits(records, tiny_tokenizer) == {1: ["<|im_end|>", "<|im_start|>"]}


def test_token_lengths_equal_the_training_tokenisation(tiny_tokenizer):
    records = [chat(1), {"messages": [{"role": "system", "content": "rules <|im_end|> here"},
                                      {"role": "user", "content": "q <|im_start|>"},
                                      {"role": "assistant", "content": "a"},
                                      {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}]}]
    expected = [len(tokenize_chat(tiny_tokenizer, r["messages"]).input_ids) for r in records]
    assert clean.token_lengths(records, tiny_tokenizer) == expected
