"""The SQL demo's data: every reference query runs, and the held-out set really is held out."""

from __future__ import annotations

import json
import re
import sqlite3

from tunesmith.demo import CITIES, INTENTS, write_demo


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_reference_query_runs_and_eval_answers_are_not_empty(tmp_path):
    files = write_demo(tmp_path, num_train=300, num_eval=60)
    conn = sqlite3.connect(files.database)
    for record in _rows(files.train):
        conn.execute(record["messages"][-1]["content"]).fetchall()
    for record in _rows(files.eval):
        rows = conn.execute(record["messages"][-1]["content"]).fetchall()
        assert rows and rows not in ([(0,)], [(None,)])  # a wrong value cannot pass by also returning nothing


def test_eval_questions_use_phrasings_and_values_never_seen_in_training(tmp_path):
    files = write_demo(tmp_path, num_train=2000, num_eval=200)
    train, evals = _rows(files.train), _rows(files.eval)
    train_questions = {r["messages"][1]["content"] for r in train}
    train_sql = " ".join(r["messages"][2]["content"] for r in train)
    assert not train_questions & {r["messages"][1]["content"] for r in evals}
    eval_cities = {c for r in evals for c in CITIES if f"'{c}'" in r["messages"][2]["content"]}
    assert eval_cities and not any(f"'{c}'" in train_sql for c in eval_cities)
    eval_numbers = {int(n) for r in evals for n in re.findall(r"price [<>] (\d+)", r["messages"][2]["content"])}
    train_numbers = {int(n) for n in re.findall(r"price [<>] (\d+)", train_sql)}
    assert eval_numbers and not eval_numbers & train_numbers


def test_held_out_phrasings_are_new_sentences_made_of_words_seen_in_training():
    def words(text):
        return set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", text)))

    seen = set().union(*(words(p) for intent in INTENTS for p in intent.train_phrasings))
    for intent in INTENTS:
        assert not set(intent.eval_phrasings) & set(intent.train_phrasings)
        for phrasing in intent.eval_phrasings:
            assert words(phrasing) <= seen, (intent.name, phrasing)
