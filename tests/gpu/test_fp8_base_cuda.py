"""FP8 frozen base for LoRA on FP8 tensor cores (torch._scaled_mm; src/tunesmith/train/fp8.py): the CUDA product
against its CPU twin's arithmetic and against the bf16 base — forward error, input gradients, adapter-gradient
cosine on a fixed batch, a compiled layer, and a short learnable training run's loss against bf16's.

Skipped without a GPU of compute capability 8.9 or later (no FP8 tensor cores)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")

LOSS_TOLERANCE = 0.05
"""The FP8 run's loss may differ from the bf16 run's by at most 5% at any step of the short run below: FP8 rounds
both operands of every base product (e4m3: 3 mantissa bits, ~2-4% relative error per product measured on the
CPU twin), and the adapters learn around it."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _emulated(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The CPU twin's arithmetic on the same operands: row-quantised x and W, dequantised, fp32 product."""
    from tunesmith.train.fp8 import quantize_rows

    qx, sx = quantize_rows(x.reshape(-1, x.shape[-1]))
    qw, sw = quantize_rows(weight)
    return (qx.float() * sx) @ (qw.float() * sw).t()


def test_scaled_mm_computes_the_twins_product_with_row_scales_and_padding():
    from tunesmith.train.fp8 import Fp8FrozenLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8FrozenLinear(linear)
    # 1000 tokens (padded to 1008 inside), rows of very different magnitudes: each row's own scale matters
    x = (torch.randn(1000, 4096, device="cuda") * torch.logspace(-2, 2, 1000, device="cuda").unsqueeze(1))
    x = x.to(torch.bfloat16).requires_grad_()
    y = fp8(x)
    assert y.dtype == torch.bfloat16 and y.shape == (1000, 1024)
    # bf16 output rounding only, against the same FP8 operands multiplied in fp32
    assert _rel(y, _emulated(x.detach().float(), linear.weight.detach().float())) < 1e-2
    assert _rel(y, linear(x).detach()) < 0.06

    grad = torch.randn(1000, 1024, device="cuda", dtype=torch.bfloat16)
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16
    assert _rel(x.grad, grad.float() @ linear.weight.detach().float()) < 0.06
    assert fp8.weight_fp8.grad is None


def _models(compile_layers: bool = False):
    """A 2-layer Llama in bf16 with LoRA on all seven projections, as prepare_model builds it on this GPU with an
    FP8 base, and the same weights and adapters on the bf16 base."""
    from dataclasses import replace

    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import TrainConfig
    from tunesmith.train.measure import measure_hardware
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import plan_training

    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)
    tcfg = TrainConfig(method="lora", gradient_checkpointing=False, compile=compile_layers,
                       lora={"r": 16, "alpha": 32, "dropout": 0.0})
    hardware = measure_hardware(torch.device("cuda", 0))
    plans = {bp: plan_training(cfg, tcfg.model_copy(update={"base_precision": bp}), hardware=hardware, world=1)
             for bp in ("auto", "fp8")}
    assert plans["fp8"].fp8_base and not plans["auto"].fp8_base
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    twin = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    twin.load_state_dict(base.state_dict())
    fp8 = prepare_model(base, tcfg.model_copy(update={"base_precision": "fp8"}), plans["fp8"])
    bf16 = prepare_model(twin, tcfg, replace(plans["auto"], compile_layers=compile_layers))
    torch.manual_seed(1)
    with torch.no_grad():  # the same non-zero adapters in both
        same = dict(bf16.named_parameters())
        for name, p in fp8.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
            same[name].copy_(p)
    return fp8.train(), bf16.train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad])
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("compile_layers", [False, True], ids=["eager", "compiled"])
def test_adapter_gradients_on_the_fp8_base_match_the_bf16_base_on_a_fixed_batch(compile_layers):
    from tunesmith.train.fp8 import Fp8FrozenLinear

    fp8, bf16 = _models(compile_layers)
    assert sum(isinstance(m, Fp8FrozenLinear) for m in fp8.modules()) == 2 * 7
    torch.manual_seed(2)
    ids = torch.randint(3, 1000, (4, 250), device="cuda")  # 1000 tokens: not a multiple of 16 per row
    loss, logits, grads = _loss_and_grads(fp8, ids)
    ref_loss, ref_logits, ref_grads = _loss_and_grads(bf16, ids)

    # e4m3 keeps 3 mantissa bits: each rounded operand is off by ~2⁻⁴/√3 ≈ 3.6% RMS, so each product's output by
    # ~√2 × 3.6% ≈ 5%, and two decoder layers of seven products each compound to ~8% on the logits (measured 8.4%
    # on an H200); the loss and the adapters' gradients, which training follows, are held much closer
    assert _rel(logits, ref_logits) < 0.12
    assert abs(float(loss - ref_loss)) / float(ref_loss) < 0.01
    cosine = float(torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0))
    assert cosine >= 0.99, cosine


def test_a_short_learnable_run_on_the_fp8_base_follows_the_bf16_runs_loss():
    fp8, bf16 = _models()
    torch.manual_seed(3)
    # four fixed sequences, learned by heart: a loss that falls within 40 steps
    ids = torch.randint(3, 1000, (4, 128), device="cuda")
    curves = {}
    for name, model in (("fp8", fp8), ("bf16", bf16)):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=3e-3)
        curve = []
        for _ in range(40):
            loss, _, _ = _loss_and_grads(model, ids)
            optimizer.step()
            curve.append(float(loss))
        curves[name] = curve
    assert curves["bf16"][-1] < 0.85 * curves["bf16"][0], curves["bf16"]  # it learned something
    worst = max(abs(a - b) / b for a, b in zip(curves["fp8"], curves["bf16"], strict=True))
    assert worst <= LOSS_TOLERANCE, (worst, curves)
