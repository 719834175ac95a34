"""The advisor: one test per branch of the seed's decision framework, the memory fallback, time and serving
arithmetic, dataset counting with the target tokenizer, the starter config, and the CLI."""

from __future__ import annotations

import json

import pytest

from advise_fixtures import catalogue_config
from tunesmith.advise import advise
from tunesmith.advise.cost import (
    CALIBRATION,
    VARLEN_LENGTHS,
    _seed_varlen_lengths,
    calibrated_mfu,
    compare_serving,
    estimate_training,
    padding_efficiency,
)
from tunesmith.advise.decide import choose_method, decide
from tunesmith.errors import UserError


def write_chat(path, n, words=20):
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"question {i} " + "word " * words},
                {"role": "assistant", "content": f"SELECT {i} FROM t;"}]}) + "\n")
    return path


# -- the seed's decision framework, one branch each -----------------------------------------------------------

def test_fewer_than_1000_examples_means_not_yet_with_prompting_and_few_shot_instead():
    d = decide(999, ["format", "latency"])
    assert (d.verdict, d.rule, d.method) == ("not_yet", "too_few_examples", None)
    assert any("few-shot" in step for step in d.instead)
    assert "Come back when you have more data" in d.reasons[0]


def test_no_reason_to_fine_tune_means_not_yet_even_with_plenty_of_data():
    d = decide(50_000, [])
    assert (d.verdict, d.rule) == ("not_yet", "no_driver")
    assert any("RAG" in step for step in d.instead)


def test_simplicity_alone_is_not_a_reason_to_train():
    assert decide(5_000, ["simplicity"]).rule == "no_driver"


def test_latency_means_qlora_on_a_7b_model_served_with_vllm():
    d = decide(5_000, ["latency"])
    assert (d.verdict, d.method, d.model_size) == ("fine_tune", "qlora", "~7B")
    assert d.serve.startswith("vLLM")


def test_cost_at_scale_means_qlora_on_7b_or_13b_self_hosted_on_a10g_or_h100():
    d = decide(5_000, ["cost"])
    assert (d.method, d.model_size) == ("qlora", "7B–13B")
    assert "A10G" in d.serve and "H100" in d.serve


def test_ten_million_calls_a_day_counts_as_cost_at_scale_without_being_told():
    d = decide(5_000, ["format"], calls_per_day=10_000_000)
    assert d.rule == "cost"
    assert any("10M+" in r for r in d.reasons)


def test_maximum_quality_with_budget_means_full_fine_tuning_on_70b_plus():
    d = decide(5_000, ["quality", "latency"])
    assert (d.method, d.model_size, d.default_model) == ("full", "70B+", "llama-3.1-70b")


def test_operational_simplicity_with_a_reason_to_train_means_the_openai_fine_tuning_api():
    d = decide(5_000, ["format", "simplicity"])
    assert (d.verdict, d.model_size) == ("openai_fine_tuning", "gpt-4o-mini")
    assert d.serve.startswith("OpenAI")


def test_the_openai_route_prices_its_training_tokens_and_writes_no_tunesmith_config(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 1000)
    advice = advise(data, None, None, drivers=["format", "simplicity"], epochs=2, write_config=tmp_path / "c.yaml")
    assert advice.openai_training_usd == pytest.approx(advice.dataset.total_tokens * 2 * 3.0 / 1e6, abs=0.01)
    assert advice.config_yaml is None and not (tmp_path / "c.yaml").exists()


def test_private_data_rules_out_the_openai_api_even_when_simplicity_is_asked_for():
    d = decide(5_000, ["privacy", "simplicity"])
    assert (d.verdict, d.method) == ("fine_tune", "lora")
    assert any("rules out the OpenAI" in r for r in d.reasons)
    assert "llama.cpp" in d.serve


def test_over_100k_examples_with_a_domain_shift_means_full_fine_tuning():
    assert decide(150_000, ["format"], domain_shift=True).method == "full"
    assert decide(50_000, ["format"], domain_shift=True).method == "lora"  # the shift alone is not enough


def test_format_that_is_hard_to_prompt_for_means_lora_with_the_recommended_preset():
    d = decide(5_000, ["format"])
    assert (d.rule, d.method) == ("format_or_privacy", "lora")
    assert any("r=16" in r for r in d.reasons)


def test_a_method_that_does_not_fit_falls_back_to_the_next_lighter_one_with_the_numbers():
    method, notes = choose_method("full", {"full": False, "lora": False, "qlora": True},
                                  {"full": 130.0, "lora": 30.0, "qlora": 12.0}, 22.5)
    assert method == "qlora"
    assert "130.0 GiB" in notes[0] and "22.5 GiB" in notes[0]
    assert choose_method("lora", {"lora": True}, {}, 80)[0] == "lora"


