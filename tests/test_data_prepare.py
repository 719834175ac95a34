"""The whole stage: hold-out first, bad lines stop or go to rejects, every drop written down, report on disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_cases import chat, config, read_jsonl, words, write_jsonl
from tunesmith.data import load_prepared, prepare, read_examples
from tunesmith.data.split import holdout_indices
from tunesmith.errors import UserError


def _ids(rows):
    return [r["messages"][0]["content"].split(":")[0] for r in rows]


def test_holdout_is_seeded_deterministic_and_takes_the_configured_share(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(40)])
    runs = [prepare(config(tiny_model_dir, eval_fraction=0.1, seed=seed), [src], tmp_path / f"out{n}")
            for n, seed in enumerate((7, 7, 8))]
    evals = [_ids(read_jsonl(Path(r.out_dir) / "eval.jsonl")) for r in runs]
    assert evals[0] == evals[1] and evals[0] != evals[2]
    assert [r.eval_examples for r in runs] == [4, 4, 4] and runs[0].train_examples == 36
    expected = sorted(holdout_indices(40, 0.1, 7))
    assert evals[0] == [f"question {i}" for i in expected]


def test_holdout_happens_before_cleaning_so_a_split_duplicate_pair_is_leakage_not_dedup(tmp_path, tiny_model_dir):
    rows = [chat(i) for i in range(20)]
    held = sorted(holdout_indices(21, 0.1, 3))  # the 21st line will be a copy of a held-out example
    rows.append(rows[held[0]] if held[0] != 20 else rows[held[1]])
    original = rows.index(rows[-1]) + 1
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    result = prepare(config(tiny_model_dir, eval_fraction=0.1, seed=3), [src], tmp_path / "out")
    assert result.removed_by_rule["exact_dedup"] == 0 and result.removed_by_rule["leakage"] == 1
    [reject] = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["rule"] == "leakage" and reject["line"] == 21 and reject["duplicate_of"] == f"{src}:{original}"
    assert reject["reason"] == f"duplicates eval example {src}:{original} (exact)"


def test_near_duplicates_of_eval_examples_are_removed_from_train(tmp_path, tiny_model_dir):
    ev = [chat(100 + i, 50) for i in range(3)]
    near = json.loads(json.dumps(ev[1]))
    near["messages"][1]["content"] += " thanks"
    src = write_jsonl(tmp_path / "train.jsonl", [chat(i, 50) for i in range(5)] + [near])
    evf = write_jsonl(tmp_path / "eval.jsonl", ev)
    result = prepare(config(tiny_model_dir), [src], tmp_path / "out", eval_file=evf)
    assert (result.train_examples, result.eval_examples, result.removed_by_rule["leakage"]) == (5, 3, 1)
    [reject] = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["line"] == 6 and reject["duplicate_of"] == f"{evf}:2" and "(MinHash Jaccard ≈ " in reject["reason"]


def test_leakage_action_report_keeps_the_example_but_counts_it(tmp_path, tiny_model_dir):
    ev = [chat(100)]
    src = write_jsonl(tmp_path / "train.jsonl", [chat(1), chat(100), chat(2)])
    evf = write_jsonl(tmp_path / "eval.jsonl", ev)
    result = prepare(config(tiny_model_dir, leakage={"action": "report"}), [src], tmp_path / "out", eval_file=evf)
    assert result.train_examples == 3 and result.removed_by_rule["leakage"] == 1 and result.rejected == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rules"]["leakage"]["examples"][0]["id"] == f"{src}:2"


def test_bad_lines_stop_the_run_listing_every_problem_with_its_line(tmp_path, tiny_model_dir):
    rows = [chat(0), '{"messages": [', chat(2), {"messages": [{"role": "bot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 5}]}]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(UserError) as err:
        prepare(config(tiny_model_dir), [src], tmp_path / "out")
    assert err.value.message.splitlines() == [
        "3 problem(s) in 3 line(s):",
        f"  {src}:2: invalid JSON at column 15: Expecting value",
        f"  {src}:4: messages[0].role: unknown role 'bot' — did you mean 'assistant'?",
        f"  {src}:5: messages[1].weight: must be 0 or 1, got 5"]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_skipped_bad_lines_go_to_rejects_with_their_reasons(tmp_path, tiny_model_dir):
    rows = [chat(i) for i in range(6)] + ["not json", {"messages": [{"role": "user", "content": "only a question"}]}]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    result = prepare(config(tiny_model_dir, on_bad_lines="skip", eval_fraction=0), [src], tmp_path / "out")
    assert (result.train_examples, result.rejected, result.removed_by_rule["validate"]) == (6, 2, 2)
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert [(r["line"], r["rule"], r["reason"]) for r in rejects] == [
        (7, "validate", "invalid JSON at column 1: Expecting value"),
        (8, "validate", "messages: no assistant message: nothing to learn from")]


def test_every_rule_drops_with_a_reason_and_the_counts_add_up(tmp_path, tiny_model_dir):
    rows = [chat(i) for i in range(12)]
    rows.append(chat(3))                                                                      # 13: exact copy
    near = json.loads(json.dumps(chat(4)))
    near["messages"][1]["content"] += " ok"
    rows.append(near)                                                                         # 14: near copy
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})  # 15
    rows.append({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": words(9, 400)}]})              # 16: too long
    rows.append({"prompt": "p", "completion": ""})                                            # 17: empty answer
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    cfg = config(tiny_model_dir, eval_fraction=0, on_bad_lines="skip", overlong={"max_length": 512})
    result = prepare(cfg, [src], tmp_path / "out")
    assert result.removed_by_rule == {"validate": 1, "short_outputs": 1, "json_outputs": 0, "overlong": 1,
                                      "exact_dedup": 1, "minhash": 1, "embedding": 0, "leakage": 0}
    rejects = {r["line"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert {line: r["rule"] for line, r in rejects.items()} == {
        17: "validate", 15: "short_outputs", 16: "overlong", 13: "exact_dedup", 14: "minhash"}
    assert rejects[17]["reason"] == "messages[1].content: is empty"
    assert rejects[16]["reason"].endswith("tokens, over max_length 512")
    assert rejects[13]["duplicate_of"] == f"{src}:4" and rejects[14]["duplicate_of"] == f"{src}:5"
    assert _ids(read_jsonl(tmp_path / "out" / "train.jsonl")) == [f"question {i}" for i in range(12)]
    assert result.train_examples + result.eval_examples + result.rejected == len(rows)


def test_overlong_examples_are_truncated_by_whole_turns_when_asked(tmp_path, tiny_model_dir):
    long_multi = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": words(1, 30)},
                               {"role": "user", "content": "q2"}, {"role": "assistant", "content": words(2, 400)}]}
    src = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(3)] + [long_multi])
    cfg = config(tiny_model_dir, eval_fraction=0, overlong={"max_length": 400, "action": "truncate"})
    result = prepare(cfg, [src], tmp_path / "out")
    assert (result.train_examples, result.truncated, result.rejected) == (4, 1, 0)
    assert read_jsonl(tmp_path / "out" / "train.jsonl")[3] == {"messages": long_multi["messages"][:2]}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rules"]["overlong"]["truncated"] == 1 and report["lengths"]["splits"]["train"]["max"] <= 400
    [note] = report["rules"]["overlong"]["truncated_examples"]
    assert note["id"] == f"{src}:4" and note["reason"].endswith("over max_length 400: kept the first 2 of 4 messages")
    assert "### overlong: truncated, kept" in (tmp_path / "out" / "report.md").read_text()


def test_json_output_rule_in_the_pipeline(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": f"give {i}"},
                          {"role": "assistant", "content": json.dumps({"id": i, "words": words(i, 12)})}]}
            for i in range(4)]
    rows[2]["messages"][1]["content"] = rows[2]["messages"][1]["content"][:-1]  # truncated JSON
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    result = prepare(config(tiny_model_dir, eval_fraction=0, json_outputs={"enabled": True}), [src], tmp_path / "o")
    assert result.train_examples == 3 and result.removed_by_rule["json_outputs"] == 1
    [reject] = read_jsonl(tmp_path / "o" / "rejects.jsonl")
    assert reject["line"] == 3 and reject["reason"].startswith("messages[1]: assistant output is not JSON")


def test_embedding_rule_runs_in_the_pipeline_and_is_skipped_above_its_size_limit(tmp_path, tiny_model_dir):
    para = [("How do I reset my password?", "Open Settings, choose Account, then click Reset password and follow "
                                            "the emailed link to finish."),
            ("How can I reset my password?", "Go to Settings, pick Account, then click Reset password and follow "
                                             "the link in the email to finish."),
            ("What is the capital of France?", "The capital of France is Paris, which is also its largest city "
                                               "and its cultural centre.")]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in para]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    on = prepare(config(tiny_model_dir, eval_fraction=0, embedding={"enabled": True}), [src], tmp_path / "on")
    assert on.removed_by_rule["embedding"] == 1 and on.train_examples == 2
    assert read_jsonl(tmp_path / "on" / "rejects.jsonl")[0]["line"] == 2
    off = prepare(config(tiny_model_dir, eval_fraction=0, embedding={"enabled": True, "max_examples": 2}), [src],
                  tmp_path / "off")
    assert off.train_examples == 3
    note = json.loads((tmp_path / "off" / "report.json").read_text())["rules"]["embedding"]["note"]
    assert note == "skipped: 3 examples > embedding.max_examples 2"


def test_rules_can_be_switched_off(tmp_path, tiny_model_dir):
    rows = [chat(0), chat(0), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    cfg = config(tiny_model_dir, eval_fraction=0, exact_dedup={"enabled": False}, minhash={"enabled": False},
                 short_outputs={"enabled": False})
    assert prepare(cfg, [src], tmp_path / "o").train_examples == 3


def test_fewer_examples_than_the_minimum_is_an_error_after_writing_the_report(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [chat(1), chat(1), chat(2)])
    with pytest.raises(UserError, match=r"only 2 training example\(s\) left after cleaning, fewer than "
                                        r"data.min_examples \(5\)"):
        prepare(config(tiny_model_dir, eval_fraction=0, min_examples=5), [src], tmp_path / "o")
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "rejects.jsonl").is_file()


def test_report_histogram_and_manifest_are_written(tmp_path, tiny_model_dir):
    import matplotlib.image

    rows = [chat(i, answer_words=20 + 3 * i) for i in range(30)]
    rows.append({"messages": [{"role": "user", "content": "say <|im_end|> " + words(1, 3)},
                              {"role": "assistant", "content": words(2, 30)}]})
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    result = prepare(config(tiny_model_dir, eval_fraction=0.1), [src], tmp_path / "out")
    out = Path(result.out_dir)
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "lengths.png", "manifest.json", "rejects.jsonl",
                                                     "report.html", "report.json", "report.md", "train.jsonl"]
    png = matplotlib.image.imread(out / "lengths.png")
    assert png.shape[:2] == (450, 800) and png.std() > 0.05  # a real picture, not a blank canvas
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"read": 31, "train": 28, "eval": 3, "rejected": 0}
    assert report["lengths"]["splits"]["train"]["count"] == 28
    assert report["roles"]["train"] == {"user": 28, "assistant": 28}
    assert report["turns"]["train"]["assistant_turns"] == {"1": 28}
    assert report["special_tokens"]["examples"] == 1 and report["special_tokens"]["tokens"] == ["<|im_end|>"]
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    assert manifest["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert manifest["counts"] == report["counts"] and manifest["config"]["data"]["eval_fraction"] == 0.1
    md = (out / "report.md").read_text()
    assert "![token lengths](lengths.png)" in md and "| train | 28 |" in md
    assert "<img src='lengths.png'" in (out / "report.html").read_text()


def test_report_json_names_dropped_examples_by_line_but_the_markdown_shows_a_snippet(tmp_path, tiny_model_dir):
    rows = [chat(i) for i in range(3)] + [chat(1)]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    prepare(config(tiny_model_dir, eval_fraction=0), [src], tmp_path / "o")
    report_text = (tmp_path / "o" / "report.json").read_text()
    assert "question 1" not in report_text and f"{src}:4" in report_text
    assert f"`{src}:4`: exact duplicate of {src}:2 — \"question 1:" in (tmp_path / "o" / "report.md").read_text()


def test_read_examples_and_load_prepared_give_canonical_records(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(10)] + [{"prompt": "p", "completion": "c"}])
    prepare(config(tiny_model_dir, eval_fraction=0.2, short_outputs={"enabled": False}), [src], tmp_path / "o")
    train, ev = load_prepared(tmp_path / "o")
    assert len(train) == 9 and len(ev) == 2
    assert {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]} in train + ev
    single, none = load_prepared(src)
    assert len(single) == 11 and none is None
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(0), {"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: messages\[0\].content: must be a string, got a number"):
        read_examples(bad)


def test_config_section_rejects_typos_and_conflicting_eval_sources():
    from tunesmith.config import load_config

    with pytest.raises(UserError, match=r"unknown key `data.minhash.treshold` — did you mean `threshold`\?"):
        load_config(None, ["data.minhash.treshold=0.9"])
    with pytest.raises(UserError, match=r"give either data.eval_file or data.eval_fraction, not both"):
        load_config(None, ["data.eval_file=e.jsonl", "data.eval_fraction=0.1"])
    assert load_config(None, ["data.eval_file=e.jsonl"]).data.eval_file == "e.jsonl"


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith", "data", "prepare", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_file_exits_2_with_the_line_and_no_traceback(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [chat(0), "{oops", chat(2)])
    run = _cli(src, "--out", tmp_path / "o", "--set", f"model.name_or_path={tiny_model_dir}", cwd=tmp_path)
    assert run.returncode == 2
    assert f"{src}:2: invalid JSON at column 2" in run.stderr and "--skip-bad-lines" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_prepares_files_with_a_config_and_prints_json(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    src = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(12)] + ["{oops"])
    cfg = tmp_path / "ts.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  eval_fraction: 0.25\n"
                   "  min_examples: 5\n  embedding:\n    enabled: false\n")
    run = CliRunner().invoke(app, ["data", "prepare", str(cfg), str(src), "--out", str(tmp_path / "o"),
                                   "--skip-bad-lines", "--set", "data.seed=1", "--json"])
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert (payload["train_examples"], payload["eval_examples"], payload["rejected"]) == (9, 3, 1)
    assert Path(payload["files"]["report_html"]).is_file()


def test_a_long_shared_system_prompt_does_not_make_distinct_examples_near_duplicates(tmp_path, tiny_model_dir):
    system = {"role": "system", "content": words(999, 300)}
    rows = [{"messages": [system, *chat(i, answer_words=25)["messages"]]} for i in range(6)]
    rows.append(rows[2])  # a real copy is still caught (exact, system prompt included)
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    result = prepare(config(tiny_model_dir, eval_fraction=0, overlong={"max_length": 4096}), [src], tmp_path / "o")
    assert result.train_examples == 6
    assert result.removed_by_rule["minhash"] == 0 and result.removed_by_rule["exact_dedup"] == 1


def test_the_train_stage_reads_a_prepared_folder_with_the_same_token_counts(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tunesmith.train.dataset import split_paths, tokenize_split

    src = write_jsonl(tmp_path / "a.jsonl", [chat(i, answer_words=10 + i) for i in range(20)])
    prepare(config(tiny_model_dir, eval_fraction=0.1), [src], tmp_path / "prepared")
    train_path, eval_path = split_paths(str(tmp_path / "prepared"))
    split = tokenize_split(train_path, tiny_tokenizer, max_length=2048, overlong="drop")
    report = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert eval_path is not None and len(split.examples) == report["counts"]["train"] == 18
    assert split.stats["tokens"] == report["lengths"]["splits"]["train"]["total"]  # data and train count alike
