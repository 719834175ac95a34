"""The run's numerics and checkpointing, chosen from the memory model (src/tunesmith/train/plan.py)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

from advise_fixtures import catalogue_config
from tunesmith.config import TrainConfig
from tunesmith.errors import UserError
from tunesmith.hardware.catalog import GPUS
from tunesmith.hardware.machine import Hardware
from tunesmith.train.plan import STOCHASTIC_BF16, Precision, describe, plan_training

H200 = 139.8  # GiB free on the H200 the plan's numbers were checked on

GPU = replace(Hardware.from_catalog(GPUS["h200"]), name="nvidia h200", free_gib=H200, fused_loss_kernel=False,
              fused_dropout_kernel=False)
"""One H200 with 139.8 GiB free, bf16 and torchao — without Liger's loss or the fused dropout unless a test gives
them (the numbers below were worked out for PyTorch's chunked loss and PEFT's dropout)."""

LIGER = replace(GPU, fused_loss_kernel=True)
"""The same H200 with Liger's fused loss kernel installed (the estimate counts its logit tiles)."""


def _plan(model: str, gpus: int = 1, hardware: Hardware = GPU, **train):
    return plan_training(catalogue_config(model), TrainConfig(**train), hardware=hardware, world=gpus)


def test_full_fine_tuning_of_8b_on_one_h200_trains_bf16_weights_rounded_stochastically():
    plan = _plan("llama-3.1-8b", method="full", per_device_train_batch_size=2)
    # fp32 weights + fp32 grads + fp32 AdamW = 16 bytes/param = 120 GiB before activations: over 92% of 139.8
    assert plan.optimizer == "adamw_8bit_bf16"
    assert plan.master_weights == STOCHASTIC_BF16
    assert "bf16 weights rounded stochastically, 8-bit AdamW states with fp32 update maths" in plan.reason
    assert plan.estimate_gib <= plan.budget_gib <= 0.92 * H200 + 0.1
    assert plan.precision == Precision(torch.bfloat16, torch.bfloat16)
    # 6 bytes per parameter instead of 12 (fp32 masters and gradients, 8-bit states, autocast's bf16 copy of every
    # weight): ~45 GiB less for 8B parameters
    masters = _plan("llama-3.1-8b", method="full", per_device_train_batch_size=2, optim="adamw_8bit")
    assert masters.master_weights == "fp32"
    assert 42 < masters.estimate_gib - plan.estimate_gib < 50, (masters.estimate_gib, plan.estimate_gib)
    assert masters.precision.weights == torch.float32


def test_without_bf16_full_fine_tuning_of_8b_keeps_fp32_masters_with_8bit_states():
    plan = _plan("llama-3.1-8b", hardware=replace(GPU, bf16=False), method="full", per_device_train_batch_size=2)
    assert plan.optimizer == "adamw_8bit"
    assert plan.master_weights == "fp32"
    assert "8-bit AdamW states with fp32 update maths on fp32 master weights" in plan.reason
    assert "need a bf16 GPU and torchao" in plan.reason
    assert plan.estimate_gib <= plan.budget_gib <= 0.92 * H200 + 0.1


def test_stochastic_bf16_is_refused_where_it_cannot_run():
    with pytest.raises(UserError, match="one GPU only"):
        _plan("llama-3.2-1b", gpus=2, method="full", optim="adamw_8bit_bf16")
    with pytest.raises(UserError, match=r"train\.precision is fp16"):
        _plan("llama-3.2-1b", method="full", optim="adamw_8bit_bf16", precision="fp16")
    # an explicit fp32 precision is kept: auto falls back to fp32 masters with 8-bit states
    fp32 = _plan("llama-3.1-8b", method="full", per_device_train_batch_size=2, precision="fp32")
    assert fp32.optimizer == "adamw_8bit" and fp32.master_weights == "fp32"
    with pytest.raises(ValueError, match="adapters are fp32"):
        TrainConfig(method="lora", optim="adamw_8bit_bf16")
    with pytest.raises(UserError, match="needs a CUDA GPU with bf16"):
        plan_training(catalogue_config("llama-3.2-1b"), TrainConfig(method="full", optim="adamw_8bit_bf16"),
                      hardware=Hardware.cpu(), world=1)


