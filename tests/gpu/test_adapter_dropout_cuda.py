"""The adapters' fused dropout on a GPU (src/tunesmith/train/adapter_dropout.py; CPU checks of the same kernels in
Triton's interpreter: tests/test_adapter_dropout.py).

- The registered op in bf16 on the 8B shape's widths: output and both gradients equal autograd through the mask the
  kernel draws.
- A compiled, checkpointed LoRA model: the recomputation redraws the same masks (gradients equal the run without
  checkpointing; a different seed does not).
- Nothing the size of an adapter's input is kept for backward beyond the input itself.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize(("rows", "cols", "rank"), [(3001, 4096, 16), (1000, 14336, 16), (777, 4096, 8)])
def test_op_output_and_gradients_in_bf16_equal_autograd_through_the_kernels_mask(rows, cols, rank):
    from tunesmith.train import adapter_dropout as ad
    from tunesmith.train.adapter_dropout_kernels import keep_mask

    op = ad._dropout_linear_op()
    assert op is not None, "Triton is installed on this GPU machine"
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(rank, cols, device="cuda") * 0.02).requires_grad_()
    grad = torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16)
    seed, p = torch.tensor([2024], device="cuda", dtype=torch.int64), 0.05
    h = op(x, weight, seed, p)
    h.backward(grad)
    assert h.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16

    keep = keep_mask(rows, cols, seed, p)
    assert abs(keep.float().mean().item() - 0.95) < 0.002
    dropped = (x.detach().float() * keep / (1 - p)).to(torch.bfloat16).float()
    w16 = weight.detach().to(torch.bfloat16).float()
    assert _rel(h, dropped @ w16.T) < 1e-2
    assert _rel(weight.grad, grad.float().T @ dropped) < 1e-2
    dx = (grad.float() @ w16) * keep / (1 - p)
    assert _rel(x.grad, dx) < 1e-2
    assert (x.grad[~keep] == 0).all()


def _model(layers: int = 2, hidden: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import TrainConfig
    from tunesmith.train.adapter_dropout import DropoutLinear
    from tunesmith.train.measure import measure_hardware
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import plan_training

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048)
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    tcfg = TrainConfig(method="lora", gradient_checkpointing=False, compile=False,
                       lora={"r": 16, "alpha": 32, "dropout": 0.1})
    plan = plan_training(cfg, tcfg, hardware=measure_hardware(torch.device("cuda")), world=1)
    model = prepare_model(base, tcfg, plan).train()
    assert sum(isinstance(m, DropoutLinear) for m in model.modules()) == 7 * layers
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _loss_and_grads(model, ids: torch.Tensor, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_checkpointed_layers_redraw_the_same_masks_in_their_recomputation():
    from tunesmith.train.model import compile_decoder_layers, set_checkpointing

    model = _model()
    compile_decoder_layers(model)
    ids = torch.randint(3, 1000, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    set_checkpointing(model, 0)
    loss, grads = _loss_and_grads(model, ids, seed=1)
    set_checkpointing(model, 2)
    ck_loss, ck_grads = _loss_and_grads(model, ids, seed=1)
    other_loss, other_grads = _loss_and_grads(model, ids, seed=2)

    assert ck_loss == loss and other_loss != loss
    lora_a = [n for n in grads if "lora_A" in n]
    assert len(lora_a) == 14
    for name in grads:
        assert _rel(ck_grads[name], grads[name]) < 1e-3, name
    # another seed draws other masks: the adapters' first products see other inputs
    assert max(_rel(other_grads[n], grads[n]) for n in lora_a) > 0.05


def test_fused_dropout_keeps_only_the_shared_input_for_backward():
    import torch.nn.functional as F

    from tunesmith.train.adapter_dropout import DropoutLinear

    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    adapters = [torch.nn.Linear(4096, 16, bias=False, device="cuda") for _ in range(5)]
    fused = [DropoutLinear(a, 0.05) for a in adapters]

    def saved(run) -> int:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = run()
        kept = torch.cuda.memory_allocated() - before
        sum(o.float().sum() for o in outs).backward()
        return kept

    xin = x.requires_grad_()
    plain = saved(lambda: [a(F.dropout(xin, 0.05, training=True)) for a in adapters])
    ours = saved(lambda: [f(xin) for f in fused])
    input_size = x.numel() * x.element_size()  # 64 MiB
    # PEFT's way keeps, per adapter, a mask and the dropped copy (≥ 3 bytes per element): ≥ 5 × 1.5 inputs
    assert plain > 5 * 1.4 * input_size
    assert ours < 0.1 * input_size  # the outputs and seeds only; x itself was allocated before
