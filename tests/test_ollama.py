"""The Modelfile's Go template renders the same prompt text as the model's own (training) chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tunesmith.export.ollama import match_template, read_modelfile, render_go, write_modelfile
from tunesmith.local_model import CHATML_TEMPLATE

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] "
    "| trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
FAMILY_CASES = {
    "chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", ["<|im_end|>"]),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", ["<|eot_id|>"]),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", ["<end_of_turn>"]),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>", ["<|end|>"]),
    "mistral": (MISTRAL, [], "</s>", ["</s>"]),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Write SQL: revenue per customer"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": 'Return {"a": 1}'}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Tell me a fact\nabout Paris."}],
]


def family_tokenizer(model_dir, template, specials, eos):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_modelfile_template_renders_the_training_prompt_for_each_known_family(family, tiny_model_dir, tmp_path):
    template, specials, eos, stops = FAMILY_CASES[family]
    tok = family_tokenizer(tiny_model_dir, template, specials, eos)

    match = match_template(tok)
    modelfile = read_modelfile(write_modelfile(tmp_path / "Modelfile", "model-f16.gguf", match))

    assert match.family == family
    assert modelfile["from"] == "./model-f16.gguf"
    assert modelfile["stops"] == stops
    checked = 0
    for messages in CONVERSATIONS:
        try:
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # the family's own template refuses this conversation (e.g. a system turn for Gemma)
            continue
        if match.bos_from_runtime:
            want = want.removeprefix(tok.bos_token)
        assert render_go(modelfile["template"], {"Messages": messages_as_go(messages)}) == want
        checked += 1
    assert checked >= 2


def test_roles_a_template_refuses_are_reported(tiny_model_dir):
    tok = family_tokenizer(tiny_model_dir, GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>")
    assert match_template(tok).unsupported_roles == ("system",)


def test_unknown_template_writes_no_template_and_says_so(tiny_model_dir, tmp_path):
    tok = family_tokenizer(tiny_model_dir, "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n"
                           "{% endfor %}{% if add_generation_prompt %}### assistant:{% endif %}", [], "</s>")

    match = match_template(tok)
    text = write_modelfile(tmp_path / "Modelfile", "m.gguf", match).read_text()

    assert match.family is None
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "")
    assert "matched no known family" in text
    assert 'PARAMETER stop "</s>"' in text


def test_go_template_subset_trims_and_branches_like_go():
    template = ('{{- range .Messages }}{{ if eq .Role "a" }}A{{ else if .Content }}[{{ .Content }}]{{ else }}-'
                "{{ end }}\n  {{- end }} done")
    data = {"Messages": [{"Role": "a", "Content": "x"}, {"Role": "b", "Content": "y"}, {"Role": "b", "Content": ""}]}
    assert render_go(template, data) == "A[y]- done"


def messages_as_go(messages):
    return [{"Role": m["role"], "Content": m["content"]} for m in messages]