def test_full_fine_tuning_of_8b_on_two_gpus_shards_fp32_adamw():
    plan = _plan("llama-3.1-8b", gpus=2, method="full", per_device_train_batch_size=2)
    assert plan.optimizer == "adamw_torch"
    assert "fp32 AdamW fits" in plan.reason


def test_full_fine_tuning_that_cannot_fit_is_one_message_before_loading():
    with pytest.raises(UserError, match="even with 8-bit AdamW"):
        _plan("llama-3.1-70b", method="full")
    with pytest.raises(UserError, match="per GPU on 2 GPUs"):
        _plan("llama-3.1-70b", gpus=2, method="full")


def test_eight_bit_adamw_is_refused_under_fsdp2():
    with pytest.raises(UserError, match="sharded parameters"):
        _plan("llama-3.2-1b", gpus=2, method="full", optim="adamw_8bit")


def test_lora_checkpoints_nothing_on_a_big_gpu_and_everything_under_a_tight_limit():
    roomy = _plan("llama-3.1-8b", method="lora", per_device_train_batch_size=4)
    assert roomy.optimizer == "adamw_torch" and roomy.checkpointed_layers == 0
    tight = _plan("llama-3.1-8b", method="lora", per_device_train_batch_size=4, memory_limit_gb=24)
    assert tight.checkpointed_layers == 32


def test_partial_checkpointing_fills_the_budget_and_no_more():
    plans = [_plan("llama-3.1-8b", method="lora", per_device_train_batch_size=4, memory_limit_gb=g)
             for g in (40, 55, 70)]
    counts = [p.checkpointed_layers for p in plans]
    assert 32 > counts[0] > counts[1] > counts[2] > 0, counts  # more memory → fewer layers recomputed
    for p in plans:
        assert p.estimate_gib <= p.budget_gib
    assert "layers kept un-checkpointed" in plans[0].reason
    assert "of 32 layers" in describe(plans[0])


def test_qlora_checkpoints_every_layer_unless_given_a_limit():
    assert _plan("llama-3.1-8b", method="qlora").checkpointed_layers == 32
    assert _plan("llama-3.1-8b", method="qlora", memory_limit_gb=100).checkpointed_layers == 0


def test_explicit_settings_are_kept_and_the_cpu_plans_nothing():
    plan = _plan("llama-3.1-8b", method="lora", gradient_checkpointing=True, optim="adamw_torch")
    assert plan.checkpointed_layers == 32 and plan.optimizer == "adamw_torch"
    cpu = plan_training(catalogue_config("llama-3.2-1b"), TrainConfig(method="full"), hardware=Hardware.cpu(),
                        world=1)
    assert cpu.optimizer == "adamw_torch" and cpu.checkpointed_layers == 0 and cpu.budget_gib is None


def test_several_gpus_replicate_a_run_that_fits_one_and_shard_one_that_does_not():
    lora = _plan("llama-3.1-8b", gpus=2, method="lora", per_device_train_batch_size=4)
    assert lora.sharding == "replicate" and not lora.reshard_after_forward
    full = _plan("llama-3.1-8b", gpus=2, method="full", per_device_train_batch_size=2)
    assert full.sharding == "shard" and full.reshard_after_forward  # 104 GiB: no room to keep gathered weights
    roomy = _plan("llama-3.1-8b", gpus=4, method="full", per_device_train_batch_size=2)
    assert roomy.sharding == "shard" and not roomy.reshard_after_forward
    assert roomy.estimate_gib > _plan("llama-3.1-8b", gpus=4, method="full", per_device_train_batch_size=2,
                                      memory_limit_gb=100).estimate_gib  # the kept weights are in the estimate
    big = _plan("llama-3.1-70b", gpus=4, method="lora", per_device_train_batch_size=2)
    assert big.sharding == "shard" and 0 < big.checkpointed_layers < 80
    assert _plan("llama-3.1-8b", gpus=2, method="lora", sharding="shard").sharding == "shard"
    assert _plan("llama-3.1-8b", method="lora").sharding is None


