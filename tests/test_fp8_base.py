"""FP8 frozen base for LoRA (src/tunesmith/train/fp8.py) through its CPU twin: the same autograd Function with the
FP8 product emulated in fp32, so quantisation, scales, padding, gradients, the PEFT wiring, saving and merging are
checked without a GPU (tests/gpu/test_fp8_base_cuda.py runs torch._scaled_mm itself)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from advise_fixtures import catalogue_config
from records_fixtures import write_train_run
from tunesmith.config import TrainConfig
from tunesmith.errors import UserError
from tunesmith.hardware.catalog import GPUS
from tunesmith.hardware.machine import Hardware
from tunesmith.hardware.memory import architecture_from_config
from tunesmith.train.fp8 import FP8, FP8_MAX, Fp8FrozenLinear, quantize_frozen_base, quantize_rows
from tunesmith.train.plan import plan_training

H200 = Hardware.from_catalog(GPUS["h200"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# --- quantisation --------------------------------------------------------------------------------------------------


def test_rows_are_scaled_so_their_largest_value_is_e4m3s_largest_and_round_trip_within_its_rounding():
    torch.manual_seed(0)
    # rows of very different magnitudes: one scale per row keeps each row's relative precision
    t = torch.randn(8, 64) * torch.logspace(-4, 3, 8).unsqueeze(1)
    q, scale = quantize_rows(t)

    assert q.dtype == FP8 and scale.shape == (8, 1) and scale.dtype == torch.float32
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), FP8_MAX))
    torch.testing.assert_close(scale.squeeze(1), t.abs().amax(dim=1) / FP8_MAX)
    # e4m3 keeps 3 mantissa bits: a value is off by at most 2^-4 of itself (normal range), so by at most 2^-4 of
    # its row's largest
    error = (q.float() * scale - t).abs()
    assert bool((error <= t.abs().amax(dim=1, keepdim=True) * 2**-4 + 1e-30).all())


def test_an_all_zero_row_quantises_to_zeros_and_nothing_becomes_nan():
    t = torch.zeros(3, 32)
    t[1] = torch.linspace(-1e6, 1e6, 32)  # far beyond e4m3's 448 before scaling
    q, scale = quantize_rows(t)
    back = q.float() * scale
    assert not torch.isnan(back).any()
    assert torch.equal(back[0], torch.zeros(32)) and torch.equal(back[2], torch.zeros(32))


# --- the layer -----------------------------------------------------------------------------------------------------


def _layer(bias: bool = False) -> tuple[torch.nn.Linear, Fp8FrozenLinear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=bias)
    return linear, Fp8FrozenLinear(linear)


def test_forward_is_the_product_of_the_row_quantised_input_and_weight():
    linear, fp8 = _layer()
    x = torch.randn(2, 16, 64)
    qx, sx = quantize_rows(x.reshape(-1, 64))
    qw, sw = quantize_rows(linear.weight.detach())
    want = ((qx.float() * sx) @ (qw.float() * sw).t()).reshape(2, 16, 48)

    got = fp8(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and close to the full-precision layer: FP8 rounding of both operands, a few percent
    assert _rel(got, linear(x).detach()) < 0.06


def test_token_counts_that_are_not_a_multiple_of_16_are_padded_without_changing_any_row():
    _, fp8 = _layer()
    x = torch.randn(32, 64, requires_grad=True)
    full = fp8(x)
    for m in (1, 13, 17, 31):
        part = x[:m].detach().clone().requires_grad_()
        out = fp8(part)
        assert out.shape == (m, 48)
        # each row is quantised on its own, so the padded rows change nothing in the real ones
        torch.testing.assert_close(out, full[:m], rtol=0, atol=0)
        grad = torch.randn(m, 48)
        out.backward(grad)
        padded_grad = torch.zeros(32, 48)
        padded_grad[:m] = grad
        (ref,) = torch.autograd.grad(fp8(x), x, padded_grad)
        torch.testing.assert_close(part.grad, ref[:m], rtol=0, atol=0)


def test_a_transposed_input_or_gradient_gives_row_major_fp8_operands_and_the_same_result():
    _, fp8 = _layer()
    x = torch.randn(64, 32).t()  # (32, 64), column-major
    q, _ = quantize_rows(x)
    assert q.is_contiguous(), "_scaled_mm takes its first operand row-major only"
    torch.testing.assert_close(fp8(x), fp8(x.contiguous()), rtol=0, atol=0)
    leaf = x.detach().clone().requires_grad_()
    grad = torch.randn(48, 32).t()
    fp8(leaf).backward(grad)
    plain = x.contiguous().requires_grad_()
    fp8(plain).backward(grad.contiguous())
    torch.testing.assert_close(leaf.grad, plain.grad, rtol=0, atol=0)


def test_backward_gives_the_input_gradient_through_fp8_and_no_weight_gradient():
    linear, fp8 = _layer()
    x = torch.randn(24, 64, requires_grad=True)
    grad = torch.randn(24, 48)
    fp8(x).backward(grad)

    # grad_x = (grad_y · diag(s_w)) W_q, with the scaled grad_y quantised per row
    qw, sw = quantize_rows(linear.weight.detach())
    qg, sg = quantize_rows(torch.nn.functional.pad(grad * sw.reshape(1, -1), (0, 0, 0, 8)))
    want = ((qg.float() @ qw.float()) * sg)[:24]
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)
    assert _rel(x.grad, grad @ linear.weight.detach()) < 0.06
    assert list(fp8.parameters()) == [], "the frozen weight is a buffer: nothing for an optimizer or a gradient"
    assert not fp8.weight_fp8.requires_grad and fp8.weight_fp8.grad is None


def test_a_bias_is_added_in_full_precision_and_can_train():
    _, fp8 = _layer(bias=True)
    x = torch.randn(5, 64)
    torch.testing.assert_close(fp8(x) - fp8.bias, _without_bias(fp8)(x))
    fp8(x).sum().backward()
    torch.testing.assert_close(fp8.bias.grad, torch.full((48,), 5.0))


def _without_bias(fp8: Fp8FrozenLinear) -> Fp8FrozenLinear:
    plain = torch.nn.Linear(fp8.in_features, fp8.out_features, bias=False)
    with torch.no_grad():
        plain.weight.copy_(fp8.dequantized_weight())
    return Fp8FrozenLinear(plain)


# --- the model: PEFT wiring, gradients, saving ---------------------------------------------------------------------


def _tiny(targets: list[str] | None = None):
    """A 2-layer Llama with LoRA as prepare_model builds it with an FP8 base (the plan's facts for an H200, the
    products emulated on the CPU), and the same model with its base in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.train.model import prepare_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, **({"target_modules": targets} if targets else {})}
    tcfg = TrainConfig(method="lora", gradient_checkpointing=False, compile=False, lora=lora)
    cpu = plan_training(cfg, tcfg, hardware=Hardware.cpu(), world=1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    reference = LlamaForCausalLM(cfg)
    reference.load_state_dict(base.state_dict())
    fp8 = prepare_model(base, tcfg.model_copy(update={"base_precision": "fp8"}), replace(cpu, fp8_base=True))
    plain = prepare_model(reference, tcfg, cpu)
    # the same non-zero adapters in both (B starts at zero: give it values so its product matters)
    torch.manual_seed(1)
    with torch.no_grad():
        same = dict(plain.named_parameters())
        for name, p in fp8.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            same[name].copy_(p)
    return fp8.train(), plain.train()


def test_every_decoder_block_linear_layer_becomes_fp8_under_peft_and_the_head_does_not():
    from peft.tuners.lora import LoraLayer

    fp8, _ = _tiny(targets=["q_proj", "v_proj"])
    blocks = fp8.base_model.model.model.layers
    for block in blocks:
        # adapted: PEFT's layer keeps its adapters, its base_layer is ours
        assert isinstance(block.self_attn.q_proj, LoraLayer)
        assert isinstance(block.self_attn.q_proj.base_layer, Fp8FrozenLinear)
        # not adapted: replaced in place
        for name in ("k_proj", "o_proj"):
            assert isinstance(getattr(block.self_attn, name), Fp8FrozenLinear)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(getattr(block.mlp, name), Fp8FrozenLinear)
        assert type(block.self_attn.q_proj.lora_A["default"]) is torch.nn.Linear
    assert type(fp8.base_model.model.lm_head) is torch.nn.Linear
    assert sum(isinstance(m, Fp8FrozenLinear) for m in fp8.modules()) == 2 * 7
    # no bf16/fp32 copy of a swapped weight is left as a parameter
    frozen = [n for n, p in fp8.named_parameters() if not p.requires_grad]
    assert all("embed" in n or "norm" in n or "lm_head" in n for n in frozen), frozen


def test_adapter_gradients_on_the_fp8_base_point_where_the_full_precision_bases_do():
    fp8, plain = _tiny()
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (2, 37))  # 74 tokens: padded to 80 in every product
    out = fp8(input_ids=ids, labels=ids, use_cache=False)
    ref = plain(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    ref.loss.backward()

    assert _rel(out.logits.detach(), ref.logits.detach()) < 0.05
    grads = {n: p.grad for n, p in fp8.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads.keys() == want.keys() and all("lora_" in n for n in grads)
    flat, flat_want = torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in want.values()])
    assert _cosine(flat, flat_want) >= 0.99
    # every adapter got a gradient through the FP8 input-gradient product of the layers above it
    assert all(float(g.abs().sum()) > 0 for g in grads.values())


