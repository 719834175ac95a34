"""The ``eval:`` config section: metric lists with per-metric options, and clear errors for mistakes in them."""

from __future__ import annotations

import pytest

from tunesmith.config import load_config
from tunesmith.errors import UserError


def test_metrics_take_bare_names_or_typed_entries_with_their_own_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  dataset: data/prepared\n  metrics:\n    - exact\n"
                    "    - type: sql_execution\n      database: shop.sqlite\n      timeout_s: 2\n"
                    "    - {type: regex, pattern: 'answer is (\\d+)', group: 1, name: answer}\n")
    cfg = load_config(path).eval
    assert [m.type for m in cfg.metrics] == ["exact", "sql_execution", "regex"]
    assert cfg.metrics[0].ignore_case and cfg.metrics[1].timeout_s == 2 and cfg.metrics[2].name == "answer"
    assert cfg.max_new_tokens == 256 and cfg.models == ["base"]


def test_an_unknown_metric_type_is_reported_at_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  metrics:\n    - exact\n    - type: sql\n")
    with pytest.raises(UserError, match=r"c\.yaml:4: `eval\.metrics\.1`: .*'sql_execution'"):
        load_config(path)


def test_a_misspelt_metric_option_and_a_duplicate_metric_name_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  metrics:\n    - type: sql_execution\n      databse: x.db\n")
    with pytest.raises(UserError, match=r"unknown key `eval\.metrics\.0\.sql_execution\.databse`"):
        load_config(path)
    with pytest.raises(UserError, match="two metrics are named 'exact'"):
        load_config(None, ["eval.metrics=[exact, {type: exact, ignore_case: false}]"])
    assert load_config(None, ["eval.metrics=[exact, {type: exact, ignore_case: false, name: strict}]"])


def test_set_can_index_into_a_list_of_metrics(tmp_path):
    from tunesmith.config import load_config
    from tunesmith.errors import UserError

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("eval:\n  metrics:\n    - type: sql_execution\n      database: a.db\n    - exact\n")
    cfg = load_config(cfg_file, ["eval.metrics.0.database=b.db"])
    assert cfg.eval.metrics[0].database == "b.db" and cfg.eval.metrics[1].type == "exact"
    with pytest.raises(UserError, match="list of 2"):
        load_config(cfg_file, ["eval.metrics.5.database=b.db"])
    with pytest.raises(UserError, match="single value"):
        load_config(cfg_file, ["eval.metrics.1.database=b.db"])