@pytest.fixture
def liger_head():
    """Plans on the H200 with Liger's fused loss kernel installed."""
    return partial(_plan, hardware=LIGER)


def test_the_plan_counts_the_fused_loss_kernels_tiles_not_pytorch_chunks(liger_head):
    # measured on an H200: 8B LoRA, 8K-token rows, every layer checkpointed, Liger's loss: 20.02 GiB allocated
    fused = liger_head("llama-3.1-8b", method="lora", per_device_train_batch_size=4, gradient_checkpointing=True)
    chunked = _plan("llama-3.1-8b", method="lora", per_device_train_batch_size=4, gradient_checkpointing=True)
    assert 20.0 < fused.estimate_gib < 23.0 < chunked.estimate_gib


def test_a_dpo_plan_counts_the_head_its_log_probabilities_use(liger_head):
    # rows of 4,096 tokens (one pair of 2,048-token sequences, or two SFT sequences); with Liger installed DPO's
    # per-token log-probabilities run through its tiles as the SFT loss does, without it through PyTorch chunks
    sft = liger_head("llama-3.1-8b", method="lora", per_device_train_batch_size=2, gradient_checkpointing=True)
    dpo = liger_head("llama-3.1-8b", method="lora", per_device_train_batch_size=2, gradient_checkpointing=True,
                     objective="dpo")
    chunked = _plan("llama-3.1-8b", method="lora", per_device_train_batch_size=2, gradient_checkpointing=True,
                    objective="dpo")
    assert dpo.estimate_gib == pytest.approx(sft.estimate_gib, abs=0.5) and chunked.estimate_gib > dpo.estimate_gib + 2


def test_frozen_input_embeddings_move_to_the_cpu_only_when_the_step_does_not_fit(liger_head):
    roomy = liger_head("llama-3.1-8b", method="qlora", per_device_train_batch_size=2)
    assert roomy.embeddings_on_cpu is False
    tight = liger_head("llama-3.1-8b", method="qlora", per_device_train_batch_size=2, memory_limit_gb=10,
                       offload_checkpoints=False)
    assert tight.embeddings_on_cpu is True and tight.checkpointed_layers == 31
    assert "input embeddings in CPU memory" in describe(tight) and "-0.98 GiB" in tight.reason
    without = liger_head("llama-3.1-8b", method="qlora", per_device_train_batch_size=2, memory_limit_gb=10,
                         embeddings_on_cpu=False, offload_checkpoints=False)
    # the GiB freed keeps one layer un-checkpointed (0.83 GiB at 4K tokens) and the step under the budget
    assert without.embeddings_on_cpu is False and without.checkpointed_layers == 32
    assert without.estimate_gib > without.budget_gib >= tight.estimate_gib
    # a step that fits by checkpointing layers keeps its embeddings on the GPU (no lookups on the CPU)
    lora = liger_head("llama-3.1-8b", method="lora", per_device_train_batch_size=4, memory_limit_gb=30)
    assert not lora.embeddings_on_cpu and 0 < lora.checkpointed_layers < 32
    # tied embeddings are the output head too, several GPUs shard them, full fine-tuning trains them: never
    assert not liger_head("llama-3.2-1b", method="lora", memory_limit_gb=2).embeddings_on_cpu
    assert not liger_head("llama-3.1-8b", gpus=2, method="lora", memory_limit_gb=10).embeddings_on_cpu
    for bad in (dict(model="llama-3.2-1b", method="lora"), dict(model="llama-3.1-8b", method="full")):
        with pytest.raises(UserError, match="embeddings_on_cpu"):
            liger_head(bad.pop("model"), embeddings_on_cpu=True, **bad)


