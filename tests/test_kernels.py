"""The fast path's CPU-checkable parts: fallbacks, packed-row metadata, balanced rows, packed == unpacked loss.

The CUDA kernels themselves (varlen attention, Liger's fused loss) are checked against the plain path in
tests/gpu/test_fast_path.py on a GPU machine.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from tunesmith.chat import TokenizedChat
from tunesmith.train.batching import balanced_rows, micro_batches
from tunesmith.train.kernels import _cu_seq_lens, attention_implementation, linear_cross_entropy_sum
from tunesmith.train.loss import linear_cross_entropy


def test_cpu_keeps_transformers_default_attention_and_the_torch_loss():
    assert attention_implementation("cpu", packing=True) is None
    assert attention_implementation("cpu", packing=False) is None
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    assert linear_cross_entropy_sum(hidden, weight, torch.randint(0, 11, (5,))) is None


def test_chunked_loss_equals_cross_entropy_of_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(9000, 16, requires_grad=True)  # more than one 4096-token chunk
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (9000,))
    total, correct = linear_cross_entropy(hidden, weight, targets)
    logits = hidden @ weight.t()
    reference = F.cross_entropy(logits, targets, reduction="sum")
    assert torch.allclose(total, reference, rtol=1e-5)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    (grad,) = torch.autograd.grad(total, hidden)
    (ref_grad,) = torch.autograd.grad(reference, hidden)
    assert torch.allclose(grad, ref_grad, atol=1e-5)


def test_sequence_starts_come_from_the_caller_or_from_restarting_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = _cu_seq_lens({"position_ids": pos}, 1, 9, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4 and cu.dtype == torch.int32
    given = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu, longest = _cu_seq_lens({"cu_seq_lens_q": given, "max_length_q": 5}, 1, 9, torch.device("cpu"))
    assert cu.tolist() == [0, 4, 9] and longest == 5
    cu, longest = _cu_seq_lens({}, 2, 6, torch.device("cpu"))  # plain rows: one sequence each
    assert cu.tolist() == [0, 6, 12] and longest == 6


def _chat(n: int, rng: random.Random) -> TokenizedChat:
    ids = [rng.randrange(3, 500) for _ in range(n)]
    return TokenizedChat(ids, list(ids))


def test_decoding_steps_against_a_cache_go_to_sdpa_not_the_packed_kernel():
    # generation on the training model (task eval during training): one new query against 5 cached keys, no mask,
    # position ids that never restart — the packed-row kernel cannot take it (found on the GPU)
    from tunesmith.train.kernels import varlen_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=8**-0.5, position_ids=torch.tensor([[5]]))
    keys, values = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    expected = torch.softmax(q @ keys.transpose(-1, -2) * 8**-0.5, dim=-1) @ values  # all cached keys visible
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)


def test_balanced_rows_fit_the_budget_use_every_sequence_once_and_leave_no_short_last_row():
    lengths = [1900, 1200, 900, 700, 650, 600, 500, 480, 450, 400, 380, 300, 200, 120, 80, 40]
    rows = balanced_rows(lengths, 8192)  # 8,900 tokens: greedy filling would give 8,192 + 708
    sizes = [sum(lengths[i] for i in row) for row in rows]
    assert len(rows) == 2 and max(sizes) <= 8192 and sum(sizes) == sum(lengths)
    assert min(sizes) > 4000
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))


def test_balanced_rows_add_a_row_when_the_lengths_do_not_fit_the_minimum_count():
    rows = balanced_rows([600, 600, 600], 1000)  # 1,800 tokens, budget 1,000: two rows cannot hold them
    assert len(rows) == 3 and all(len(row) == 1 for row in rows)


def test_a_step_is_laid_out_for_all_processes_at_once_with_the_same_rows_and_similar_tokens_each():
    # the benchmark's chat lengths (median ~410, up to 2,048): 32 sequences, two processes, 8K-token rows
    rng = random.Random(3)
    seqs = [_chat(min(2048, max(32, int(rng.lognormvariate(6.0, 0.8)))), rng) for _ in range(32)]
    for world in (3, 2):
        shares = [micro_batches(seqs, range(32), 4, 2048, 0, True, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # no process runs filler rows while another works
        tokens = [sum(b.num_tokens for b in share) for share in shares]
        assert sum(tokens) == sum(len(s.input_ids) for s in seqs)  # every sequence once
        assert max(tokens) - min(tokens) <= max(len(s.input_ids) for s in seqs)  # balanced to one sequence
        assert all(b.num_tokens <= 4 * 2048 for share in shares for b in share)
    # laying out each process's share alone (the old way): one process got 1 row of 8.1K tokens, the other
    # 2 rows; the first then ran its row again as filler — 14,014 tokens of compute against 8,105 now
    alone = [micro_batches(seqs[rank::2], range(16), 4, 2048, 0, True) for rank in range(2)]
    assert [len(a) for a in alone] == [2, 1]
    assert 2 * alone[1][0].num_tokens > 1.7 * max(sum(b.num_tokens for b in share) for share in shares[:2])


def test_a_process_with_no_row_is_told_so_and_padded_layouts_deal_sequences_in_turn():
    rng = random.Random(4)
    seqs = [_chat(100, rng)]
    assert micro_batches(seqs, [0], 4, 2048, 0, True, 1, 2) == []  # one sequence, two processes
    seqs = [_chat(n, rng) for n in (5, 6, 7, 8, 9)]
    share = micro_batches(seqs, range(5), 2, 64, 0, False, 1, 2)  # sequences 1 and 3
    assert [b.num_tokens for b in share] == [6 + 8]


def test_a_packed_row_gives_each_sequence_the_loss_it_has_alone_on_the_cpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=500, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    rng = random.Random(2)
    seqs = [_chat(n, rng) for n in (17, 40, 5, 33)]
    (packed,) = micro_batches(seqs, range(4), 4, 64, 0, packed=True)
    assert packed.input_ids.shape == (1, 95) and packed.cu_seq_lens.tolist() == [0, 17, 57, 62, 95]
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        for k, seq in enumerate(seqs):
            start, end = packed.cu_seq_lens[k].item(), packed.cu_seq_lens[k + 1].item()
            alone = model(input_ids=torch.tensor([seq.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(logits[start:end], alone, atol=1e-4), f"sequence {k} saw its neighbours"
            targets = packed.targets[0, start:end]
            keep = targets != -100
            packed_loss = F.cross_entropy(logits[start:end][keep], targets[keep])
            alone_loss = F.cross_entropy(alone[:-1], torch.tensor(seq.input_ids[1:]))
            assert torch.allclose(packed_loss, alone_loss, atol=1e-5)


def test_packed_rows_take_a_token_budget_between_multiples_of_max_length():
    from tunesmith.config import TrainConfig
    from tunesmith.train.loop import _row_tokens

    rng = random.Random(5)
    seqs = [_chat(n, rng) for n in (1900, 1800, 1500, 1400, 900, 700, 500, 300)]  # 9,000 tokens
    assert len(micro_batches(seqs, range(8), 2, 2048, 0, True)) == 3  # rows of at most 4,096
    rows = micro_batches(seqs, range(8), 2, 2048, 0, True, row_tokens=5120)
    assert len(rows) == 2 and all(b.num_tokens <= 5120 for b in rows)
    assert sum(b.num_tokens for b in rows) == 9000
    tcfg = TrainConfig(per_device_train_batch_size=2, packed_row_tokens=5120)
    assert [_row_tokens(tcfg, m) for m in (2, 1)] == [5120, 2560]  # on_oom: shrink halves the row too
    assert _row_tokens(TrainConfig(per_device_train_batch_size=4, packed_row_tokens=2100), 1) == 2048
    assert _row_tokens(TrainConfig(), 4) is None