def test_compiled_decoder_layers_on_the_fp8_base_compute_what_eager_ones_do():
    """torch.compile of each decoder layer, with dynamic token counts, as the plan compiles LoRA layers on a GPU:
    q, k and v call the FP8 Function on one input, which the compiler must trace (an earlier version failed)."""
    from tunesmith.train.model import compile_decoder_layers

    fp8, _ = _tiny()
    eager, _ = _tiny()
    compile_decoder_layers(fp8)
    ids = torch.randint(3, 300, (1, 21))  # 21 tokens: padded inside
    got = fp8(input_ids=ids, labels=ids, use_cache=False)
    want = eager(input_ids=ids, labels=ids, use_cache=False)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in fp8.named_parameters() if p.requires_grad}
    for name, p in eager.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-6)


def test_saved_adapter_holds_only_the_adapters(tmp_path):
    fp8, _ = _tiny()
    fp8.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys
    assert dtypes == {"F32"}


def test_quantize_frozen_base_counts_what_it_swapped_and_leaves_odd_sized_layers_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=120, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    model = LlamaForCausalLM(cfg)
    # 120 is not a multiple of 16: the three MLP projections stay as they are, the four attention ones swap
    assert quantize_frozen_base(model) == 4
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


# --- merge -------------------------------------------------------------------------------------------------------