def test_fsdp2_plans_count_the_fused_loss_and_what_fsdp2_keeps_gathered(liger_head):
    one = liger_head("llama-3.1-8b", method="lora", per_device_train_batch_size=4, gradient_checkpointing=True)
    # replicated LoRA: frozen weights are left out of FSDP2 (no gathered copies) and the loss is fused as on one GPU
    two = liger_head("llama-3.1-8b", gpus=2, method="lora", per_device_train_batch_size=4, gradient_checkpointing=True)
    assert two.sharding == "replicate" and two.estimate_gib == pytest.approx(one.estimate_gib, abs=0.2)
    # sharded: each GPU holds half the layers but the whole gathered embeddings and head (2 x 0.98 GiB, bf16)
    sharded = liger_head("llama-3.1-8b", gpus=2, method="lora", per_device_train_batch_size=4,
                         gradient_checkpointing=True, sharding="shard")
    assert sharded.estimate_gib == pytest.approx(one.estimate_gib - 14.96 / 2 + 1.96, abs=0.3)
    # replicated full fine-tuning still pays FSDP2's gathered copy of every weight (bf16, 15 GiB for 8B)
    small = liger_head("llama-3.2-1b", gpus=2, method="full", per_device_train_batch_size=2)
    alone = liger_head("llama-3.2-1b", method="full", per_device_train_batch_size=2)
    assert small.sharding == "replicate"
    assert small.estimate_gib - alone.estimate_gib == pytest.approx(1.24e9 * 2 / 2**30, abs=0.1)


def test_a_packed_row_budget_between_multiples_of_max_length_is_planned_as_given(liger_head):
    four = liger_head("llama-3.1-8b", method="qlora", per_device_train_batch_size=2)
    five = liger_head("llama-3.1-8b", method="qlora", per_device_train_batch_size=2, packed_row_tokens=5120)
    six = liger_head("llama-3.1-8b", method="qlora", per_device_train_batch_size=3)
    assert four.estimate_gib < five.estimate_gib < six.estimate_gib
    with pytest.raises(ValueError, match="at least max_length"):
        TrainConfig(packed_row_tokens=1024)


def test_checkpointed_inputs_go_to_cpu_memory_only_when_the_budget_forces_checkpointing(liger_head):
    # 8B LoRA, rows of 8K tokens: every checkpointed layer's 64 MiB input but two leaves the GPU; in 24 GB the
    # freed 1.9 GiB keeps one more layer un-checkpointed (1.66 GiB per compiled layer at 8K tokens)
    tight = dict(method="lora", per_device_train_batch_size=4, memory_limit_gb=24)
    on = liger_head("llama-3.1-8b", **tight)
    off = liger_head("llama-3.1-8b", **tight, offload_checkpoints=False)
    assert on.offload_checkpoints and not off.offload_checkpoints
    assert "inputs in CPU memory" in describe(on) and "inputs in CPU memory" not in describe(off)
    assert on.checkpointed_layers == off.checkpointed_layers - 1
    assert on.estimate_gib <= on.budget_gib and off.estimate_gib <= off.budget_gib
    # where it buys nothing (1B: a 16 MiB input per layer; the freed memory keeps no more layers), auto leaves it off
    small = liger_head("llama-3.2-1b", method="lora", per_device_train_batch_size=4, memory_limit_gb=8)
    assert not small.offload_checkpoints and 0 < small.checkpointed_layers < 16
    # QLoRA rows of 8K tokens within 8 GB: only with the inputs in CPU memory does the estimate come down
    qlora = dict(method="qlora", packed_row_tokens=8192, memory_limit_gb=8 / 0.92)
    assert liger_head("llama-3.1-8b", **qlora).offload_checkpoints
    assert (liger_head("llama-3.1-8b", **qlora, offload_checkpoints=False).estimate_gib
            - liger_head("llama-3.1-8b", **qlora).estimate_gib) == pytest.approx(30 * 4096 * 8192 * 2 / 2**30, abs=0.1)
    forced = dict(method="lora", per_device_train_batch_size=4, gradient_checkpointing=True)
    kept = liger_head("llama-3.1-8b", **forced)
    moved = liger_head("llama-3.1-8b", **forced, offload_checkpoints=True)
    assert kept.estimate_gib - moved.estimate_gib == pytest.approx(30 * 4096 * 8192 * 2 / 2**30, abs=0.1)
    # nothing checkpointed, QLoRA's every-layer policy without a limit, several GPUs: not on by itself
    assert not liger_head("llama-3.1-8b", method="lora", per_device_train_batch_size=4).offload_checkpoints
    assert not liger_head("llama-3.1-8b", method="qlora", per_device_train_batch_size=2).offload_checkpoints
    assert not liger_head("llama-3.1-8b", gpus=2, method="lora", memory_limit_gb=30).offload_checkpoints
    with pytest.raises(UserError, match="offload_checkpoints: true runs on one GPU"):
        liger_head("llama-3.1-8b", gpus=2, method="lora", offload_checkpoints=True)


