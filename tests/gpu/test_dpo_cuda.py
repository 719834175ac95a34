"""DPO on CUDA (run on a GPU machine; skipped elsewhere): the packed, fused path that only CUDA takes computes the
padded path's loss and adapter gradients, and QLoRA DPO (4-bit base, the reference = adapters off) trains through
the CLI with the preference margin rising."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_fast_path import _tiny_lora_model  # noqa: E402  (random, non-zero adapters: policy ≠ reference)

from test_dpo import dpo_config, preference_rows, write_jsonl  # noqa: E402  (the CPU suite's DPO fixtures)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_packed_fused_dpo_gives_the_padded_loss_rewards_and_adapter_gradients():
    from tunesmith.chat import TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.train import preference
    from tunesmith.train.dataset import PreferencePair
    from tunesmith.train.distributed import Processes
    from tunesmith.train.kernels import attention_implementation
    from tunesmith.train.loop import StepSetup
    from tunesmith.train.plan import Precision

    gen = torch.Generator().manual_seed(0)
    pairs = []
    for prompt, chosen, rejected in ((40, 17, 90), (7, 300, 12), (128, 64, 65), (3, 5, 200), (250, 31, 31)):
        ids = torch.randint(3, 1000, (prompt + chosen + rejected,), generator=gen).tolist()
        p, c, r = ids[:prompt], ids[prompt:prompt + chosen], ids[prompt + chosen:]
        pairs.append(PreferencePair(TokenizedChat(p + c, [-100] * prompt + c),
                                    TokenizedChat(p + r, [-100] * prompt + r)))
    dpo = TrainConfig(objective="dpo", dpo={"beta": 0.2}).dpo

    def step(packed: bool) -> tuple[float, dict, dict]:
        model = _tiny_lora_model(attention_implementation("cuda", packing=True) if packed else "sdpa")
        setup = StepSetup(procs=Processes.single(torch.device("cuda")),
                          precision=Precision(torch.bfloat16, torch.bfloat16), optimizer="adamw_torch", pad_id=0,
                          packed=packed, fused_loss=packed)
        _, _, n, loss_sum, metrics = preference.accumulate(model, setup=setup, dpo=dpo, pairs=pairs,
                                                           indices=list(range(len(pairs))), micro_size=5,
                                                           max_length=2048)
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        return loss_sum / n, metrics, grads

    packed_loss, packed_metrics, packed_grads = step(packed=True)
    padded_loss, padded_metrics, padded_grads = step(packed=False)

    assert packed_loss == pytest.approx(padded_loss, rel=2e-2)
    assert packed_metrics["rewards/margins"] == pytest.approx(padded_metrics["rewards/margins"], rel=5e-2, abs=2e-3)
    assert padded_metrics["rewards/margins"] != 0.0  # the adapters move the policy: the comparison means something
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    assert all("lora_" in k for k in packed_grads)  # the base is frozen
    for name, grad in packed_grads.items():
        assert _rel(grad, padded_grads[name]) < 5e-2, name


def test_qlora_dpo_trains_through_the_cli_and_the_margin_rises(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from tunesmith.cli import main

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", preference_rows(32))
    cfg = dpo_config(tmp_path, tiny_model_dir, data / "train.jsonl", method="qlora", max_steps=12,
                     learning_rate=2e-3, per_device_train_batch_size=8, compile=False,
                     dpo={"beta": 0.5}, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0

    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["result"]["objective"] == "dpo" and run["quantization"] is not None
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    margins = [s["rewards/margins"] for s in steps]
    assert len(margins) == 12
    # step 1: the policy is the reference (LoRA B starts at zero), so the margin is 0 and the loss log 2
    assert margins[0] == pytest.approx(0.0, abs=1e-3) and steps[0]["loss"] == pytest.approx(0.6931, abs=2e-3)
    assert sum(margins[-3:]) / 3 > 0.05 and steps[-1]["loss"] < steps[0]["loss"]
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernels_token_log_probs_and_their_weighted_gradients_equal_pytorch_chunks(dtype):
    pytest.importorskip("liger_kernel")
    from tunesmith.train.preference import linear_logps

    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden_size, vocab = 5000, 256, 32000  # more tokens than one PyTorch chunk (4,096)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * 0.05).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    # DPO's upstream gradient differs per token (each sequence's own sigmoid weight): folded in per token
    upstream = torch.rand(tokens, device="cuda", generator=gen) * 2 - 1

    def run(kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logps = linear_logps(h, w, targets, kernel=kernel)
        (logps * upstream).sum().backward()
        return logps.detach(), h.grad, w.grad

    fused, chunks = run(kernel=True), run(kernel=False)
    assert fused[0].dtype == torch.float32 and fused[0].shape == (tokens,)
    assert (fused[0] < 0).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(fused[0], chunks[0]) < tol
    assert _rel(fused[1], chunks[1]) < tol * 5
    assert _rel(fused[2], chunks[2]) < tol * 5
