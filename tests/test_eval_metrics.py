"""Every eval metric on hand-made cases whose right verdict is known, and the bad inputs users hit."""

from __future__ import annotations

import json
import sqlite3
import sys
import time

import pytest

from tunesmith.errors import UserError
from tunesmith.evaluate.evalset import load_eval_set
from tunesmith.evaluate.metrics import build_scorer


def score(kind, prediction, expected, **options):
    return build_scorer(kind, options)(prediction, expected)


# --- exact / contains / regex -------------------------------------------------------------------------------------

def test_exact_match_ignores_case_whitespace_and_trailing_punctuation_by_default():
    assert score("exact", "  Paris.\n", "paris").correct
    assert score("exact", "New   York!", "new york").correct
    assert not score("exact", "Paris, France", "Paris").correct


def test_exact_match_normalisation_can_be_switched_off_option_by_option():
    assert not score("exact", "paris", "Paris", ignore_case=False).correct
    assert not score("exact", "Paris.", "Paris", strip_trailing_punctuation=False).correct
    assert not score("exact", "New  York", "New York", collapse_whitespace=False).correct
    assert score("exact", "Paris", "Paris", ignore_case=False, strip_trailing_punctuation=False).correct


def test_contains_finds_the_expected_text_inside_a_longer_answer():
    assert score("contains", "I believe the capital is PARIS, of course.", "Paris").correct
    assert not score("contains", "The capital is Lyon.", "Paris").correct
    assert not score("contains", "PARIS", "Paris", ignore_case=False).correct


def test_regex_extracts_the_group_from_the_prediction_and_the_expected_answer():
    pattern = r"answer is (-?\d+)"
    assert score("regex", "Let me think. The answer is 42.", "42", pattern=pattern, group=1).correct
    assert score("regex", "so the answer is 42", "The answer is 42", pattern=pattern, group=1).correct
    wrong = score("regex", "the answer is 41", "42", pattern=pattern, group=1)
    assert not wrong.correct
    missing = score("regex", "I do not know", "42", pattern=pattern, group=1)
    assert not missing.correct and "not found" in missing.reason


def test_regex_with_a_group_the_pattern_lacks_is_a_user_error():
    with pytest.raises(UserError, match="no group 2"):
        build_scorer("regex", {"pattern": r"answer is (\d+)", "group": 2})
    with pytest.raises(UserError, match="not a valid regular expression"):
        build_scorer("regex", {"pattern": r"answer is (\d+"})


# --- JSON ---------------------------------------------------------------------------------------------------------

def test_json_valid_accepts_json_in_a_code_fence_and_rejects_broken_json_with_a_reason():
    assert score("json_valid", '{"a": 1}', "").correct
    assert score("json_valid", '```json\n{"a": [1, 2]}\n```', "").correct
    broken = score("json_valid", '{"a": 1', "")
    assert not broken.correct and "invalid JSON" in broken.reason


def test_hostile_json_predictions_are_wrong_answers_not_crashes():
    assert not score("json_valid", "[" * 200_000, "").correct
    assert not score("json_fields", "[" * 200_000, '{"a": 1}').correct


@pytest.fixture
def person_schema(tmp_path):
    path = tmp_path / "person.schema.json"
    path.write_text(json.dumps({
        "type": "object", "required": ["name", "age"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "additionalProperties": False,
    }))
    return path


def test_json_schema_accepts_a_conforming_object_and_names_the_violation_otherwise(person_schema):
    assert score("json_schema", '{"age": 31, "name": "Alice"}', "", schema_path=str(person_schema)).correct
    missing = score("json_schema", '{"name": "Alice"}', "", schema_path=str(person_schema))
    assert not missing.correct and "'age' is a required property" in missing.reason
    wrong_type = score("json_schema", '{"name": "Alice", "age": "31"}', "", schema_path=str(person_schema))
    assert not wrong_type.correct and "at age" in wrong_type.reason
    extra = score("json_schema", '{"name": "Alice", "age": 3, "x": 1}', "", schema_path=str(person_schema))
    assert not extra.correct
    assert not score("json_schema", "not json", "", schema_path=str(person_schema)).correct


def test_a_missing_or_invalid_schema_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_scorer("json_schema", {"schema_path": str(tmp_path / "nope.json")})
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 12}')
    with pytest.raises(UserError, match="not a valid JSON Schema"):
        build_scorer("json_schema", {"schema_path": str(bad)})