def test_kept_layers_cost_their_compiled_activations_and_the_first_one_fits_beside_a_recomputation(liger_head):
    # measured on an H200 (bench/results/fast_engine.md, fifth run), 8B LoRA, rows of 12,288 tokens, inputs and
    # embeddings in CPU memory: all or 31 of 32 layers checkpointed 18.09 GiB allocated, 30 of 32 20.03, 29 22.23
    def allocated(limit: float) -> tuple[int, float]:
        p = liger_head("llama-3.1-8b", method="lora", packed_row_tokens=12288, memory_limit_gb=limit)
        assert p.offload_checkpoints and p.embeddings_on_cpu
        return p.checkpointed_layers, (p.estimate_gib - 0.75) / 1.05  # back from total to allocated
    seed = allocated(22.99)  # the LoRA seed's 21.15 GiB as the plan's budget
    assert seed[0] == 31 and 18.09 <= seed[1] <= 18.09 + 0.6
    thirty = allocated(25)
    assert thirty[0] == 30 and 20.03 <= thirty[1] <= 20.03 + 0.8
    # eager layers keep more: the same budget checkpoints more of them
    eager = liger_head("llama-3.1-8b", method="lora", packed_row_tokens=12288, memory_limit_gb=25, compile=False)
    assert eager.checkpointed_layers > 30


def test_lora_plan_counts_no_dropout_masks_where_the_fused_kernel_draws_them():
    from tunesmith.hardware.memory import (
        ALLOCATOR_SLACK,
        COMPILED_LAYER_SHARE,
        COMPILED_NO_MASK_SHARE,
        architecture_from_config,
        layer_activation_bytes_per_token,
    )

    roomy = dict(method="lora", per_device_train_batch_size=4, memory_limit_gb=120)  # nothing checkpointed
    kernel = replace(GPU, fused_dropout_kernel=True)
    fused = _plan("llama-3.1-8b", hardware=kernel, **roomy)
    high_rank = _plan("llama-3.1-8b", hardware=kernel, **roomy, lora={"r": 128})
    two_gpus = _plan("llama-3.1-8b", gpus=2, hardware=kernel, **roomy)
    peft = _plan("llama-3.1-8b", **roomy)
    assert fused.checkpointed_layers == peft.checkpointed_layers == 0
    # PEFT keeps a 1-byte mask per adapted input feature: 5 × 4,096 (q, k, v, gate, up) + 4,096 (o) + 14,336 (down)
    # = 38,912 bytes per token per layer, 4 × 2,048 tokens × 32 layers: 9.5 GiB, of which compiled layers keep 85%,
    # plus the allocator's 5% slack: 8.5 GiB. Without masks (or dropped copies) compiled layers keep 63% of the rest.
    masks = 38_912 * 8192 * 32 / 2**30 * COMPILED_LAYER_SHARE * (1 + ALLOCATOR_SLACK)
    rest = layer_activation_bytes_per_token(architecture_from_config(catalogue_config("llama-3.1-8b")), "lora", 16,
                                            38_912, 0.05, dropout_mask_bytes=0) * 8192 * 32 / 2**30
    copies = rest * (COMPILED_LAYER_SHARE - COMPILED_NO_MASK_SHARE) * (1 + ALLOCATOR_SLACK)
    assert abs(peft.estimate_gib - fused.estimate_gib - masks - copies) < 0.15  # estimates are rounded to 0.1 GiB
    # ranks above the kernel's limit, and FSDP2 runs, keep PEFT's dropout, and its masks in the estimate
    assert high_rank.estimate_gib > fused.estimate_gib + masks
    assert two_gpus.estimate_gib == _plan("llama-3.1-8b", gpus=2, **roomy).estimate_gib


