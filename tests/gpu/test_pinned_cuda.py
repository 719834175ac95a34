"""Pinned CPU memory allocated up front (src/tunesmith/train/pinned.py), on a GPU: once the pool is allocated, steps
with rows of different lengths page-lock nothing more (torch's host allocator creates no block) and give the same
loss and gradients as memory allocated as the steps ask (run on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIB = 2**20


def _host() -> dict:
    torch.cuda.synchronize()
    return torch.cuda.memory.host_memory_stats()


def _warm_scalars() -> None:
    """``.item()`` copies through a small pinned block of its own (one per size): created here, before counting."""
    for dtype in (torch.float32, torch.float64, torch.int64, torch.int32, torch.bfloat16):
        torch.ones((), device="cuda", dtype=dtype).item()


def _model(layers: int, hidden: int = 512):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.train.kernels import attention_implementation

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=2000, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.config._attn_implementation = attention_implementation("cuda", packing=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, lora), cfg


def _rows(lengths: list[int], seed: int):
    from tunesmith.chat import TokenizedChat
    from tunesmith.train.batching import micro_batches

    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 2000, (n,), generator=gen).tolist() for n in lengths]
    (batch,) = micro_batches([TokenizedChat(s, list(s)) for s in seqs], range(len(seqs)), 2, 2048, 0, packed=True)
    return batch.to(torch.device("cuda"))


def test_offloaded_steps_of_different_lengths_allocate_no_pinned_memory_beyond_the_pool():
    """Two checkpointed layers with their inputs in CPU memory, one offloaded whole, embedding rows looked up in
    CPU memory: three steps whose rows are 3,900, 2,500 and 4,000 tokens (buckets of 4 and 2 MiB for torch's
    allocator) after the pool is allocated — no new host block, no miss — and each step's loss and gradients
    equal those of the same step with memory allocated on demand."""
    from tunesmith.train.loss import loss_sum
    from tunesmith.train.model import embeddings_to, set_checkpointing
    from tunesmith.train.pinned import PinnedPool, pinned_sizes

    model, cfg = _model(3)
    embeddings_to(model, "cpu")
    batches = [_rows([1500, 1400, 1000], 1), _rows([900, 1600], 2), _rows([2000, 1200, 800], 3)]
    # one layer offloaded whole saves ~20 tensors of up to 4,000 × 1,024 × 2 bytes: 160 MiB is ample
    sizes = pinned_sizes(hidden_size=cfg.hidden_size, head_dim=cfg.hidden_size // 8, tokens=4096, element_bytes=2,
                         checkpointed_inputs=2, offloaded_layers=1, layer_bytes=160 * MIB, embedding_rows=True)
    _warm_scalars()

    def step(batch, pool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = loss_sum(model, batch, fused=False, pinned=pool)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    pool = PinnedPool(sizes)
    set_checkpointing(model, 2, True, offloaded_layers=1, pool=pool)
    before = _host()
    pooled = [step(b, pool) for b in batches]
    after = _host()
    assert after["num_host_alloc"] == before["num_host_alloc"], (before["num_host_alloc"], after["num_host_alloc"])
    assert pool.misses == 0, pool.stats()
    gc.collect()
    assert pool.free_slots("checkpoint") == 2 and pool.free_slots("layer") == 1  # all given back after backward

    set_checkpointing(model, 2, True, offloaded_layers=1)  # the control: torch's allocator, as the steps ask
    for (loss, grads), batch in zip(pooled, batches, strict=True):
        plain_loss, plain = step(batch, None)
        _, again = step(batch, None)
        assert loss.item() == plain_loss.item()
        # the attention kernel's backward adds in a varying order (bf16): the pooled step may differ from the
        # control by what the control differs from itself, never more (a slot overwritten early would be far more)
        noise = _largest_relative_difference(again, plain)
        assert _largest_relative_difference(grads, plain) <= 2 * noise + 1e-3, noise


def _largest_relative_difference(grads: dict, reference: dict) -> float:
    return max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in reference.items())


def test_the_loop_with_the_plans_pool_takes_no_pinned_memory_during_its_first_steps(tmp_path):
    """The product's path: the plan sizes the pool (every layer checkpointed with its input in CPU memory, one
    offloaded whole, the embeddings in CPU memory), ``prepare_model`` gives it to the offloader and ``fit`` to the
    embedding lookup; from step 1 to step 3 torch's host allocator hands out no new pinned bytes (a single tensor
    allocated outside the pool would be ≥ 1 MiB) and no tensor misses its slot."""
    from transformers import LlamaForCausalLM

    from tunesmith.chat import TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.train import StepSetup, fit
    from tunesmith.train.distributed import init_processes
    from tunesmith.train.kernels import attention_implementation
    from tunesmith.train.loss import fused_head_supported
    from tunesmith.train.measure import measure_hardware
    from tunesmith.train.model import embeddings_to, prepare_model
    from tunesmith.train.pinned import PinnedPool
    from tunesmith.train.plan import describe, plan_training

    _, cfg = _model(4)
    tcfg = TrainConfig(method="lora", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=2048,
                       max_steps=4, logging_steps=1, save_strategy="no", eval_strategy="no", seed=0, compile=False,
                       gradient_checkpointing=True, offload_checkpoints=True, offload_layers=1,
                       embeddings_on_cpu=True)
    plan = plan_training(cfg, tcfg, hardware=measure_hardware(torch.device("cuda")), world=1)
    assert plan.pinned is not None, describe(plan)
    assert (plan.pinned.checkpoint_slots, plan.pinned.layer_slots, plan.pinned.row_slots) == (3, 1, 2)
    assert "pinned CPU memory up front" in describe(plan)

    pool = PinnedPool(plan.pinned)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", plan.precision.weights)
    model.config._attn_implementation = attention_implementation("cuda", packing=True)
    model = prepare_model(model, tcfg, plan, pinned=pool)
    embeddings_to(model, "cpu")
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(200, 2048, (16,), generator=gen).tolist()
    examples = [TokenizedChat(s, list(s)) for s in (torch.randint(3, 2000, (n,), generator=gen).tolist()
                                                     for n in lengths)]
    setup = StepSetup(procs=init_processes(), precision=plan.precision, optimizer=plan.optimizer, pad_id=0,
                      packed=True, fused_loss=fused_head_supported(model), pinned=pool)
    seen: list[dict] = []
    _warm_scalars()
    before = _host()
    fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=[], out=tmp_path / "run",
        emit=lambda e: seen.append(_host()) if e.get("event") == "step" else None)
    assert len(seen) == 4
    grown = seen[2]["allocated_bytes.allocated"] - before["allocated_bytes.allocated"]
    assert grown < MIB, (grown, seen[2]["num_host_alloc"] - before["num_host_alloc"], pool.stats())
    assert pool.misses == 0, pool.stats()