def test_json_fields_treats_reordered_keys_as_equal():
    expected = '{"name": "Alice", "age": 31, "address": {"city": "Paris", "zip": "75001"}}'
    reordered = '{"address": {"zip": "75001", "city": "Paris"}, "age": 31, "name": "Alice"}'
    verdict = score("json_fields", reordered, expected)
    assert verdict.correct and verdict.score == 1.0


def test_json_fields_scores_the_fraction_of_fields_that_match():
    expected = '{"name": "Alice", "age": 31, "address": {"city": "Paris", "zip": "75001"}}'
    half = score("json_fields", '{"name": "Alice", "age": 30, "address": {"city": "Lyon", "zip": "75001"}}',
                 expected)
    assert half.score == pytest.approx(0.5) and not half.correct
    assert "age" in half.reason and "address.city" in half.reason
    only_name = score("json_fields", '{"name": "Alice", "age": 99}', expected, fields=["name"])
    assert only_name.correct
    assert not score("json_fields", '{"age": true}', '{"age": 1}').correct  # JSON true is not 1


# --- SQL ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def shop_db(tmp_path):
    path = tmp_path / "shop.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, amount REAL);
        INSERT INTO customers VALUES (1, 'Ann', 'Paris'), (2, 'Bob', 'Lyon'), (3, 'Cid', 'Paris'), (4, 'Dee', 'Rome');
        INSERT INTO orders VALUES (1, 1, 10.5), (2, 1, 20.0), (3, 2, 5.0), (4, 3, 7.25), (5, 3, 1.0), (6, 4, 99.0);
    """)
    conn.commit()
    conn.close()
    return path


def test_sql_textually_different_but_same_rows_is_right(shop_db):
    expected = "SELECT name FROM customers WHERE city = 'Paris'"
    predicted = "select c.name as who from customers as c where c.city in ('Paris') order by c.name desc;"
    assert score("sql_execution", predicted, expected, database=str(shop_db)).correct
    grouped = score("sql_execution",
                    "SELECT o.customer_id, TOTAL(o.amount) FROM orders o GROUP BY 1 HAVING TOTAL(o.amount) > 8",
                    "SELECT customer_id, SUM(amount) AS revenue FROM orders GROUP BY customer_id "
                    "HAVING revenue > 8", database=str(shop_db))
    assert grouped.correct, grouped.reason


@pytest.mark.parametrize("answer", [
    "```sql\nSELECT name FROM customers WHERE city = 'Paris';\n```",
    "Here is the query:\n```sql\nSELECT name FROM customers WHERE city = 'Paris';\n```\nIt lists Paris customers.",
    "Sure!\n\n```\nSELECT name\nFROM customers\nWHERE city = 'Paris'\n```",
    "The query:\n```sqlite\nSELECT name FROM customers WHERE city = 'Paris'",  # cut off at max_new_tokens
    "```sql\nSELECT name FROM customers WHERE city = 'Paris';\n``",  # cut inside the closing fence
    "Here:\r\n```sql\r\nSELECT name FROM customers WHERE city = 'Paris';\r\n```\r\n",  # Windows line ends
    "``` sql {.query}\nSELECT name FROM customers WHERE city = 'Paris'\n```",  # an info string with attributes
])
def test_sql_in_a_code_block_anywhere_in_a_chat_answer_is_the_answer(shop_db, answer):
    verdict = score("sql_execution", answer, "SELECT name FROM customers WHERE city = 'Paris'",
                    database=str(shop_db))
    assert verdict.correct, verdict.reason


def test_only_the_first_code_block_counts_and_prose_without_one_is_run_as_sql(shop_db):
    expected = "SELECT name FROM customers WHERE city = 'Paris'"
    two = ("```sql\nSELECT name FROM customers WHERE city = 'Lyon'\n```\nor maybe\n"
           "```sql\nSELECT name FROM customers WHERE city = 'Paris'\n```")
    assert not score("sql_execution", two, expected, database=str(shop_db)).correct
    prose = score("sql_execution", "The customers in Paris are Ann and Cid.", expected, database=str(shop_db))
    assert not prose.correct and "predicted query failed" in prose.reason


def test_exact_match_compares_the_whole_answer_and_never_extracts_a_block():
    assert not score("exact", "```\n42\n```", "42").correct
    assert score("json_valid", 'Result: ```json\n{"a": 1}\n``` done', "").correct


def test_sql_with_different_rows_is_wrong(shop_db):
    verdict = score("sql_execution", "SELECT name FROM customers WHERE city = 'Lyon'",
                    "SELECT name FROM customers WHERE city = 'Paris'", database=str(shop_db))
    assert not verdict.correct and verdict.reason == "different results: 1 rows vs 2 expected"
    same_count = score("sql_execution", "SELECT name FROM customers WHERE city = 'Rome'",
                       "SELECT name FROM customers WHERE city = 'Lyon'", database=str(shop_db))
    assert same_count.reason == "different results: 1 rows, as expected, but with other values"


def test_sql_row_order_matters_only_when_the_expected_query_has_order_by(shop_db):
    expected = "SELECT name FROM customers ORDER BY name"
    assert score("sql_execution", "SELECT name FROM customers ORDER BY id", expected, database=str(shop_db)).correct
    reversed_ = score("sql_execution", "SELECT name FROM customers ORDER BY name DESC", expected,
                      database=str(shop_db))
    assert not reversed_.correct and "ORDER BY" in reversed_.reason
    # ORDER BY inside a string literal does not make the comparison ordered
    literal = "SELECT name FROM customers WHERE name != 'order by'"
    assert score("sql_execution", "SELECT name FROM customers ORDER BY name DESC", literal,
                 database=str(shop_db)).correct


def test_a_predicted_sql_syntax_error_counts_as_wrong_without_aborting(shop_db):
    verdict = score("sql_execution", "SELEC name FROM customers", "SELECT name FROM customers",
                    database=str(shop_db))
    assert not verdict.correct and not verdict.error and "syntax error" in verdict.reason
    assert not score("sql_execution", "SELECT 1; SELECT 2", "SELECT 1", database=str(shop_db)).correct
    empty = score("sql_execution", " ; ", "SELECT name FROM customers WHERE 0", database=str(shop_db))
    assert not empty.correct and "empty query" in empty.reason


def test_a_predicted_query_cannot_modify_the_database(shop_db):
    verdict = score("sql_execution", "DROP TABLE customers", "SELECT name FROM customers", database=str(shop_db))
    assert not verdict.correct
    attach = score("sql_execution", f"ATTACH DATABASE '{shop_db.parent / 'x.db'}' AS x", "SELECT 1",
                   database=str(shop_db))
    assert not attach.correct and not (shop_db.parent / "x.db").exists()
    conn = sqlite3.connect(shop_db)
    assert conn.execute("SELECT count(*) FROM customers").fetchone() == (4,)
    conn.close()


def test_a_runaway_query_is_stopped_at_the_time_limit_and_counted_wrong(shop_db):
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    start = time.monotonic()
    verdict = score("sql_execution", endless, "SELECT 1", database=str(shop_db), timeout_s=0.3)
    assert time.monotonic() - start < 5
    assert not verdict.correct and "time limit" in verdict.reason


def test_a_sql_script_can_stand_in_for_the_database_file(tmp_path):
    script = tmp_path / "shop.sql"
    script.write_text("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2), (3);")
    check = build_scorer("sql_execution", {"database": str(script)})
    assert check("SELECT x FROM t WHERE x > 1", "SELECT x FROM t WHERE x >= 2").correct
    assert not check("SELECT x FROM t", "SELECT x FROM t WHERE x >= 2").correct
    script.write_text("CREATE TABLE t (x INTEGER); INSERT INTO nope VALUES (1);")
    with pytest.raises(UserError, match=r"shop\.sql: the SQL script failed: no such table: nope"):
        build_scorer("sql_execution", {"database": str(script)})


def test_a_missing_sqlite_file_is_a_user_error_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match=r"database: SQLite file .*missing\.sqlite does not exist"):
        build_scorer("sql_execution", {"database": str(tmp_path / "missing.sqlite")})
    not_sqlite = tmp_path / "text.sqlite"
    not_sqlite.write_text("hello, I am not a database" * 100)
    with pytest.raises(UserError, match="not a readable SQLite database"):
        build_scorer("sql_execution", {"database": str(not_sqlite)})


# --- custom -------------------------------------------------------------------------------------------------------

@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "my_eval_scorers.py").write_text(
        "def last_word(prediction):\n"
        "    return prediction.split()[-1]\n"
        "def same_length(prediction, expected):\n"
        "    return len(prediction) == len(expected), 'compared lengths'\n"
        "def half(prediction, expected):\n"
        "    return 0.5\n"
        "def explodes(prediction, expected):\n"
        "    raise ValueError('cannot parse ' + prediction)\n"
        "def says_maybe(prediction, expected):\n"
        "    return 'maybe'\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_eval_scorers", raising=False)  # imported from an earlier test's folder
    return "my_eval_scorers"


def test_a_custom_scorer_from_a_module_judges_each_prediction(scorer_module):
    same = build_scorer("custom", {"function": f"{scorer_module}:same_length"})
    assert same("abc", "xyz").correct and same("abc", "xyz").reason == "compared lengths"
    assert not same("abcd", "xyz").correct
    half = build_scorer("custom", {"function": f"{scorer_module}:half"})("a", "b")
    assert half.score == 0.5 and not half.correct


def test_a_custom_extract_answer_is_compared_like_exact_match(scorer_module):
    extract = build_scorer("custom", {"function": f"{scorer_module}:last_word", "mode": "extract_answer"})
    assert extract("so it is Paris.", "paris").correct
    assert not extract("so it is Lyon", "paris").correct


def test_a_scorer_that_raises_is_counted_wrong_with_the_exception_in_the_reason(scorer_module):
    verdict = build_scorer("custom", {"function": f"{scorer_module}:explodes"})("abc", "x")
    assert not verdict.correct and verdict.error
    assert "my_eval_scorers:explodes raised ValueError: cannot parse abc" in verdict.reason
    odd = build_scorer("custom", {"function": f"{scorer_module}:says_maybe"})("abc", "x")
    assert odd.error and "expected a bool" in odd.reason


def test_a_scorer_that_cannot_be_imported_is_a_user_error(scorer_module):
    with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
        build_scorer("custom", {"function": "no_such_module_xyz:f"})
    with pytest.raises(UserError, match="has no function 'nope'"):
        build_scorer("custom", {"function": f"{scorer_module}:nope"})
    with pytest.raises(UserError, match="is not `module:function`"):
        build_scorer("custom", {"function": "just_a_name"})


# --- eval files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    (b'{"input": "a", "expected": "b"}\n\n{"input": "c", "expected": \n', r"eval\.jsonl:3: invalid JSON at column"),
    (b'{"input": "a", "expected": "b"}\n["not", "an", "object"]\n',
     r"eval\.jsonl:2: expected a JSON object, got a list"),
    (b'{"input": "a"}\n', r"eval\.jsonl:1: expected: missing"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}\n',
     r"eval\.jsonl:1: messages\[1\]: the last message must be the assistant"),
    (b'{"input": "a", "expected": "\xff"}\n', r"eval\.jsonl:1: invalid UTF-8"),
    (b"\n \n", "no examples"),
])
def test_an_eval_file_with_a_broken_line_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_eval_set(path)


def test_eval_files_in_all_three_shapes_give_prompts_and_expected_answers(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(
        "\ufeff" + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Capital of France?"},
                                            {"role": "assistant", "content": "Paris"}]}) + "\r\n"
        + json.dumps({"input": "2+2", "expected": "4"}) + "\n"
        + json.dumps({"input": {"q": 1}, "expected": {"b": 2, "a": 1}}) + "\n")
    examples = load_eval_set(path, prompt_template="Q: {input}\nA:", system="You add.")
    assert [e.line for e in examples] == [1, 2, 3]
    assert examples[0].messages[-1] == {"role": "user", "content": "Capital of France?"}
    assert examples[0].expected == "Paris" and examples[0].input == "Capital of France?"
    assert examples[1].messages == [{"role": "system", "content": "You add."},
                                    {"role": "user", "content": "Q: 2+2\nA:"}]
    assert json.loads(examples[2].expected) == {"a": 1, "b": 2}
    assert len(load_eval_set(path, limit=2)) == 2


def test_the_sql_example_eval_set_runs_on_its_database():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "eval-sql"
    check = build_scorer("sql_execution", {"database": str(root / "shop.sql")})
    examples = load_eval_set(root / "eval.jsonl")
    verdicts = [check(ex.expected, ex.expected) for ex in examples]
    assert all(v.correct and not v.error for v in verdicts), [v.reason for v in verdicts]
    # a plausible model answer that is textually different but right
    top3 = check("select o.customer_id, sum(o.amount) as total from orders o group by 1 order by 2 desc limit 3",
                 examples[0].expected)
    assert top3.correct, top3.reason