LINKED = replace(GPU, host_link_bytes_per_s=54.6e9, fused_loss_kernel=True, fused_dropout_kernel=True)
"""The H200 of bench/results/fast_engine.md: its GPU→CPU link copies 54.6 GB/s, Liger's loss and the fused dropout
installed."""


@pytest.fixture
def h200_link():
    """Plans on the H200 with its measured link and the GPU machine's kernels."""
    return partial(_plan, hardware=LINKED)


SEED_BUDGET = dict(method="lora", per_device_train_batch_size=4, packed_row_tokens=12288, memory_limit_gb=22.99,
                   lora={"dropout": 0.05})


def test_lora_within_the_seeds_memory_offloads_as_many_layers_as_the_link_moves_during_forward(h200_link):
    plan = h200_link("llama-3.1-8b", **SEED_BUDGET)
    # what measured fastest on the H200 (8 of 32 offloaded, 2 kept: 11,525 tokens/s against 10,834 recomputing)
    assert (plan.offloaded_layers, plan.checkpointed_layers, plan.layers) == (8, 22, 32)
    assert plan.offload_checkpoints and plan.estimate_gib <= plan.budget_gib
    assert "8 layers offloaded whole" in describe(plan) and "link 55 GB/s" in plan.reason

def test_half_the_link_offloads_half_the_layers():
    half = replace(LINKED, host_link_bytes_per_s=27.3e9)  # the forward's copy time is what they spend
    assert _plan("llama-3.1-8b", hardware=half, **SEED_BUDGET).offloaded_layers == 4


@pytest.mark.parametrize("change", [dict(method="qlora"), dict(compile=False), dict(offload_layers=0),
                                    dict(memory_limit_gb=None), dict(gpus=2)])
def test_no_layers_are_offloaded_whole_where_it_was_not_measured_or_nothing_is_checkpointed(h200_link, change):
    setup = {**SEED_BUDGET, **change}
    gpus = setup.pop("gpus", 1)
    assert h200_link("llama-3.1-8b", gpus=gpus, **setup).offloaded_layers == 0


def test_an_unknown_gpu_offloads_no_layers_and_says_how_to_choose():
    unknown = replace(LINKED, name="some future gpu", bf16_tflops=None, host_link_bytes_per_s=None)
    plan = _plan("llama-3.1-8b", hardware=unknown, **SEED_BUDGET)
    assert plan.offloaded_layers == 0 and "set train.offload_layers" in plan.reason


def test_a_configured_count_is_kept_and_one_over_the_layers_not_kept_is_refused(h200_link):
    assert h200_link("llama-3.1-8b", **{**SEED_BUDGET, "offload_layers": 3}).offloaded_layers == 3
    with pytest.raises(UserError, match="at most 30"):
        h200_link("llama-3.1-8b", **{**SEED_BUDGET, "offload_layers": 31})
    with pytest.raises(UserError, match="one GPU"):
        h200_link("llama-3.1-8b", gpus=2, **{**SEED_BUDGET, "offload_layers": 3})
    with pytest.raises(UserError, match="leaves only 0 layers"):  # a roomy GPU keeps every layer: nothing to offload
        h200_link("llama-3.1-8b", **{**SEED_BUDGET, "memory_limit_gb": 120, "offload_layers": 3})


# --- the plan reads its arguments and nothing else ------------------------------------------------------------------