# -- advise() end to end ------------------------------------------------------------------------------------------

def test_70b_for_quality_on_one_h200_falls_back_to_qlora_because_full_and_lora_do_not_fit(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 1200)
    advice = advise(data, "llama-3.1-70b", "h200", drivers=["quality"])
    assert advice.decision.method == "full"
    assert advice.method == "qlora"
    assert advice.max_micro_batch["full"] == 0 and advice.max_micro_batch["lora"] == 0
    assert advice.memory["qlora"].total_gib <= 140.4


def test_full_fine_tuning_of_70b_fits_when_sharded_over_enough_gpus(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 1200)
    advice = advise(data, "llama-3.1-70b", "h200", 16, drivers=["quality"])
    assert advice.method == "full"
    # fp32 AdamW states (8 bytes per parameter), a sixteenth on each GPU
    states = advice.architecture.total_params * 8 / 16 / 2**30
    assert advice.memory["full"].optimizer_gib == pytest.approx(states, rel=1e-2)


def test_full_fine_tuning_of_8b_on_one_gpu_is_estimated_as_train_runs_it(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 150_000, words=2)
    # 16 bytes per parameter do not fit one H200; bf16 weights with 8-bit states (6 bytes) do
    advice = advise(data, "llama-3.1-8b", "h200", drivers=["format"], domain_shift=True)
    assert advice.decision.method == "full" and advice.method == "full"
    full = advice.memory["full"]
    assert full.optimizer_gib == pytest.approx(advice.architecture.total_params * 2 / 2**30, rel=1e-2)
    assert full.total_gib < 100
    assert any("adamw_8bit_bf16" in n for n in advice.notes)
    # a T4 has no bf16: fp32 masters are all it could run (and they do not fit)
    t4 = advise(data, "llama-3.1-8b", "t4", drivers=["format"], domain_shift=True)
    assert t4.max_micro_batch["full"] == 0 and not any("adamw_8bit_bf16" in n for n in t4.notes)


def test_lora_is_sharded_like_tunesmith_trains_it_but_qlora_stays_on_one_gpu(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 1200)
    sharded = advise(data, "llama-3.1-70b", "h200", 4, drivers=["format"])
    assert sharded.method == "lora"  # 141 GB of bf16 weights fit only when split over the 4 GPUs
    assert advise(data, "llama-3.1-70b", "h200", 1, drivers=["format"]).method == "qlora"
    latency = advise(data, "llama-3.1-8b", "a10g", 2, drivers=["latency"])
    assert latency.method == "qlora" and latency.num_gpus == 1
    assert any("not FSDP-shardable" in note for note in latency.notes)


def test_a_model_that_fits_nowhere_is_a_user_error_naming_the_fixes(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 1200)
    with pytest.raises(UserError, match="does not fit"):
        advise(data, "llama-3.1-70b", "a10g", drivers=["latency"])


def test_tokens_are_counted_with_the_target_tokenizer_when_the_model_folder_has_one(tmp_path, tiny_model_dir,
                                                                                     tiny_tokenizer):
    from tunesmith.chat import tokenize_chat

    data = write_chat(tmp_path / "train.jsonl", 1100)
    advice = advise(data, str(tiny_model_dir), "a10g", drivers=["format"])
    records = [json.loads(line) for line in data.read_text().splitlines()]
    chats = [tokenize_chat(tiny_tokenizer, r["messages"]) for r in records]
    assert advice.dataset.tokenizer == str(tiny_model_dir)
    assert advice.dataset.total_tokens == sum(len(c.input_ids) for c in chats)
    assert advice.dataset.supervised_tokens == sum(c.num_supervised for c in chats)
    assert advice.dataset.max_tokens == max(len(c.input_ids) for c in chats)


def test_the_starter_config_validates_and_carries_the_recommendation(tmp_path):
    from tunesmith.config import load_config

    data = write_chat(tmp_path / "train.jsonl", 2000)
    out = tmp_path / "tunesmith.yaml"
    advice = advise(data, "qwen2.5-7b", "a10g", drivers=["latency"], write_config=out)
    cfg = load_config(out)
    assert cfg.train.method == advice.method == "qlora"
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.train.dataset == str(data)
    assert cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps >= 16
    # max_length fitted to the data: the longest example rounded up to 128, so packing fills rows of that length
    assert cfg.train.max_length % 128 == 0 and 0 <= cfg.train.max_length - advice.dataset.max_tokens < 128
    assert advice.memory["qlora"].seq_len == cfg.train.max_length
    assert out.read_text().startswith("# Written by `tunesmith advise`")
    assert advice.config_yaml == out.read_text() and advice.config_path == str(out)


