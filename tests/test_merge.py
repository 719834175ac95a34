"""Merge: the merged folder, loaded by plain transformers, computes what base + adapter computed."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from records_fixtures import write_train_run
from tunesmith.errors import RunError, UserError
from tunesmith.export import merge


def make_adapter(base_dir, out_dir, *, quantized: bool = False, seed: int = 1):
    """A LoRA adapter with non-zero B (``init_lora_weights=False``), so merging changes the weights."""
    kwargs = {"dtype": torch.float32}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32)}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def test_merged_folder_reproduces_base_plus_adapter_logits_in_float32(tiny_model_dir, adapter_dir, tmp_path):
    result = merge(None, tmp_path / "merged", base=str(tiny_model_dir), adapter=adapter_dir, dtype="float32")

    # Check independently of merge's own parity code: plain transformers vs plain PEFT.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    bare_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir)
    ids = torch.tensor([[4, 326, 324, 336, 16, 455, 460, 395, 343, 5, 16, 4, 306]])
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        untouched = bare_base(input_ids=ids).logits
    assert (want - untouched).abs().max() > 0.1, "the adapter must change the model, or parity proves nothing"
    assert torch.allclose(got, want, atol=1e-5)
    assert result.parity.passed and result.parity.conclusive
    assert result.parity.max_abs_diff < 1e-4
    assert result.parity.top1_agreement == 1.0


def test_merged_folder_carries_tokenizer_chat_template_and_end_of_turn_stop(tiny_model_dir, adapter_dir, tmp_path):
    merge(None, tmp_path / "merged", base=str(tiny_model_dir), adapter=adapter_dir, dtype="float32")

    out = tmp_path / "merged"
    tokenizer = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(adapter_dir)
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert not list(out.glob("adapter_*")), "a merged folder holds a plain model, not an adapter"
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["stage"] == "merge"
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["max_abs_diff"] <= manifest["parity"]["tolerance"]


def test_bf16_merge_passes_its_recorded_tolerance(tiny_model_dir, adapter_dir, tmp_path):
    result = merge(None, tmp_path / "merged", base=str(tiny_model_dir), adapter=adapter_dir, dtype="bfloat16")

    assert result.dtype == "bfloat16" and result.base_dtype == "float32"
    assert 0 < result.parity.max_abs_diff <= result.parity.tolerance
    assert result.parity.conclusive
    # narrower than the fp32 base: measured against base + adapter in fp32, and said
    assert result.precision_loss is not None and result.precision_loss["max_abs_diff"] > 0
    assert any(w.startswith("merged in bfloat16, not in the base's own float32") for w in result.warnings)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_parity_beyond_tolerance_is_an_error_and_leaves_no_merged_folder(tiny_model_dir, adapter_dir, tmp_path):
    with pytest.raises(RunError, match="differs from base"):
        merge(None, tmp_path / "merged", base=str(tiny_model_dir), adapter=adapter_dir, dtype="bfloat16",
              tolerance=1e-9)
    assert not (tmp_path / "merged").exists()
    assert (tmp_path / "merged.incomplete" / "export.json").is_file()


def test_qlora_adapter_is_merged_into_the_full_precision_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter", quantized=True)
    write_train_run(run, tiny_model_dir, method="qlora")

    result = merge(run, tmp_path / "merged")

    # into the base as it is stored (fp32 here), not its 4-bit training form
    assert result.method == "qlora" and result.dtype == result.base_dtype == "float32"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config, "merged weights must be full precision, not 4-bit"
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F32"}
    assert result.warnings == ()
    assert result.parity.passed and result.parity.conclusive
    # Reported, not enforced: how far the merged bf16 model is from the NF4 base + adapter that was trained.
    drift = result.quantized_base_drift
    assert drift is not None and drift["max_abs_diff"] > 0 and 0 < drift["top1_agreement"] <= 1


def test_run_eval_data_is_used_for_parity_when_present(tiny_model_dir, adapter_dir, tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for f in adapter_dir.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    eval_rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                               {"role": "assistant", "content": f"answer {i}"}]} for i in range(2)]
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    write_train_run(run, tiny_model_dir, eval_file=run / "eval.jsonl")

    result = merge(run, tmp_path / "merged", dtype="float32")

    assert result.parity.num_prompts == 2
    assert result.base == str(tiny_model_dir)


def test_run_folder_without_adapter_is_a_user_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"no adapter_config\.json"):
        merge(tmp_path / "run", tmp_path / "merged")


def test_full_fine_tune_run_says_to_export_the_model_folder(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(UserError, match="full model") as info:
        merge(run, tmp_path / "merged")
    assert "tunesmith export" in info.value.hint


def test_adapter_for_a_different_base_is_a_user_error_naming_the_shapes(tiny_model_dir, tmp_path):
    from tunesmith.local_model import TINY_CORPUS, LocalModelShape, build_model

    other = build_model(tmp_path / "other", list(TINY_CORPUS) * 5, vocab_size=512,
                        shape=LocalModelShape(hidden_size=32, intermediate_size=64))
    adapter = make_adapter(other, tmp_path / "adapter")
    with pytest.raises(UserError, match="different base model") as info:
        merge(None, tmp_path / "merged", base=str(tiny_model_dir), adapter=adapter)
    assert "shape" in str(info.value)
    assert str(other) in info.value.hint


def test_merging_into_a_same_shaped_but_different_base_warns(tiny_model_dir, adapter_dir, tmp_path):
    import shutil

    sibling = tmp_path / "sibling"
    shutil.copytree(tiny_model_dir, sibling)  # same shapes, another name: as a base vs its instruct sibling
    result = merge(None, tmp_path / "merged", base=str(sibling), adapter=adapter_dir, dtype="float32")
    assert any("records base model" in w for w in result.warnings)
    same = merge(None, tmp_path / "merged2", base=str(tiny_model_dir), adapter=adapter_dir, dtype="float32")
    assert same.warnings == ()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_run_folder_written_by_tunesmith_train_merges_with_parity_on_its_eval_data(method, tiny_model_dir,
                                                                                     tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from train_fixtures import config, write_arithmetic
    from tunesmith.train import train

    data = write_arithmetic(tmp_path / "data", n_train=16, n_eval=3)
    train(config(tiny_model_dir, data, method=method, learning_rate=1e-2, max_steps=4,
                 per_device_train_batch_size=4, gradient_accumulation_steps=1), out_dir=tmp_path / "run")

    result = merge(tmp_path / "run", tmp_path / "merged")

    assert result.method == method
    assert result.parity.num_prompts == 3, "the run's eval conversations, not the built-in ones"
    assert result.parity.passed and result.parity.adapter_effect > 0
    assert (result.quantized_base_drift is not None) == (method == "qlora")
    assert result.warnings == ()
