"""Full fine-tuning with FP8 products (torchao float8 training; src/tunesmith/train/fp8_training.py) on FP8
tensor cores, against the same model in bf16: the conversion as prepare_model builds it, the forward and every
weight's gradient on a fixed batch (eager, compiled, checkpointed), and a short learnable run through tunesmith's
own loop whose loss must follow bf16's.

Skipped without a GPU of compute capability 8.9 or later (no FP8 tensor cores) or without torchao."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")
pytest.importorskip("torchao.float8")

LOSS_TOLERANCE = 0.05
"""The FP8 run's loss may differ from the bf16 run's by at most 5% at any step of the short run below: every
product of the decoder blocks rounds both operands to e4m3 (3 mantissa bits: ~3.6% RMS per operand, ~5% per
product), and training follows the loss, which averages those errors over every token."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)


def _models(*, compile_layers: bool = False, checkpointing: bool = False):
    """A 2-layer Llama in bf16 (the adamw_8bit_bf16 layout) as prepare_model builds it on this GPU with FP8
    products, and the same weights built without them."""
    from transformers import LlamaForCausalLM

    from tunesmith.config import TrainConfig
    from tunesmith.train.measure import measure_hardware
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import plan_training

    cfg = _config()
    tcfg = TrainConfig(method="full", gradient_checkpointing=checkpointing, compile=compile_layers,
                       optim="adamw_8bit_bf16")
    hardware = measure_hardware(torch.device("cuda", 0))
    plans = {mp: plan_training(cfg, tcfg.model_copy(update={"matmul_precision": mp}), hardware=hardware, world=1)
             for mp in ("auto", "fp8")}
    assert plans["fp8"].fp8_matmuls and not plans["auto"].fp8_matmuls
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    twin = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    twin.load_state_dict(base.state_dict())
    fp8 = prepare_model(base, tcfg.model_copy(update={"matmul_precision": "fp8"}), plans["fp8"])
    bf16 = prepare_model(twin, tcfg, plans["auto"])
    return fp8.train(), bf16.train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.float().flatten() for n, p in model.named_parameters()}
    return out.loss.detach(), out.logits.detach(), grads


def test_prepare_model_converts_every_block_linear_layer_and_keeps_the_head():
    from torchao.float8.float8_linear import Float8Linear

    from tunesmith.train.fp8_training import fp8_layer_names

    fp8, _ = _models()
    modules = dict(fp8.named_modules())
    names = fp8_layer_names(fp8)
    assert len(names) == 2 * 7 and all(type(modules[n]) is Float8Linear for n in names)
    assert type(fp8.lm_head) is torch.nn.Linear
    assert all(p.dtype == torch.bfloat16 for p in fp8.parameters())


@pytest.mark.parametrize(("compile_layers", "checkpointing"), [(False, False), (True, True)],
                         ids=["eager", "compiled+checkpointed"])
def test_weight_gradients_with_fp8_products_match_bf16_on_a_fixed_batch(compile_layers, checkpointing):
    fp8, bf16 = _models(compile_layers=compile_layers, checkpointing=checkpointing)
    torch.manual_seed(2)
    ids = torch.randint(3, 1000, (4, 250), device="cuda")  # 1000 tokens: the weight gradients pad to 1008
    loss, logits, grads = _loss_and_grads(fp8, ids)
    ref_loss, ref_logits, ref_grads = _loss_and_grads(bf16, ids)
    # e4m3 rounds each operand by ~3.6% RMS: ~5% per product, compounding over two layers of seven products on
    # the logits; the loss, an average over every token, is held much closer
    assert _rel(logits, ref_logits) < 0.15
    assert abs(float(loss - ref_loss)) / float(ref_loss) < 0.01
    block = [n for n in grads if ".layers." in n and n.endswith("proj.weight")]
    assert len(block) == 2 * 7
    worst = min(float(torch.nn.functional.cosine_similarity(grads[n], ref_grads[n], dim=0)) for n in block)
    whole = float(torch.nn.functional.cosine_similarity(torch.cat(list(grads.values())),
                                                        torch.cat(list(ref_grads.values())), dim=0))
    assert worst >= 0.95, worst  # the weight gradient's own FP8 product: each block weight, one by one
    assert whole >= 0.99, whole


def test_a_short_learnable_run_through_the_loop_follows_the_bf16_runs_loss(tmp_path):
    """tunesmith's loop (fit) with the plan's optimizer on bf16 weights, packed rows of odd lengths, compiled layers:
    the same examples with and without FP8 products."""
    from tunesmith.chat import TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.train import StepSetup, fit
    from tunesmith.train.distributed import init_processes
    from tunesmith.train.plan import Precision

    procs = init_processes()
    torch.manual_seed(3)
    # 32 sequences, each repeating its own 16-token motif: a loss that falls within a few dozen steps
    seqs = []
    for k in range(32):
        motif = torch.randint(3, 1000, (16,)).tolist()
        seqs.append((motif * 20)[:150 + 7 * k])
    examples = [TokenizedChat(s, list(s)) for s in seqs]
    curves = {}
    for name, model in zip(("fp8", "bf16"), _models(compile_layers=True), strict=True):
        tcfg = TrainConfig(method="full", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           max_length=512, max_steps=24, logging_steps=1, save_strategy="no", eval_strategy="no",
                           learning_rate=2e-3, warmup_ratio=0.0, seed=0, optim="adamw_8bit_bf16")
        curve: list[float] = []

        def on_event(event: dict, curve: list[float] = curve) -> None:
            if event.get("event") == "step":
                curve.append(event["loss"])

        setup = StepSetup(procs=procs, precision=Precision(torch.bfloat16, torch.bfloat16),
                          optimizer="adamw_8bit_bf16", pad_id=0, packed=True, fused_loss=True)
        torch.manual_seed(4)  # the same stochastic rounding draws in both runs (fit leaves seeding to train)
        fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=[], out=tmp_path / name,
            emit=on_event)
        curves[name] = curve
    assert len(curves["fp8"]) == len(curves["bf16"]) == 24
    assert curves["bf16"][-1] < 0.8 * curves["bf16"][0], curves["bf16"]  # it learned
    assert curves["fp8"][-1] < 0.8 * curves["fp8"][0], curves["fp8"]
    worst = max(abs(a - b) / b for a, b in zip(curves["fp8"], curves["bf16"], strict=True))
    assert worst <= LOSS_TOLERANCE, (worst, curves)


def test_a_step_with_fp8_products_keeps_about_what_the_bf16_step_keeps():
    """The FP8 model's measured step peak against the bf16 twin's: bf16's saved activations and one product's FP8
    operands more, as src/tunesmith/hardware/memory.py counts them — not a second, FP8 copy of what is saved."""
    peaks = {}
    for name, model in zip(("fp8", "bf16"), _models(), strict=True):
        ids = torch.randint(3, 1000, (2, 512), device="cuda")
        _loss_and_grads(model, ids)  # gradients allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _loss_and_grads(model, ids)
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    # not more than bf16's step plus a quarter: saved tensors are bf16's, the FP8 casts live for one product
    assert peaks["fp8"] <= 1.25 * peaks["bf16"] + 8, peaks