def test_gemma_2s_soft_capped_head_is_estimated_with_full_logits_as_tunesmith_trains_it(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 1000)
    gemma = advise(data, "gemma-2-2b", "h200", drivers=["format"])
    llama = advise(data, "llama-3.2-3b", "h200", drivers=["format"])
    assert gemma.memory["lora"].logits == "full" and llama.memory["lora"].logits == "chunked"


def test_a_config_json_file_is_accepted_as_the_model(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 300, "architectures": ["LlamaForCausalLM"]}))
    advice = advise(write_chat(tmp_path / "t.jsonl", 1000), str(config), "l4", drivers=["privacy"])
    assert advice.architecture.total_params == 300 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
                                                                   + 2 * 64) + 64
    assert advice.method == "lora"


def test_unknown_model_and_gpu_names_list_close_matches():
    with pytest.raises(UserError, match=r"did you mean llama-3\.1-8b"):
        advise(None, "llama3.1-8b", "a10g", drivers=["format"])
    with pytest.raises(UserError, match="did you mean h200"):
        advise(None, "llama-3.1-8b", "h20", drivers=["format"])


def test_a_broken_data_line_is_named_by_file_and_line(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 3)
    data.write_text(data.read_text() + "{not json\n")
    with pytest.raises(UserError, match=r"train.jsonl:4: invalid JSON at column 2"):
        advise(data, "llama-3.1-8b", "a10g", drivers=["format"])


# -- time and serving arithmetic ----------------------------------------------------------------------------------

def test_calibration_reproduces_the_measured_runs_it_was_taken_from():
    from tunesmith.hardware.catalog import GPUS
    from tunesmith.hardware.memory import architecture_from_config

    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    fixed = estimate_training(arch, "lora", 10**6, 1, 2048, peak_tflops=GPUS["h200"].bf16_tflops,
                              price_per_hour=3.5, lora_params=41_943_040)
    assert fixed.tokens_per_s == pytest.approx(6918, rel=0.01)  # 4N' + attention = 33.2 GFLOP/token
    ref = padding_efficiency(_seed_varlen_lengths(), VARLEN_LENGTHS["batch"], VARLEN_LENGTHS["max"])
    varlen_row = next(c for c in CALIBRATION if c.method == "lora" and not c.fixed_length)
    assert calibrated_mfu("lora", pad_eff=ref)[0] == pytest.approx(varlen_row.mfu, rel=1e-9)
    assert calibrated_mfu("lora", pad_eff=ref, packing=True)[0] > 3 * varlen_row.mfu


def test_padding_efficiency_is_one_for_equal_lengths_and_falls_with_spread():
    assert padding_efficiency([100] * 50, 8, 2048) == 1.0
    assert padding_efficiency([10, 1000] * 50, 8, 2048) < 0.6


def test_a_fine_tuned_8b_is_tens_of_times_cheaper_than_gpt_4o_at_10m_calls_but_not_at_1k():
    from tunesmith.hardware.catalog import GPUS
    from tunesmith.hardware.memory import architecture_from_config

    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    h100 = GPUS["h100-80gb"]
    at_scale = compare_serving(arch, 10_000_000, 500, 200, gpu_name=h100.name, peak_tflops=h100.bf16_tflops,
                               price_per_hour=h100.price_per_hour, memory_gib=h100.memory_gib,
                               api_model="gpt-4o")
    assert at_scale.api_cost_per_day == pytest.approx(10_000_000 * (500 * 2.5 + 200 * 10) / 1e6)
    assert at_scale.ratio == pytest.approx(at_scale.api_cost_per_day / at_scale.self_hosted_cost_per_day, rel=1e-3)
    assert at_scale.ratio >= 10
    small = compare_serving(arch, 1_000, 500, 200, gpu_name=h100.name, peak_tflops=h100.bf16_tflops,
                            price_per_hour=h100.price_per_hour, memory_gib=h100.memory_gib,
                               api_model="gpt-4o")
    assert small.gpus_needed == 1 and small.ratio < 1  # one always-on GPU costs more than 1k API calls


def test_a_70b_model_is_served_on_enough_gpus_to_hold_its_weights():
    from tunesmith.hardware.catalog import GPUS
    from tunesmith.hardware.memory import architecture_from_config

    arch = architecture_from_config(catalogue_config("llama-3.1-70b"))
    h100 = GPUS["h100-80gb"]
    plan = compare_serving(arch, 1_000, 500, 200, gpu_name=h100.name, peak_tflops=h100.bf16_tflops,
                           price_per_hour=h100.price_per_hour, memory_gib=h100.memory_gib)
    assert plan.gpus_needed * h100.memory_gib * 0.7 >= arch.total_params * 2 / 2**30
    assert plan.gpus_needed == 3  # 131 GiB of bf16 weights over 56 GiB per GPU


