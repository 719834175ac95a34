"""Pinned CPU memory allocated up front (src/tunesmith/train/pinned.py): the plan's sizes, the slots' bookkeeping,
and the offloader and the embedding lookup using them. On the CPU the slots are plain memory; that steps allocate
no pinned memory of their own on a GPU is checked in tests/gpu/test_pinned_cuda.py."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

from advise_fixtures import catalogue_config
from train_fixtures import seeded_loss_and_grads, tiny_lora_model
from tunesmith.config import TrainConfig
from tunesmith.errors import UserError
from tunesmith.hardware.catalog import GPUS
from tunesmith.hardware.machine import Hardware
from tunesmith.train import offload
from tunesmith.train.model import set_checkpointing
from tunesmith.train.pinned import PinnedPool, PinnedSizes, Slot, allocator_bytes, pinned_sizes
from tunesmith.train.plan import describe, plan_training

MIB = 2**20

LINKED = replace(Hardware.from_catalog(GPUS["h200"]), name="nvidia h200", free_gib=139.8,
                 host_link_bytes_per_s=54.6e9, host_memory_gib=1500.0)
"""The H200 of bench/results/fast_engine.md (link 54.6 GB/s) with 1.5 TB of CPU memory available."""

SEED_BUDGET = dict(method="lora", per_device_train_batch_size=4, packed_row_tokens=12288, memory_limit_gb=22.99,
                   lora={"dropout": 0.05})


def _plain(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class _Marker:
    """A stand-in for a CUDA event: records that it was recorded and waited on."""

    waited = 0

    def record(self) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        _Marker.waited += 1


def test_the_allocator_rounds_to_the_next_power_of_two():
    assert [allocator_bytes(n) for n in (1, 2, 3, 96 * MIB, 128 * MIB, 128 * MIB + 1)] == \
        [1, 2, 4, 128 * MIB, 128 * MIB, 256 * MIB]


def test_an_8b_step_at_12k_tokens_needs_a_128_mib_slot_per_checkpointed_input():
    sizes = pinned_sizes(hidden_size=4096, head_dim=128, tokens=12288, element_bytes=2, checkpointed_inputs=22,
                         offloaded_layers=8, layer_bytes=1.57 * 2**30, embedding_rows=True)
    # 12,288 × 4,096 × 2 = 96 MiB of hidden states + cos and sin (12,288 × 128 × 2 = 3 MiB each) = 102 MiB
    assert sizes.checkpoint_slots == 22 and sizes.checkpoint_slot_bytes == 128 * MIB
    # 1.57 GiB × 1.1 = 1.73 GiB: a 2 GiB block
    assert sizes.layer_slots == 8 and sizes.layer_slot_bytes == 2 * 2**30
    assert sizes.row_slots == 2 and sizes.row_slot_bytes == 128 * MIB  # 96 MiB of embedding rows
    assert sizes.total_bytes == 22 * 128 * MIB + 8 * 2**30 * 2 + 2 * 128 * MIB
    assert "19.0 GiB of pinned CPU memory up front" in sizes.describe()
    assert "22 × 128 MiB layer inputs, 8 × 2 GiB offloaded layers, 2 × 128 MiB embedding rows" in sizes.describe()


def test_nothing_kept_in_cpu_memory_needs_no_pinned_memory_and_small_rotary_tables_take_no_room():
    assert pinned_sizes(hidden_size=4096, head_dim=128, tokens=12288, element_bytes=2, checkpointed_inputs=0,
                        offloaded_layers=0, layer_bytes=0.0, embedding_rows=False) is None
    # 2,048 tokens × 64 × 4 bytes = 512 KiB of cos (under the 1 MiB floor: stays on the GPU); 2,048 × 1,024 × 4 =
    # 8 MiB of fp32 hidden states
    sizes = pinned_sizes(hidden_size=1024, head_dim=64, tokens=2048, element_bytes=4, checkpointed_inputs=3,
                         offloaded_layers=0, layer_bytes=0.0, embedding_rows=False)
    assert (sizes.checkpoint_slots, sizes.checkpoint_slot_bytes, sizes.layer_slots, sizes.row_slots) == \
        (3, 8 * MIB, 0, 0)


def test_the_plan_sizes_pinned_memory_for_what_it_offloads_and_says_so():
    plan = plan_training(catalogue_config("llama-3.1-8b"), TrainConfig(**SEED_BUDGET), hardware=LINKED, world=1)
    assert (plan.offloaded_layers, plan.checkpointed_layers, plan.embeddings_on_cpu) == (8, 22, True)
    assert plan.pinned.checkpoint_slots == 22 and plan.pinned.layer_slots == 8 and plan.pinned.row_slots == 2
    assert plan.pinned.checkpoint_slot_bytes == 128 * MIB
    assert "GiB of pinned CPU memory up front" in describe(plan)
    assert plan.to_dict()["pinned"]["layer_slots"] == 8  # in run.json's plan


def test_a_plan_that_offloads_nothing_reserves_no_pinned_memory():
    plan = plan_training(catalogue_config("llama-3.1-8b"), TrainConfig(method="lora"), hardware=LINKED, world=1)
    assert plan.checkpointed_layers == 0 and plan.pinned is None


def test_pinned_memory_the_machine_cannot_hold_is_one_message_before_loading():
    small = replace(LINKED, host_memory_gib=16.0)
    with pytest.raises(UserError, match=r"pinned CPU memory.*16\.0 GiB of CPU memory available"):
        plan_training(catalogue_config("llama-3.1-8b"), TrainConfig(**SEED_BUDGET), hardware=small, world=1)
    unknown = replace(LINKED, host_memory_gib=None)  # not measured (a catalogue GPU): not checked
    assert plan_training(catalogue_config("llama-3.1-8b"), TrainConfig(**SEED_BUDGET), hardware=unknown,
                         world=1).pinned is not None


def test_a_slot_hands_out_aligned_tensors_of_the_asked_layout_until_it_is_full():
    slot = Slot(_plain(3 * 4096))
    a = slot.carve((4, 100), (100, 1), torch.float32)  # 1,600 bytes: the next one starts at 4,096
    b = slot.carve((8, 64), (1, 8), torch.bfloat16)  # a transpose's strides are kept
    assert a.shape == (4, 100) and b.stride() == (1, 8) and b.dtype == torch.bfloat16
    assert b.data_ptr() - a.data_ptr() == 4096
    assert slot.carve((4096,), (1,), torch.uint8) is not None
    assert slot.carve((1,), (1,), torch.uint8) is None  # full
    slot.clear()
    assert slot.carve((3 * 4096,), (1,), torch.uint8).data_ptr() == a.data_ptr()


def test_a_slot_comes_back_when_its_group_is_garbage_and_a_pool_without_free_slots_says_none():
    pool = PinnedPool(PinnedSizes(2, 4096, 0, 0, 0, 0), allocate=_plain)

    class Group:
        pass

    first, second = Group(), Group()
    assert pool.take(first, "checkpoint") is not None and pool.take(second, "checkpoint") is not None
    assert pool.take(Group(), "checkpoint") is None and pool.take(Group(), "layer") is None
    del first
    gc.collect()
    assert pool.free_slots("checkpoint") == 1


def test_offloaded_layers_in_pool_slots_give_the_same_loss_and_gradients_and_give_the_slots_back(monkeypatch):
    monkeypatch.setattr(offload, "SMALLEST_OFFLOADED", 0)  # the tiny model's tensors are far under 1 MiB
    model = tiny_lora_model(4, dropout=0.1)
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    set_checkpointing(model, 2, offload=True, offloaded_layers=1)
    plain_loss, plain = seeded_loss_and_grads(model, ids)
    pool = PinnedPool(PinnedSizes(2, 1 * MIB, 1, 4 * MIB, 0, 0), allocate=_plain)
    offloader = set_checkpointing(model, 2, offload=True, offloaded_layers=1, pool=pool)
    for _ in range(3):  # every step reuses the same slots
        loss, grads = seeded_loss_and_grads(model, ids)
        assert torch.equal(loss, plain_loss)
        for name, g in grads.items():
            assert torch.allclose(g, plain[name], atol=1e-6, rtol=1e-5), name
        gc.collect()
        assert pool.free_slots("checkpoint") == 2 and pool.free_slots("layer") == 1
    assert offloader.offloaded > 3 and pool.misses == 0


def test_tensors_that_do_not_fit_their_slot_get_memory_of_their_own_and_are_counted(monkeypatch):
    monkeypatch.setattr(offload, "SMALLEST_OFFLOADED", 0)
    model = tiny_lora_model(3)
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    set_checkpointing(model, 3, offload=True)
    plain_loss, plain = seeded_loss_and_grads(model, ids)
    pool = PinnedPool(PinnedSizes(1, 4096, 0, 0, 0, 0), allocate=_plain)  # one slot, too small for an input
    set_checkpointing(model, 3, offload=True, pool=pool)
    loss, grads = seeded_loss_and_grads(model, ids)
    assert torch.equal(loss, plain_loss) and all(torch.allclose(g, plain[n], atol=1e-6) for n, g in grads.items())
    assert pool.misses >= 3 and pool.miss_bytes > 0  # the first group's tensor did not fit, the others had no slot


def test_embedding_rows_take_the_buffers_in_turn_and_wait_for_a_buffers_previous_copy():
    _Marker.waited = 0
    pool = PinnedPool(PinnedSizes(0, 0, 0, 0, 2, 8192), allocate=_plain, event=_Marker)
    first = pool.rows((2, 512), torch.bfloat16)  # 2 KiB
    pool.rows_sent()
    second = pool.rows((1, 1024), torch.bfloat16)
    pool.rows_sent()
    assert first.data_ptr() != second.data_ptr() and second.is_contiguous() and _Marker.waited == 0
    third = pool.rows((3, 100), torch.bfloat16)  # the first buffer again, once its copy is done
    assert third.data_ptr() == first.data_ptr() and _Marker.waited == 1
    assert pool.rows((1, 8192), torch.bfloat16) is None and pool.misses == 1  # 16 KiB: too long a row
    pool.rows_sent()  # nothing handed out: nothing to mark
    assert PinnedPool(PinnedSizes(1, 4096, 0, 0, 0, 0), allocate=_plain).rows((1, 4), torch.float32) is None
