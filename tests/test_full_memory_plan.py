"""Full fine-tuning's memory plan against the peaks measured on one H200 (bench/results/scale_out/*.jsonl, read
here: no copy of a result), each configuration planned as it ran — its optimizer, its checkpointed layers, its
largest packed row — and compared with ``torch.cuda.max_memory_allocated()``.

The benchmark's chat lengths fill a row's budget only partly (16 sequences of ~8.7K tokens per step laid into rows
of 4,096 tokens give rows of at most 3,604), so each run's largest row is laid out again here from the benchmark's
own sequence lengths (bench/fast_engine.py) by the loop's own layout (train/batching.py)."""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import LlamaConfig

from tunesmith.config import TrainConfig
from tunesmith.hardware.catalog import GPUS
from tunesmith.hardware.machine import Hardware
from tunesmith.train.batching import balanced_rows, epoch_order, step_groups
from tunesmith.train.plan import planned_peak_gib

BENCH = Path(__file__).resolve().parents[1] / "bench"
SEQUENCES_PER_STEP = 16
DEFAULT_STEPS = 2 + 5
"""Rows written before the benchmark recorded its steps ran its defaults: 2 untimed + 5 timed."""

H200 = replace(Hardware.from_catalog(GPUS["h200"]), name="nvidia h200", free_gib=139.8, fused_dropout_kernel=False)
"""One H200 as the benchmark ran on it: Liger's fused loss, torchao."""


def _fast_engine():
    spec = importlib.util.spec_from_file_location("fast_engine", BENCH / "fast_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measured() -> list[dict]:
    """One-GPU full fine-tuning rows with a measured peak, one per distinct configuration."""
    seen, rows = set(), []
    for path in sorted((BENCH / "results" / "scale_out").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["method"] != "full" or r["gpus"] != 1 or "tokens_per_s" not in r:
                continue
            key = (r["optimizer"], r["bs"], r["rows_tokens"], r["checkpointed_layers"], r["compile"],
                   r["peak_alloc_gib"], r.get("fp8_matmuls", False))
            if key not in seen:
                seen.add(key)
                rows.append({**r, "file": path.name})
    return rows


def _largest_row(bench, row: dict) -> int:
    """The largest packed row of the run's steps: the benchmark's sequences, the loop's order and layout."""
    steps = row.get("warmup", 2) + row.get("steps", 5)
    lengths = bench.varlen_lengths(SEQUENCES_PER_STEP * steps, 2048, random.Random(0))
    largest = 0
    for step in step_groups(epoch_order(len(lengths), 0, 0), SEQUENCES_PER_STEP):
        layout = balanced_rows([lengths[i] for i in step], row["rows_tokens"])
        largest = max(largest, *(sum(lengths[step[k]] for k in r) for r in layout if r))
    return largest


MEASURED = _measured()


def test_the_committed_measurements_hold_every_one_gpu_full_fine_tuning_configuration():
    optimizers = {r["optimizer"] for r in MEASURED}
    assert {"adamw_8bit", "adamw_8bit_bf16"} <= optimizers
    assert {r["rows_tokens"] for r in MEASURED} >= {4096, 8192, 12288}
    assert any(r["compile"] for r in MEASURED) and any(not r["compile"] for r in MEASURED)


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r['file']}:{r['label']}-{r['rows_tokens']}")
def test_full_fine_tuning_plan_is_within_10_percent_of_the_measured_peak(row):
    bench = _fast_engine()
    largest = _largest_row(bench, row)
    assert largest <= row["rows_tokens"]
    cfg = LlamaConfig(**bench.SHAPES[row["shape"]])
    tcfg = TrainConfig(method="full", per_device_train_batch_size=row["bs"],
                       gradient_accumulation_steps=SEQUENCES_PER_STEP // row["bs"], max_length=2048,
                       compile=row["compile"], optim=row["optimizer"],
                       matmul_precision="fp8" if row.get("fp8_matmuls") else "auto")
    hardware = replace(H200, fp8=True)
    measured = row["peak_alloc_gib"]
    at_largest = planned_peak_gib(cfg, tcfg.model_copy(update={"packed_row_tokens": max(2048, largest)}),
                                  hardware=hardware, optimizer=row["optimizer"],
                                  checkpointed=row["checkpointed_layers"])
    assert at_largest == pytest.approx(measured, rel=0.10), f"largest row {largest} tokens"
    # what the plan budgets before it sees the data (every row full) never falls below the measured peak
    at_budget = planned_peak_gib(cfg, tcfg.model_copy(update={"packed_row_tokens": row["rows_tokens"]}),
                                 hardware=hardware, optimizer=row["optimizer"],
                                 checkpointed=row["checkpointed_layers"])
    assert at_budget >= measured
