"""Full fine-tuning with FP8 products (``train.matmul_precision: fp8``, src/tunesmith/train/fp8_training.py) where
no GPU is needed: the config's and the plan's refusals, the plan's record, the memory model's terms, and which
linear layers are chosen. The products themselves run on FP8 tensor cores only: tests/gpu/test_fp8_training_cuda.py
converts, trains and compares them with bf16."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from advise_fixtures import catalogue_config
from tunesmith.config import TrainConfig
from tunesmith.errors import UserError
from tunesmith.hardware.catalog import GPUS
from tunesmith.hardware.machine import Hardware
from tunesmith.hardware.memory import architecture_from_config, estimate_memory
from tunesmith.train.fp8_training import converts, fp8_layer_names
from tunesmith.train.plan import describe, plan_training

H200 = Hardware.from_catalog(GPUS["h200"])


def _plan(hardware: Hardware = H200, world: int = 1, **train):
    tcfg = TrainConfig(method="full", per_device_train_batch_size=2, max_length=2048, **train)
    return plan_training(catalogue_config("llama-3.1-8b"), tcfg, hardware=hardware, world=world)


@pytest.mark.parametrize(("method", "says"), [("lora", "base_precision fp8 for an FP8 base"),
                                              ("qlora", "matmul_precision auto")])
def test_config_refuses_fp8_products_outside_full_fine_tuning(method, says):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="matmul_precision fp8 is for method full") as err:
        TrainConfig(method=method, matmul_precision="fp8")
    assert says in str(err.value)


@pytest.mark.parametrize(("hardware", "says"), [(Hardware.cpu(), "the CPU has none"),
                                                (Hardware.from_catalog(GPUS["a100-80gb"]), "a100-80gb"),
                                                (Hardware.from_catalog(GPUS["t4"]), "t4")])
def test_plan_refuses_fp8_products_without_fp8_tensor_cores(hardware, says):
    with pytest.raises(UserError, match=r"compute capability 8\.9") as err:
        _plan(hardware, matmul_precision="fp8", **({"precision": "fp32"} if hardware.device == "cpu" else {}))
    assert says in str(err.value) and "matmul_precision: auto" in err.value.hint


def test_plan_refuses_fp8_products_on_several_gpus_without_bf16_or_without_torchao():
    with pytest.raises(UserError, match="one GPU"):
        _plan(world=2, matmul_precision="fp8")
    with pytest.raises(UserError, match="bf16"):
        _plan(matmul_precision="fp8", precision="fp16")
    with pytest.raises(UserError, match="needs torchao") as err:
        _plan(replace(H200, torchao=False), matmul_precision="fp8", optim="adamw_8bit")
    assert "tunesmith[gpu]" in err.value.hint


def test_the_plan_records_fp8_products_and_describe_says_so():
    bf16, fp8 = _plan(), _plan(matmul_precision="fp8")
    assert fp8.fp8_matmuls and not bf16.fp8_matmuls and not fp8.fp8_base
    assert fp8.to_dict()["fp8_matmuls"] is True
    assert "products in FP8" in describe(fp8) and "FP8" not in describe(bf16)
    # the weights and optimizer are what they would be without it
    assert (fp8.optimizer, fp8.master_weights, fp8.precision) == (bf16.optimizer, bf16.master_weights, bf16.precision)


def test_fp8_products_keep_bf16_activations_and_drop_the_bf16_copies_of_fp32_block_weights():
    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    kwargs = dict(checkpointing="none", logits="fused", optimizer="adamw_8bit", compiled=True)
    for precision in ("bf16", "mixed"):
        plain = estimate_memory(arch, "full", 1, 4096, full_precision=precision, **kwargs)
        fp8 = estimate_memory(arch, "full", 1, 4096, full_precision=precision, fp8_matmuls=True, **kwargs)
        assert (fp8.weights_gib, fp8.gradients_gib, fp8.optimizer_gib) == (
            plain.weights_gib, plain.gradients_gib, plain.optimizer_gib)
        # torchao saves the bf16 input and the weight itself: a kept layer costs what bf16's does, except the bf16
        # copy a compiled layer keeps of fp32 master weights (fp8 casts them straight from fp32)
        block = (arch.total_params - 2 * arch.embedding_params) / arch.num_layers
        copy = block * 2 / 2**30 if precision == "mixed" else 0.0
        assert fp8.layer_gib == pytest.approx(plain.layer_gib - copy, abs=1e-5)
        # one product's FP8 operands during a layer's backward: T × i × 5 bytes and the weight's two layouts
        extra = (4096 * arch.intermediate_size * 5 + 2 * arch.hidden_size * arch.intermediate_size) / 2**30
        assert fp8.layer_backward_gib == pytest.approx(plain.layer_backward_gib + extra, abs=1e-5)


def _tiny(intermediate_size: int = 128, vocab_size: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_every_decoder_block_linear_layer_is_chosen_and_the_head_is_not():
    names = fp8_layer_names(_tiny())
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in projections]
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_layers_whose_dimensions_are_not_multiples_of_16_keep_bf16_products():
    assert converts(64, 128) and not converts(64, 100) and not converts(100, 64)
    # an MLP of width 100: its three projections stay as they are, the attention's four are chosen
    names = fp8_layer_names(_tiny(intermediate_size=100))
    assert len(names) == 2 * 4 and not any("mlp" in n for n in names)


def test_prepare_model_swaps_in_torchaos_float8_linear_around_the_same_parameters():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from tunesmith.train.model import prepare_model

    model = _tiny()
    weights = {n: p for n, p in model.named_parameters()}
    tcfg = TrainConfig(method="full", gradient_checkpointing=False, compile=False)
    plan = replace(plan_training(model.config, tcfg, hardware=Hardware.cpu(), world=1), fp8_matmuls=True)
    chosen = fp8_layer_names(model)
    prepare_model(model, tcfg, plan)
    modules = dict(model.named_modules())
    assert all(type(modules[n]) is Float8Linear for n in chosen)
    assert type(model.lm_head) is torch.nn.Linear
    # the optimizer, checkpoints and saved models see the same parameters under the same names
    assert {n: p for n, p in model.named_parameters()} == weights
    assert all(modules[n].config.pad_inner_dim for n in chosen)
