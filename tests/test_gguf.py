"""GGUF export: llama.cpp's converter and quantizer, then llama.cpp itself reproduces the HF model's output."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
from transformers import AutoTokenizer

from gguf_fixtures import needs_gguf
from tunesmith.errors import UserError
from tunesmith.export import converter
from tunesmith.export.ollama import read_modelfile, render_go

pytestmark = pytest.mark.gguf


@pytest.fixture(scope="module")
def f16_export(tiny_model_dir, tmp_path_factory):
    from tunesmith.export.gguf import to_gguf

    return to_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "f16", "f16", n_threads=1)


@needs_gguf
def test_f16_gguf_loaded_by_llama_cpp_reproduces_the_hf_greedy_output(f16_export):
    check = f16_export.check
    assert check.num_prompts == 4
    assert check.identical == check.num_prompts, check.samples
    assert check.agreement == 1.0
    first = check.samples[0]
    assert first["hf"] == first["llama_cpp"] and len(first["hf"]) > 1
    assert f16_export.tensor_types.get("F16", 0) > 0


@needs_gguf
def test_llama_cpp_tokenises_most_served_prompts_like_training(f16_export):
    # The remaining gap: llama.cpp runs this BPE as a SentencePiece (score-ordered) vocabulary, which merges a
    # few rare pairs differently; exact for the plain-text prompts, off for one with a leading space + newlines.
    assert f16_export.check.tokenization_agreement >= 0.75


@needs_gguf
def test_modelfile_beside_the_gguf_renders_the_training_prompt(f16_export, tiny_model_dir):
    modelfile = read_modelfile(f16_export.modelfile)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert f16_export.template_family == "chatml"
    assert modelfile["from"] == "./model-f16.gguf"
    assert modelfile["stops"] == ["<|im_end|>"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "SELECT 1;"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "And 2?"}]
    want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    got = render_go(modelfile["template"], {"Messages": [{"Role": m["role"], "Content": m["content"]}
                                                          for m in messages]})
    assert got == want


@needs_gguf
@pytest.mark.parametrize(("quant", "quantized_type"), [("q8_0", "Q8_0"), ("q4_k_m", "Q5_0")])
def test_quantized_gguf_loads_and_generates_with_reported_agreement(quant, quantized_type, tiny_model_dir, tmp_path,
                                                                   f16_export):
    from tunesmith.export.gguf import to_gguf

    result = to_gguf(tiny_model_dir, tmp_path / quant, quant, n_threads=1)

    assert result.size_bytes < f16_export.size_bytes
    assert result.tensor_types.get(quantized_type, 0) > 0
    assert result.check.num_prompts == 4
    assert all(len(s["llama_cpp"]) > 0 for s in result.check.samples)
    assert 0.0 <= result.check.agreement <= 1.0
    manifest = json.loads((tmp_path / quant / f"model-{quant}.export.json").read_text())
    assert manifest["check"]["agreement"] == result.check.agreement
    if quant == "q4_k_m":  # hidden 64 is not a multiple of 256: K-quants fall back, and the result says so
        assert any("fell back" in w for w in result.warnings)


@needs_gguf
def test_unsupported_architecture_is_a_user_error(tiny_model_dir, tmp_path):
    from tunesmith.export.gguf import to_gguf

    model = tmp_path / "toy"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["ToyNetForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))

    with pytest.raises(UserError, match=r"ToyNetForCausalLM is not supported by llama\.cpp") as info:
        to_gguf(model, tmp_path / "out", "f16")
    assert "--print-supported-models" in info.value.hint
    assert not list((tmp_path / "out").glob("*.gguf"))


@needs_gguf
def test_an_adapter_folder_is_refused_with_the_merge_command(tmp_path):
    from tunesmith.export.gguf import to_gguf

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError) as info:
        to_gguf(tmp_path / "adapter", tmp_path / "out", "f16")
    assert "tunesmith merge" in info.value.hint or "config.json" in str(info.value)


def test_unknown_quant_type_is_a_user_error(tiny_model_dir, tmp_path):
    from tunesmith.export.gguf import to_gguf

    with pytest.raises(UserError, match="q4_k_x"):
        to_gguf(tiny_model_dir, tmp_path, "q4_k_x")


def test_missing_converter_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setattr(converter, "llama_cpp_version", lambda: "9.9.9")
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    monkeypatch.delenv("TUNESMITH_GGUF_CONVERTER", raising=False)
    with pytest.raises(UserError, match="not set up") as info:
        converter.find_converter()
    assert "tunesmith setup-gguf" in info.value.hint


def test_setup_takes_only_the_converter_files_from_the_sdist(tmp_path, monkeypatch):
    monkeypatch.setattr(converter, "llama_cpp_version", lambda: "9.9.9")
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNESMITH_GGUF_CONVERTER", raising=False)
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    files = {"llama_cpp_python-9.9.9/vendor/llama.cpp/convert_hf_to_gguf.py": "print('convert')\n",
             "llama_cpp_python-9.9.9/vendor/llama.cpp/conversion/llama.py": "# llama\n",
             "llama_cpp_python-9.9.9/vendor/llama.cpp/gguf-py/gguf/__init__.py": "# gguf\n",
             "llama_cpp_python-9.9.9/vendor/llama.cpp/src/llama.cpp": "// not needed\n",
             "llama_cpp_python-9.9.9/llama_cpp/llama.py": "# not needed\n"}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))

    script = converter.setup_converter(sdist)

    assert script == converter.find_converter()
    root = tmp_path / "home" / "llama.cpp-9.9.9"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == \
        ["conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
