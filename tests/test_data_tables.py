"""Data beyond JSONL: parquet, CSV, Arrow, JSON arrays, save_to_disk folders and hub ids through `datasets`, with
a column mapping; the same validation, with row-numbered problems."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_cases import chat, config, read_jsonl, write_jsonl
from tunesmith.data import prepare
from tunesmith.data.formats import TableSource, read_file
from tunesmith.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def rows(n=12):
    out = [chat(i) for i in range(n)]
    out[3]["messages"][1]["weight"] = 0  # a field only some messages have: Arrow gives the others weight: None
    out[3]["messages"].append({"role": "user", "content": "and again?"})
    out[3]["messages"].append({"role": "assistant", "content": "yes " * 25, "weight": 1})
    return out


def prepared(out: Path) -> tuple[list, list]:
    return read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")


def test_parquet_json_array_and_save_to_disk_folders_prepare_to_the_same_examples_as_jsonl(tmp_path, tiny_model_dir):
    import datasets

    data = rows()
    table = datasets.Dataset.from_list(data)
    sources = {"jsonl": write_jsonl(tmp_path / "a.jsonl", data), "parquet": tmp_path / "a.parquet",
               "json": tmp_path / "a.json", "saved": tmp_path / "saved", "saved_dict": tmp_path / "saved_dict"}
    table.to_parquet(str(sources["parquet"]))
    sources["json"].write_text(json.dumps(data, indent=2))
    table.save_to_disk(str(sources["saved"]))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(sources["saved_dict"]))
    results = {name: prepared(Path(prepare(config(tiny_model_dir, eval_fraction=0.25), [src],
                                           tmp_path / f"out-{name}").out_dir)) for name, src in sources.items()}
    expected = results.pop("jsonl")
    assert len(expected[0]) == 9 and len(expected[1]) == 3
    assert {name: got == expected for name, got in results.items()} == {n: True for n in results}


def test_columns_are_mapped_and_an_unread_column_must_be_mapped_or_ignored(tmp_path, tiny_model_dir):
    import datasets

    qa = [{"question": f"question {i}: what is {i}?", "answer": "it is " + " ".join([str(i)] * 25),
           "source": "web"} for i in range(6)]
    csv = tmp_path / "qa.csv"
    datasets.Dataset.from_list(qa).to_csv(str(csv))
    with pytest.raises(UserError, match=r"qa.csv: column\(s\) 'question', 'answer', 'source' are not read") as err:
        read_file(csv)
    assert "data.columns" in err.value.hint and "data.ignore_columns" in err.value.hint
    mapping = {"columns": {"prompt": "question", "completion": "answer"}, "ignore_columns": ["source"]}
    result = prepare(config(tiny_model_dir, eval_fraction=0.0, **mapping), [csv], tmp_path / "out")
    train = read_jsonl(Path(result.out_dir) / "train.jsonl")
    assert train[2] == {"messages": [{"role": "user", "content": qa[2]["question"]},
                                     {"role": "assistant", "content": qa[2]["answer"]}]}
    with pytest.raises(UserError, match=r"data.columns names 'query', not a column of this table"):
        read_file(csv, table=TableSource({"prompt": "query"}))


def test_a_bad_row_is_named_by_its_row_number(tmp_path, tiny_model_dir):
    import datasets

    data = rows(20)
    data[16]["messages"][0]["role"] = "robot"
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(data).to_parquet(str(path))
    with pytest.raises(UserError, match=r"1 problem\(s\) in 1 row\(s\):\n  .*train.parquet: row 17: "
                                        r"messages\[0\].role: unknown role 'robot'"):
        prepare(config(tiny_model_dir), [path], tmp_path / "out")


def test_a_hub_id_offline_is_one_message_naming_the_dataset(tmp_path, tiny_model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(config(tiny_model_dir)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "tunesmith", "data", "prepare", str(cfg), "tatsu-lab/alpaca",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tatsu-lab/alpaca: the hub dataset 'tatsu-lab/alpaca' could not be fetched (offline mode" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()