# -- CLI --------------------------------------------------------------------------------------------------------------

def test_cli_json_gives_the_whole_advice_and_writes_a_valid_config(tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app
    from tunesmith.config import load_config

    data = write_chat(tmp_path / "train.jsonl", 1500)
    out = tmp_path / "advised.yaml"
    result = CliRunner().invoke(app, ["advise", "--data", str(data), "--model", "llama-3.2-1b", "--gpu", "l4",
                                      "--driver", "format", "--driver", "cost", "--calls-per-day", "20000000",
                                      "--write-config", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["decision"]["rule"] == "cost" and payload["method"] == "qlora"
    assert payload["serving"]["calls_per_day"] == 20_000_000
    assert payload["training"]["gpu_hours"] > 0
    assert load_config(out).train.method == "qlora"


def test_cli_without_drivers_off_a_terminal_defaults_to_not_yet():
    from typer.testing import CliRunner

    from tunesmith.cli import app

    result = CliRunner().invoke(app, ["advise", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["decision"]["rule"] == "no_driver"


def test_cli_unknown_driver_is_a_one_line_error_with_exit_code_2():
    from tunesmith.cli import main

    assert main(["advise", "--driver", "latncy"]) == 2


def test_interactive_questions_fill_in_what_the_flags_left_out(monkeypatch, tmp_path):
    from rich.console import Console

    from tunesmith.advise.render import ask_missing

    data = write_chat(tmp_path / "train.jsonl", 3)
    answers = iter([str(data), "y", "n", "n", "y", "n", "n", "2000000"])
    monkeypatch.setattr("builtins.input", lambda *a, **k: next(answers))
    with (tmp_path / "out.txt").open("w") as screen:
        got = ask_missing(Console(file=screen), None, [], None)
    assert got == (data, ["format", "privacy"], 2_000_000)


def test_the_cli_grows_cuda_memory_in_segments_unless_the_user_chose_otherwise(monkeypatch):
    import os

    from typer.testing import CliRunner

    from tunesmith.cli import app

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert CliRunner().invoke(app, ["advise", "--help"]).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert CliRunner().invoke(app, ["advise", "--help"]).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


# -- on a CPU ---------------------------------------------------------------------------------------------------------

def test_gpu_cpu_estimates_for_this_machine_speaks_of_millions_and_serves_with_llama_cpp(tmp_path):
    from tunesmith.local_model import ensure_named_model
    from tunesmith.train import eta

    model = ensure_named_model("smollm2-135m-instruct")
    data = write_chat(tmp_path / "train.jsonl", 1200)
    advice = advise(data, str(model), "cpu", drivers=["quality"])
    assert advice.gpu.startswith("cpu (") and advice.training is not None
    t = advice.training
    assert t.cost_usd == 0.0 and t.gpu_hours == 0.0
    # the FLOPs per token `tunesmith train` plans for this run on a CPU (LoRA there checkpoints nothing)
    from tunesmith.config import ModelConfig, TrainConfig
    from tunesmith.hardware.machine import Hardware
    from tunesmith.models import load_model_config
    from tunesmith.train.plan import plan_training

    plan = plan_training(load_model_config(ModelConfig(name_or_path=str(model))), TrainConfig(method=advice.method),
                         hardware=Hardware.cpu(), world=1)
    assert plan.checkpointed_layers == 0
    assert t.flops_per_token == eta.flops_per_token(advice.architecture.total_params, advice.method, 0.0)
    assert 10 < t.tokens_per_s < 100_000
    assert "llama.cpp" in advice.decision.serve and "vLLM" not in advice.decision.serve
    text = " ".join(advice.notes)
    assert "has 135M parameters" in text and "0.1B" not in text
    assert "vLLM needs a GPU" in text


def test_no_gpu_at_all_means_this_cpu_not_an_assumed_a100(tmp_path, monkeypatch):
    import importlib

    advise_module = importlib.import_module("tunesmith.advise.advise")

    monkeypatch.setattr(advise_module, "_detect_gpu", lambda: None)
    advice = advise(write_chat(tmp_path / "train.jsonl", 1200), "llama-3.1-8b", drivers=["format"])
    assert advice.gpu.startswith("cpu (")
    assert any(n.startswith("No GPU found: estimating for this machine's cpu") for n in advice.notes)
    assert not any("A100" in n for n in advice.notes)
    # an 8B model on a CPU takes hours: said, with what trains in reasonable time
    assert advice.training.hours > 0.5
    assert any("local:smollm2-135m-instruct" in n for n in advice.notes)
