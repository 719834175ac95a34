"""LoRA's input dropout drawn inside the adapter's first product (src/tunesmith/train/adapter_dropout.py).

The Triton kernels run here in Triton's interpreter on CPU tensors (fp32: the interpreter has no bf16 products):
forward and both gradients equal autograd through the mask the kernel draws, on shapes that are not multiples of
the kernel's tiles; the mask is Bernoulli(1 − p) and its four Philox lanes are independent. The module swap keeps
PEFT's state-dict names and, where no kernel applies, PEFT's function and random stream exactly. The kernels on a
GPU, under torch.compile and checkpointing: tests/gpu/test_adapter_dropout_cuda.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from train_fixtures import seeded_loss_and_grads, tiny_lora_model
from tunesmith.train.adapter_dropout import DropoutLinear, fuse_adapter_dropout


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no Triton interpreter (a GPU machine: tests/gpu/test_adapter_dropout_cuda.py runs the kernels)")
    import tunesmith.train.adapter_dropout_kernels as module

    return module


@pytest.mark.parametrize(("rows", "cols", "rank"), [(70, 300, 8), (64, 256, 20), (5, 40, 16)])
def test_kernels_forward_and_gradients_equal_autograd_through_the_kernels_own_mask(kernels, rows, cols, rank):
    gen = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, cols, generator=gen)
    weight = torch.randn(rank, cols, generator=gen)
    grad = torch.randn(rows, rank, generator=gen)
    seed, p = torch.tensor([987654321], dtype=torch.int64), 0.3
    keep = kernels.keep_mask(rows, cols, seed, p)
    p = kernels.effective_p(p)  # 0.3 rounded to a multiple of 2⁻¹⁶, as the kernels apply it
    assert 0 < keep.sum() < keep.numel()

    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = (xr * keep / (1 - p)) @ wr.T
    reference.backward(grad)
    h = kernels.forward(x, weight, seed, p)
    dx, dweight = kernels.backward(grad, x, weight, seed, p)

    assert torch.allclose(h, reference, atol=1e-4, rtol=1e-5)
    assert torch.allclose(dx, xr.grad, atol=1e-5, rtol=1e-5)
    assert (dx[~keep] == 0).all()  # dropped inputs get no gradient
    assert torch.allclose(dweight, wr.grad, atol=1e-4, rtol=1e-5)
    assert torch.equal(kernels.forward(x, weight, seed, p), h)  # a seed fixes the mask


def test_registered_op_backpropagates_the_kernels_gradients_to_input_and_weight(kernels):
    from tunesmith.train.adapter_dropout import _dropout_linear_op

    op = _dropout_linear_op()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(33, 200, generator=gen, requires_grad=True)
    weight = torch.randn(16, 200, generator=gen, requires_grad=True)
    grad = torch.randn(33, 16, generator=gen)
    seed, p = torch.tensor([7], dtype=torch.int64), 0.1
    op(x, weight, seed, p).backward(grad)
    keep = kernels.keep_mask(33, 200, seed, p)
    p = kernels.effective_p(p)
    assert torch.allclose(x.grad, (grad @ weight.detach()) * keep / (1 - p), atol=1e-5)
    assert torch.allclose(weight.grad, grad.T @ (x.detach() * keep / (1 - p)), atol=1e-4)


def test_mask_keeps_each_element_with_probability_one_minus_p_and_its_lanes_are_independent(kernels):
    rows, cols, p = 256, 512, 0.05
    keep = kernels.keep_mask(rows, cols, torch.tensor([42], dtype=torch.int64), p).float()
    n = keep.numel()
    assert kernels.effective_p(p) == 3277 / 65536
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    # the eight columns one Philox call serves (LANE apart in a block of 8 × LANE: both halves of each of its four
    # words) are independent draws
    half = kernels.keep_mask(rows, cols, torch.tensor([43], dtype=torch.int64), 0.5).float()
    blocks = half.view(rows, cols // kernels.BLOCK, 8, kernels.LANE)
    for a, b in [(0, 1), (1, 2), (0, 7), (3, 4)]:
        agree = (blocks[:, :, a] == blocks[:, :, b]).float().mean().item()
        assert abs(agree - 0.5) < 5 * (0.25 / (n / 8)) ** 0.5
    # rows and other seeds draw other masks
    assert (half[0] != half[1]).float().mean().item() > 0.3
    other = kernels.keep_mask(rows, cols, torch.tensor([44], dtype=torch.int64), 0.5).float()
    assert abs((half == other).float().mean().item() - 0.5) < 0.02


def test_fused_adapters_keep_peft_names_and_without_a_kernel_compute_exactly_peft_dropout():
    peft_model = tiny_lora_model(dropout=0.2)  # on the CPU prepare_model leaves PEFT's dropout in place
    fused_model = tiny_lora_model(dropout=0.2)
    assert not any(isinstance(m, DropoutLinear) for m in peft_model.modules())
    assert fuse_adapter_dropout(fused_model) == 2 * 7
    assert sum(isinstance(m, DropoutLinear) for m in fused_model.modules()) == 2 * 7
    assert fused_model.state_dict().keys() == peft_model.state_dict().keys()
    q = fused_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_dropout["default"], torch.nn.Identity) and q.lora_A["default"].p == 0.2

    # make the adapters matter (lora_B starts at zero), identically in both models
    with torch.no_grad():
        for (name, a), b in zip(peft_model.named_parameters(), fused_model.parameters(), strict=True):
            if "lora_B" in name:
                a.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
                b.copy_(a)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    peft_loss, peft_grads = seeded_loss_and_grads(peft_model, ids)
    loss, grads = seeded_loss_and_grads(fused_model, ids)
    # no kernel on the CPU: the same dropout from the same generator, so the very same numbers
    assert torch.equal(loss, peft_loss)
    assert all(torch.equal(g, peft_grads[n]) for n, g in grads.items())
    # and dropout really acts in training: another draw, another loss; none in evaluation
    torch.manual_seed(2)
    assert fused_model(input_ids=ids, labels=ids).loss.item() != loss.item()
    fused_model.eval()
    with torch.no_grad():
        a = fused_model(input_ids=ids, labels=ids).loss
        b = fused_model(input_ids=ids, labels=ids).loss
    assert torch.equal(a, b)


def test_adapters_without_dropout_are_left_to_peft():
    model = tiny_lora_model(dropout=0.0)
    assert fuse_adapter_dropout(model) == 0
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
