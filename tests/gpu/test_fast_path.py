"""The CUDA fast path computes the same function as the plain path (run on a GPU machine; skipped elsewhere).

- Liger's fused linear + cross-entropy vs the chunked PyTorch path: loss and gradients.
- Packed rows through our variable-length attention vs each sequence on its own: per-sequence loss and the
  gradients of the LoRA adapters over a whole optimizer step.
- Input embeddings in CPU memory, checkpointed layers' inputs in CPU memory, and layers offloaded whole: same
  loss and gradients, less GPU memory.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_fused_kernel_loss_and_gradients_match_the_chunked_torch_path():
    pytest.importorskip("liger_kernel")
    from tunesmith.train.kernels import linear_cross_entropy_sum
    from tunesmith.train.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(20000, 512, device="cuda") * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, 20000, (3000,), device="cuda")

    h1 = hidden.clone().requires_grad_()
    fused = linear_cross_entropy_sum(h1, weight, targets)
    assert fused is not None, "Liger is installed on CUDA: the fused kernel must be used"
    (fused / 3000).backward()
    h2 = hidden.clone().requires_grad_()
    plain, _ = linear_cross_entropy(h2, weight, targets, kernel=False)
    (plain / 3000).backward()

    assert abs(fused.item() - plain.item()) / plain.item() < 2e-3
    assert _rel(h1.grad, h2.grad) < 2e-2


def test_attention_choice_is_varlen_on_cuda_with_packing_and_default_otherwise():
    from tunesmith.train.kernels import VARLEN_ATTENTION, attention_implementation

    assert attention_implementation("cuda", packing=True) == VARLEN_ATTENTION
    assert attention_implementation("cuda", packing=False) is None
    assert attention_implementation("cpu", packing=True) is None


def _tiny_lora_model(attn: str, layers: int = 2):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.config._attn_implementation = attn
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, lora)


def test_packed_rows_with_varlen_attention_give_each_sequences_own_loss_and_the_same_gradients():
    from tunesmith.chat import TokenizedChat
    from tunesmith.train.batching import micro_batches
    from tunesmith.train.kernels import attention_implementation
    from tunesmith.train.loss import loss_sum

    attn = attention_implementation("cuda", packing=True)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for n in (37, 300, 5, 128, 211):
        ids = torch.randint(3, 1000, (n,), generator=gen).tolist()
        labels = [-100 if i < n // 3 else t for i, t in enumerate(ids)]  # a prompt part that is not supervised
        seqs.append(TokenizedChat(ids, labels))

    def step(model, packed: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        per_seq = []
        batches = micro_batches(seqs, range(len(seqs)), 1 if not packed else 8, 2048, 0, packed)
        total = sum(b.num_targets for b in batches)
        for b in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = loss_sum(model, b.to(torch.device("cuda")), fused=False)
            (loss / total).backward()
            per_seq.append(loss.item())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return per_seq, grads

    packed_model = _tiny_lora_model(attn)
    separate_model = _tiny_lora_model("sdpa")
    separate_model.load_state_dict(packed_model.state_dict())
    packed_losses, packed_grads = step(packed_model, packed=True)
    separate_losses, separate_grads = step(separate_model, packed=False)

    assert len(packed_losses) == 1 and len(separate_losses) == len(seqs)
    assert abs(packed_losses[0] - sum(separate_losses)) / sum(separate_losses) < 1e-2
    assert packed_grads.keys() == separate_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        assert _rel(grad, separate_grads[name]) < 3e-2, name


def test_varlen_attention_keeps_examples_independent_of_their_neighbours():
    from tunesmith.train.kernels import attention_implementation

    attn = attention_implementation("cuda", packing=True)
    model = _tiny_lora_model(attn).eval()
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(3, 1000, (1, 64), generator=gen)
    b = torch.randint(3, 1000, (1, 96), generator=gen)
    c = torch.randint(3, 1000, (1, 96), generator=gen)

    def logits_of_second(first: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([first, b], 1).cuda()
        pos = torch.cat([torch.arange(first.shape[1]), torch.arange(96)]).unsqueeze(0).cuda()
        cu = torch.tensor([0, first.shape[1], first.shape[1] + 96], dtype=torch.int32, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=96,
                        max_length_k=96, use_cache=False).logits
        return out[0, first.shape[1]:].float()

    # the second example's logits do not depend on what it was packed after
    assert torch.allclose(logits_of_second(a), logits_of_second(c), atol=1e-2, rtol=0)


def test_grouped_key_value_heads_give_what_the_same_heads_expanded_give():
    """Whether or not this torch's kernel takes the shared key/value heads as they are (kernels._SHARED_KV_HEADS),
    the attention and its gradients equal those with every query head given its own copy."""
    from tunesmith.train import kernels

    kernels.attention_implementation("cuda", packing=True)
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, 8, 300, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    pos = torch.cat([torch.arange(120), torch.arange(180)]).unsqueeze(0).cuda()
    results = []
    for expand in (False, True):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        keys, values = (kk.repeat_interleave(4, dim=1), vv.repeat_interleave(4, dim=1)) if expand else (kk, vv)
        out, _ = kernels.varlen_attention_forward(torch.nn.Module(), qq, keys, values, None, position_ids=pos)
        out.float().square().sum().backward()
        results.append((out, qq.grad, kk.grad, vv.grad))
    for shared, expanded in zip(*results, strict=True):
        assert _rel(shared, expanded) < 1e-2


def test_padded_evaluation_batches_give_the_same_loss_under_varlen_attention_as_under_sdpa():
    from tunesmith.chat import TokenizedChat
    from tunesmith.train.batching import micro_batches
    from tunesmith.train.kernels import attention_implementation
    from tunesmith.train.loss import loss_sum

    varlen_model = _tiny_lora_model(attention_implementation("cuda", packing=True)).eval()
    sdpa_model = _tiny_lora_model("sdpa").eval()
    sdpa_model.load_state_dict(varlen_model.state_dict())
    gen = torch.Generator().manual_seed(3)
    seqs = [TokenizedChat(ids, list(ids)) for ids in
            (torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (50, 9, 77))]
    (batch,) = micro_batches(seqs, range(3), 3, 128, 0, packed=False)  # right-padded with an attention mask
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, _ = loss_sum(varlen_model, batch.to(torch.device("cuda")), fused=False)
        b, _ = loss_sum(sdpa_model, batch.to(torch.device("cuda")), fused=False)
    assert abs(a.item() - b.item()) / b.item() < 1e-2


def test_input_embeddings_in_cpu_memory_give_the_same_loss_and_adapter_gradients():
    from tunesmith.chat import TokenizedChat
    from tunesmith.train.batching import micro_batches
    from tunesmith.train.kernels import VARLEN_ATTENTION, attention_implementation
    from tunesmith.train.loss import loss_sum
    from tunesmith.train.model import embeddings_on, embeddings_to

    attention_implementation("cuda", packing=True)  # registers the varlen attention
    model = _tiny_lora_model(VARLEN_ATTENTION)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (300, 41, 700, 9)]
    (batch,) = micro_batches([TokenizedChat(s, list(s)) for s in seqs], range(4), 1, 2048, 0, packed=True)
    batch = batch.to(torch.device("cuda"))

    def run() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = loss_sum(model, batch, fused=True)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    on_gpu, grads_gpu = run()
    again, grads_again = run()  # the attention backward's atomics: the GPU's own run-to-run noise
    noise = max(_rel(grads_again[n], grads_gpu[n]) for n in grads_gpu)
    assert embeddings_to(model, "cpu").type == "cuda"
    assert model.get_base_model().get_input_embeddings().weight.device.type == "cpu"
    on_cpu, grads_cpu = run()
    assert on_cpu == on_gpu == again  # the same rows reach the first layer
    assert max(_rel(grads_cpu[n], grads_gpu[n]) for n in grads_gpu) <= max(2 * noise, 1e-3)
    with embeddings_on(model, torch.device("cuda")):  # generation looks tokens up on the GPU
        assert model.get_base_model().get_input_embeddings().weight.is_cuda
    assert model.get_base_model().get_input_embeddings().weight.device.type == "cpu"


def test_a_run_with_its_input_embeddings_in_cpu_memory_trains_as_with_them_on_the_gpu(tiny_model_dir, tmp_path):
    import json

    from train_fixtures import finish, launch_train, metrics, run_config, write_arithmetic

    data = write_arithmetic(tmp_path / "data")
    runs = {}
    for where in ("gpu", "cpu"):
        cfg = run_config(tmp_path, tiny_model_dir, data, where, method="lora", compile=False,
                         embeddings_on_cpu=where == "cpu", eval_strategy="steps", eval_steps=2, task_eval_samples=2,
                         save_strategy="no")
        finish(launch_train(1, str(cfg), "--out", str(tmp_path / where)))
        runs[where] = metrics(tmp_path / where)
        plan = json.loads((tmp_path / where / "run.json").read_text())["plan"]
        assert plan["embeddings_on_cpu"] is (where == "cpu")
    for x, y in zip(runs["gpu"], runs["cpu"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
    evals = metrics(tmp_path / "cpu", "eval")  # task eval generated with the embeddings back on the GPU
    assert evals and all(any(k.startswith("task_") for k in e) for e in evals)


@pytest.mark.parametrize("checkpointed,offloaded", [(6, 0), (2, 4)])
def test_activations_in_cpu_memory_free_the_gpu_and_keep_loss_and_gradients(checkpointed, offloaded):
    """(6, 0): every layer checkpointed, their inputs in CPU memory, against checkpointing alone. (2, 4): four
    layers offloaded whole (everything they save for backward in CPU memory, no recomputation) between two
    checkpointed ones, against the same layers kept in GPU memory."""
    from tunesmith.chat import TokenizedChat
    from tunesmith.train.batching import micro_batches
    from tunesmith.train.kernels import VARLEN_ATTENTION, attention_implementation
    from tunesmith.train.loss import loss_sum
    from tunesmith.train.model import compile_decoder_layers, set_checkpointing

    attention_implementation("cuda", packing=True)
    layers = checkpointed + offloaded
    model = _tiny_lora_model(VARLEN_ATTENTION, layers)
    compile_decoder_layers(model)  # as trained on a GPU: compiled layers inside the per-layer function
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (900, 1500, 333, 1267)]
    (batch,) = micro_batches([TokenizedChat(s, list(s)) for s in seqs], range(4), 2, 2048, 0, packed=True)
    batch = batch.to(torch.device("cuda"))
    boundary = 4000 * 256 * 2  # one layer's bf16 input: 2 MB, over the 1 MiB floor

    def run(offload: bool) -> tuple[float, dict[str, torch.Tensor], int, object]:
        if offloaded:  # the control keeps the offloaded layers' activations on the GPU
            offloader = set_checkpointing(model, checkpointed, True, offloaded_layers=offloaded if offload else 0)
        else:
            offloader = set_checkpointing(model, layers, offload)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = loss_sum(model, batch, fused=False)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before  # what forward leaves for backward
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, held, \
            offloader

    for _ in range(2):  # compile and warm up both paths
        run(False), run(True)
    plain, grads, held_plain, _ = run(False)
    again, grads_again, _, _ = run(False)
    noise = max(_rel(grads_again[n], grads[n]) for n in grads)
    moved, grads_moved, held_moved, offloader = run(True)
    assert moved == plain == again
    assert max(_rel(grads_moved[n], grads[n]) for n in grads) <= max(2 * noise, 1e-3)
    if not offloaded:
        assert offloader.offloaded == layers
        assert held_plain - held_moved >= (layers - 2) * boundary, (held_plain, held_moved)
    else:
        # each offloaded layer saves several tensors over 1 MiB (q, k, v, the MLP's inputs and products...); what
        # forward leaves on the GPU drops by most of what was moved (the last layer's copy may still be running)
        per_layer = (offloader.offloaded_bytes - checkpointed * boundary) / offloaded
        assert per_layer >= 5 * boundary, per_layer
        assert held_plain - held_moved >= (offloaded - 1) * per_layer, (held_plain, held_moved, per_layer)
