import json

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import config, metrics, write_arithmetic
from tunesmith.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic(tmp_path_factory.mktemp("data"))


def test_full_finetuning_drives_the_loss_well_down(tiny_model_dir, data_dir, tmp_path):
    cfg = config(tiny_model_dir, data_dir, method="full", learning_rate=3e-3, num_train_epochs=8,
                 per_device_train_batch_size=8, gradient_accumulation_steps=1, warmup_ratio=0.0)
    result = train(cfg, out_dir=tmp_path / "run")
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 48
    assert losses[-1] < 0.35 * losses[0]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert result.trainable_params == result.total_params


def test_lora_adapter_holds_only_adapter_weights_and_plain_peft_reproduces_its_logits(tiny_model_dir, data_dir,
                                                                                     tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config(tiny_model_dir, data_dir, method="lora", learning_rate=1e-2, max_steps=6)
    result = train(cfg, out_dir=tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    # all seven projections of both layers, A and B each
    assert len(weights) == 2 * 7 * 2
    assert all(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k), "lora_B never trained"
    assert 0 < result.trainable_params < result.total_params

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok("What is 3 plus 4?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain_logits = plain(ids).logits
        base_logits = plain.get_base_model()(ids).logits  # still adapted: compare against disabled adapter
        with plain.disable_adapter():
            frozen_logits = plain(ids).logits
    assert torch.allclose(plain_logits, base_logits)
    assert not torch.allclose(plain_logits, frozen_logits, atol=1e-5), "the adapter changes nothing"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["method"] == "lora" and run["outputs"]["adapter"].endswith("adapter")
    # the plan is recorded: on the CPU nothing is estimated, fp32 AdamW on the adapters, no checkpointing
    assert run["plan"]["optimizer"] == "adamw_torch" and run["plan"]["checkpointed_layers"] == 0
    assert run["plan"]["sharding"] is None and run["plan"]["estimate_gib"] is None


def test_qlora_trains_on_the_cpu_with_bitsandbytes_nf4(tiny_model_dir, data_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = config(tiny_model_dir, data_dir, method="qlora", learning_rate=1e-2, max_steps=3,
                 per_device_train_batch_size=4, gradient_accumulation_steps=1)
    result = train(cfg, out_dir=tmp_path / "run")
    assert result.steps == 3
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert all("lora_" in k for k in weights)
    cfg_json = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 16 and cfg_json["lora_alpha"] == 32


@pytest.mark.parametrize("other", [
    {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8},
    {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "packing": True},
    {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "packing": True},
])
def test_accumulation_and_packing_give_the_same_loss_and_gradients_as_one_big_batch(tiny_model_dir, data_dir,
                                                                                   tmp_path, other):
    common = {"method": "full", "max_steps": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0}
    big = config(tiny_model_dir, data_dir, per_device_train_batch_size=8, gradient_accumulation_steps=1, **common)
    alt = config(tiny_model_dir, data_dir, **other, **common)
    train(big, out_dir=tmp_path / "big")
    train(alt, out_dir=tmp_path / "alt")
    a, b = metrics(tmp_path / "big"), metrics(tmp_path / "alt")
    for x, y in zip(a, b, strict=True):
        assert x["supervised_tokens"] == y["supervised_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_lora_r16_on_all_linear_layers_of_llama_3_1_8b_has_the_seeds_parameter_count():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunesmith.config import TrainConfig
    from tunesmith.train.model import _add_lora, count_parameters

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    trainable, total = count_parameters(_add_lora(model, TrainConfig()))
    # the seed's printout: "trainable params: 41,943,040 || all params: 8,072,204,288" (all = base + adapters)
    assert (trainable, total) == (41_943_040, 8_072_204_288)
    assert total - trainable == 8_030_261_248  # Llama-3.1-8B itself


def test_presets_fill_unset_fields_and_explicit_fields_win():
    from tunesmith.config import load_config

    cfg = load_config(None, ["train.preset=aggressive", "train.lora.alpha=64"])
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.learning_rate) == (64, 64, 3e-4)
    cons = load_config(None, ["train.preset=conservative"]).train
    assert cons.lora.target_modules == ["q_proj", "v_proj"] and cons.learning_rate == 1e-4
    seed = load_config(None, []).train
    assert (seed.lora.r, seed.lora.alpha, seed.lora.dropout, len(seed.lora.target_modules)) == (16, 32, 0.05, 7)
    assert (seed.num_train_epochs, seed.per_device_train_batch_size, seed.gradient_accumulation_steps) == (3, 4, 4)
    assert (seed.lr_scheduler_type, seed.warmup_ratio, seed.max_length) == ("cosine", 0.03, 2048)


def test_examples_over_max_length_are_dropped_and_counted(tiny_model_dir, data_dir, tmp_path):
    cfg = config(tiny_model_dir, data_dir, method="full", max_steps=1, max_length=100)
    result = train(cfg, out_dir=tmp_path / "run")
    dropped = result.data["train"]["dropped_overlong"]
    assert 0 < dropped < 48 and result.data["train"]["examples"] + dropped == 48


def test_periodic_task_eval_is_logged_with_the_training_metrics(tiny_model_dir, data_dir, tmp_path):
    cfg = config(tiny_model_dir, data_dir, method="full", learning_rate=3e-3, max_steps=4, eval_strategy="steps",
                 eval_steps=2, task_eval_samples=3)
    train(cfg, out_dir=tmp_path / "run")
    evals = metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [2, 4]
    assert all(0.0 <= e["task_exact"] <= 1.0 and "eval_loss" in e for e in evals)
