"""The version checks of tunesmith.compat hold for the installed transformers / PEFT, and the private transformers
attribute tunesmith writes (``_gradient_checkpointing_func``) is still the one a checkpointed layer calls: each test
fails when upstream renames, removes or fixes the thing, instead of a training run breaking silently."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from packaging.version import Version

from tunesmith import compat


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64))


def _layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def test_the_checkpointing_methods_compat_names_exist_in_the_installed_transformers():
    from transformers import PreTrainedModel

    names = compat.checkpointing_methods(compat.installed("transformers"))
    assert names.kwargs in inspect.signature(getattr(PreTrainedModel, names.enable)).parameters
    assert callable(getattr(PreTrainedModel, names.disable))


def test_checkpointing_names_switch_at_the_version_that_renamed_them():
    assert compat.checkpointing_methods(Version("5.18.0")).enable == "gradient_checkpointing_enable"
    assert compat.checkpointing_methods(Version("5.24.0")).disable == "activation_checkpointing_disable"
    assert compat.checkpointing_methods(Version("5.24.0")).kwargs == "activation_checkpointing_kwargs"


def test_enabling_checkpointing_through_compat_switches_every_layer_without_a_deprecation_warning():
    model = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated name is a failure: compat should know better
        compat.enable_checkpointing(model)
        assert all(layer.gradient_checkpointing for layer in _layers(model))
        compat.disable_checkpointing(model)
    assert not any(layer.gradient_checkpointing for layer in _layers(model))


def test_a_checkpointed_decoder_layer_runs_its_gradient_checkpointing_func_in_a_training_forward():
    # train/model.py (set_checkpointing) assigns this private attribute per layer to recompute or offload it: if
    # transformers renames it, the assignment would do nothing and every layer would be recomputed silently
    model = _tiny_llama()
    compat.enable_checkpointing(model)
    model.train()
    calls: list[int] = []
    for i, layer in enumerate(_layers(model)):
        original = layer._gradient_checkpointing_func

        def counting(*args, _i=i, _original=original, **kwargs):
            calls.append(_i)
            return _original(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [0, 1]
    # and what it returns is what backward goes through: a function that runs the layer without autograd leaves
    # every decoder layer without gradients, while the output head (outside the layers) still gets its own
    model.zero_grad(set_to_none=True)

    def without_autograd(forward, *args):
        with torch.no_grad():
            return forward(*args)

    for layer in _layers(model):
        layer._gradient_checkpointing_func = without_autograd
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for layer in _layers(model) for p in layer.parameters())
    assert model.lm_head.weight.grad is not None


def test_peft_still_warns_about_is_gradient_checkpointing_where_compat_says_it_does():
    # the CLI silences this one FutureWarning for the PEFT releases compat names; when PEFT stops reading the
    # deprecated property, this test fails and the silencing goes
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    warned = any("is_gradient_checkpointing" in str(w.message) for w in caught)
    assert warned == compat.peft_warns_on_wrap(compat.installed("peft"))


@pytest.mark.parametrize("dist", ["transformers", "peft", "torch"])
def test_installed_versions_are_read_as_versions(dist):
    assert compat.installed(dist) > Version("0.1")