def test_merge_of_an_fp8_base_run_uses_the_base_from_disk_and_warns_with_the_drift(tiny_model_dir, tmp_path):
    from test_merge import make_adapter
    from tunesmith.export import merge

    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter")
    record = write_train_run(run, tiny_model_dir)
    record.model_copy(update={"fp8_base": True}).write(run)

    result = merge(run, tmp_path / "merged")

    # merged into the stored fp32 base, parity checked against that base + adapter as for any LoRA run
    assert result.dtype == "float32" and result.parity.passed and result.parity.conclusive
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
    drift = result.fp8_base_drift
    assert drift is not None and drift["max_abs_diff"] > result.parity.max_abs_diff and drift["top1_agreement"] > 0
    assert any("FP8" in w and "top-1 agreement" in w for w in result.warnings)


def test_merge_of_a_bf16_base_run_reports_no_fp8_drift(tiny_model_dir, tmp_path):
    from test_merge import make_adapter
    from tunesmith.export import merge

    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter")
    write_train_run(run, tiny_model_dir)
    result = merge(run, tmp_path / "merged")
    assert result.fp8_base_drift is None and not any("FP8" in w for w in result.warnings)


# --- config, plan and memory model -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "says"), [("full", "matmul_precision fp8"), ("qlora", "4 bits")])
def test_config_refuses_an_fp8_base_outside_lora(method, says):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        TrainConfig(method=method, base_precision="fp8")


def _plan(hardware: Hardware = H200, world: int = 1, **train):
    tcfg = TrainConfig(method="lora", per_device_train_batch_size=4, max_length=2048, packed_row_tokens=12288,
                       memory_limit_gb=22.99, **train)
    return plan_training(catalogue_config("llama-3.1-8b"), tcfg, hardware=hardware, world=world)


@pytest.mark.parametrize(("hardware", "says"), [(Hardware.cpu(), "the CPU has none"),
                                                (Hardware.from_catalog(GPUS["a100-80gb"]), "a100-80gb"),
                                                (Hardware.from_catalog(GPUS["t4"]), "t4")])
def test_plan_refuses_an_fp8_base_without_fp8_tensor_cores(hardware, says):
    with pytest.raises(UserError, match=r"compute capability 8\.9") as err:
        _plan(hardware, base_precision="fp8", **({"precision": "fp32"} if hardware.device == "cpu" else {}))
    assert says in str(err.value) and "base_precision: auto" in err.value.hint


def test_plan_refuses_an_fp8_base_on_several_gpus_or_without_bf16():
    with pytest.raises(UserError, match="one GPU"):
        _plan(world=2, base_precision="fp8")
    with pytest.raises(UserError, match="bf16"):
        _plan(base_precision="fp8", precision="fp16")


def test_fp8_base_is_half_the_block_weights_in_the_memory_model_and_the_plan_keeps_more_layers():
    bf16, fp8 = _plan(), _plan(base_precision="fp8")
    assert not bf16.fp8_base and fp8.fp8_base
    assert "FP8 base" in fp8.master_weights
    assert Hardware.from_catalog(GPUS["l4"]).fp8 and not Hardware.from_catalog(GPUS["a100-80gb"]).fp8

    from tunesmith.hardware.memory import estimate_memory

    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    kwargs = dict(lora_trainable=0, checkpointing="full", compiled=True)
    saved = (estimate_memory(arch, "lora", 1, 12288, **kwargs).weights_gib
             - estimate_memory(arch, "lora", 1, 12288, fp8_base=True, **kwargs).weights_gib)
    assert saved == pytest.approx(arch.quantizable_params / 2**30, rel=1e-6)  # 1 byte per block weight
    # the freed GiB go to layers kept for backward (not recomputed) within the same budget
    assert fp8.checkpointed_layers + fp8.offloaded_layers < bf16.checkpointed_layers + bf16.offloaded_layers
    assert fp8.estimate_gib <= fp8.budget_gib