def test_the_plan_asks_no_gpu_and_the_same_facts_give_the_same_plan(monkeypatch):
    import importlib.util

    # an H200's plans on a machine without one: one LoRA run that offloads (the link's rate), one full fine-tuning
    # (bf16 and torchao decide its optimizer), one sharded over two GPUs
    runs = [("llama-3.1-8b", 1, SEED_BUDGET), ("llama-3.1-8b", 1, dict(method="full", per_device_train_batch_size=2)),
            ("llama-3.1-70b", 4, dict(method="lora", per_device_train_batch_size=2))]
    configs = {model: catalogue_config(model) for model, _, _ in runs}
    first = [plan_training(configs[m], TrainConfig(**t), hardware=LINKED, world=w) for m, w, t in runs]

    def asked(*_args, **_kwargs):
        raise AssertionError("the plan asked the machine instead of reading its Hardware")

    for name in ("is_available", "is_bf16_supported", "mem_get_info", "get_device_name", "get_device_properties",
                 "get_device_capability", "device_count", "current_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, asked)
    monkeypatch.setattr(importlib.util, "find_spec", asked)
    again = [plan_training(configs[m], TrainConfig(**t), hardware=LINKED, world=w) for m, w, t in runs]
    assert again == first
    assert [p.optimizer for p in first] == ["adamw_torch", "adamw_8bit_bf16", "adamw_torch"]
    assert first[0].offloaded_layers == 8 and first[2].sharding == "shard"


@pytest.mark.parametrize("method, auto, fp16", [
    ("full", Precision(torch.float32, torch.bfloat16), Precision(torch.float32, torch.float16)),
    ("lora", Precision(torch.bfloat16, torch.bfloat16), Precision(torch.float16, torch.float16)),
    ("qlora", Precision(torch.bfloat16, torch.bfloat16), Precision(torch.float16, torch.float16)),
])
def test_a_bf16_gpu_trains_under_bf16_autocast_and_full_fine_tuning_keeps_fp32_masters(method, auto, fp16):
    plan = _plan("qwen2.5-0.5b", method=method)
    assert plan.precision == auto and plan.precision.name == "bf16" and plan.to_dict()["precision"] == "bf16"
    assert _plan("qwen2.5-0.5b", method=method, precision="fp16").precision == fp16
    assert _plan("qwen2.5-0.5b", method=method, precision="fp32").precision == Precision(torch.float32, None)


def test_a_gpu_without_bf16_trains_in_fp32_unless_fp16_is_asked_and_refuses_bf16():
    t4 = Hardware.from_catalog(GPUS["t4"])
    assert _plan("qwen2.5-0.5b", hardware=t4, method="lora").precision == Precision(torch.float32, None)
    assert _plan("qwen2.5-0.5b", hardware=t4, method="full").precision == Precision(torch.float32, None)
    fp16 = _plan("qwen2.5-0.5b", hardware=t4, method="lora", precision="fp16")
    assert fp16.precision == Precision(torch.float16, torch.float16) and fp16.precision.name == "fp16"
    assert _plan("qwen2.5-0.5b", hardware=t4, method="full",
                 precision="fp16").precision == Precision(torch.float32, torch.float16)
    with pytest.raises(UserError, match="bf16 is not supported by this GPU"):
        _plan("qwen2.5-0.5b", hardware=t4, method="lora", precision="bf16")


def test_the_cpu_trains_in_fp32_and_refuses_half_precision():
    cpu = _plan("qwen2.5-0.5b", hardware=Hardware.cpu(), method="lora")
    assert cpu.precision == Precision(torch.float32, None) and cpu.precision.name == "fp32"
    assert not cpu.compile_layers and not cpu.fused_dropout  # both measured on GPUs only
    with pytest.raises(UserError, match="bf16 training needs a CUDA GPU"):
        _plan("qwen2.5-0.5b", hardware=Hardware.cpu(), method="lora", precision="bf16")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        _plan("qwen2.5-0.5b", hardware=Hardware.cpu(), method="full", precision="fp16")


def test_lora_on_one_gpu_compiles_and_fuses_its_dropout_but_not_under_fsdp2_or_for_qlora():
    lora = _plan("qwen2.5-0.5b", hardware=LINKED, method="lora")
    assert lora.compile_layers and lora.fused_dropout
    assert not _plan("qwen2.5-0.5b", gpus=2, hardware=LINKED, method="lora").fused_dropout
    assert not _plan("qwen2.5-0.5b", hardware=LINKED, method="qlora").fused_dropout
    assert not _plan("qwen2.5-0.5b", hardware=LINKED, method="lora", compile=False).compile_layers


def test_this_machine_measured_without_a_gpu_is_the_cpu():
    from tunesmith.hardware.catalog import this_cpu
    from tunesmith.train.measure import measure_hardware

    assert measure_hardware(torch.device("cpu"), host_link=True) == Hardware.cpu()
    assert Hardware.from_catalog(this_cpu()) == Hardware.cpu()
