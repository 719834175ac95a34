"""A train run record written by hand, for tests that build a run folder without training."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config, ModelConfig, QuantSection, dump_config
from tunesmith.records import TrainFiles, TrainRun, versions


def write_train_run(run_dir: Path, base: Path | str, *, method: str = "lora", eval_file: Path | None = None,
                    artefact: Path | None = None) -> TrainRun:
    """``run_dir/run.json`` as `tunesmith train` writes it, for a run on ``base`` whose adapter (or model, for
    ``method: full``) is ``artefact`` (default: ``run_dir/adapter`` or ``run_dir/model``)."""
    full = method == "full"
    folder = artefact or run_dir / ("model" if full else "adapter")
    config = Config(model=ModelConfig(name_or_path=str(base)))
    record = TrainRun(model=config.model, base_model_path=str(base), base_model_source=None, method=method,
                      quantization=QuantSection() if method == "qlora" else None,
                      train_file=str(run_dir / "train.jsonl"), eval_file=str(eval_file) if eval_file else None,
                      outputs=TrainFiles(adapter=None if full else str(folder), model=str(folder) if full else None,
                                         metrics=str(run_dir / "metrics.jsonl")),
                      config=config.model_dump(mode="json"), config_yaml=dump_config(config), precision="fp32",
                      packing=False, device="cpu", processes=1, plan={}, fingerprint="0" * 16, result={},
                      versions=versions())
    record.write(run_dir)
    return record
