"""The DPO objective (``train.objective: dpo``): the loss over preference pairs, its step and its evaluation.

A pair's two sequences (prompt + chosen answer, prompt + rejected answer) go through the model in the same
micro-batch, padded or packed like supervised examples; the log-probability of an answer is the sum over its tokens
(the prompt is masked exactly as for SFT: the same chat template rendering and labels). The reference model is the
model before tuning, never a second copy in memory:

- LoRA / QLoRA: the same model with its adapters switched off (PEFT's ``disable_adapter()``), in each step;
- full fine-tuning: the initial weights' log-probabilities, computed once before the first step (``precompute``).

Losses (``train.dpo.loss_type``), with Δ = (policy − reference) log-prob of chosen − the same of rejected:
sigmoid −log σ(β·Δ); IPO (Δ' − 1/(2β))² with Δ' on log-probabilities averaged per answer token, as TRL does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..chat import IGNORE_INDEX
from ..config.train import DpoSection
from ..models import base_model
from .batching import MicroBatch, balanced_rows, micro_batches, row_budget
from .dataset import PreferencePair
from .distributed import max_all, set_gradient_sync, sum_all
from .loss import CHUNK_TOKENS, _attention_kwargs, _final_hidden_states, _inputs


def sequence_logps(model: Any, batch: MicroBatch, setup: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the supervised tokens, their count) of each sequence of ``batch``, in the
    order they were batched, computed as the run's ``StepSetup`` says. Fused: the head runs on the supervised
    positions only (``linear_logps``: the [tokens × vocabulary] logits never exist); else the model's own logits.
    Embedding rows looked up in CPU memory go through the run's pinned buffers, as the supervised loss's do."""
    base = base_model(model)
    kwargs = _attention_kwargs(batch) | _inputs(base, batch, setup.pinned)
    keep = batch.targets != IGNORE_INDEX
    targets = batch.targets[keep]
    if setup.fused_loss:
        hidden = _final_hidden_states(model, base, batch, kwargs)[keep]
        token_logps = linear_logps(hidden, base.get_output_embeddings().weight, targets, setup.loss_kernel)
    else:
        logits = model(position_ids=batch.position_ids, attention_mask=batch.attention_mask, use_cache=False,
                       **kwargs).logits
        token_logps = -F.cross_entropy(logits[keep].float(), targets, reduction="none")
    seq = _sequence_index(batch)[keep]
    n = _sequences(batch)
    sums = torch.zeros(n, device=token_logps.device, dtype=torch.float32).index_add(0, seq, token_logps)
    counts = torch.zeros(n, device=token_logps.device, dtype=torch.float32).index_add(
        0, seq, torch.ones_like(token_logps))
    return sums, counts


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernel: bool = True
                 ) -> torch.Tensor:
    """Log-probability of each target under softmax(``hidden @ weight.T``): Liger's fused kernel where it applies
    (``kernel``; tiles of the logits, as the supervised loss), else PyTorch chunks of ``CHUNK_TOKENS`` recomputed
    in backward — the [tokens × vocabulary] logits never exist whole either way."""
    from .kernels import linear_token_logps

    fast = linear_token_logps(hidden, weight, targets) if kernel else None
    if fast is not None:
        return fast
    return torch.cat([checkpoint(_chunk_logps, hidden[s:s + CHUNK_TOKENS], weight, targets[s:s + CHUNK_TOKENS],
                                 use_reentrant=False) for s in range(0, hidden.shape[0], CHUNK_TOKENS)])


def _chunk_logps(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy((h @ weight.t()).float(), t, reduction="none")


def _sequences(batch: MicroBatch) -> int:
    return batch.input_ids.shape[0] if batch.cu_seq_lens is None else batch.cu_seq_lens.numel() - 1


def _sequence_index(batch: MicroBatch) -> torch.Tensor:
    """[B, T]: which sequence of the micro-batch each position belongs to (padded: its row; packed: the segment of
    the row that ``cu_seq_lens`` delimits)."""
    rows, width = batch.input_ids.shape
    if batch.cu_seq_lens is None:
        return torch.arange(rows, device=batch.input_ids.device).unsqueeze(1).expand(rows, width)
    positions = torch.arange(width, device=batch.input_ids.device, dtype=batch.cu_seq_lens.dtype)
    return torch.bucketize(positions, batch.cu_seq_lens[1:], right=True).unsqueeze(0)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, dpo: DpoSection
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) from [2, n] summed log-probs (row 0 chosen, row 1
    rejected) of the policy and the reference and the answers' token counts. Rewards are β × (policy − reference)."""
    ratios = policy - reference
    if dpo.loss_type == "sigmoid":
        loss = -F.logsigmoid(dpo.beta * (ratios[0] - ratios[1]))
    else:  # ipo: per-token averages, so the squared loss does not grow with the answers' length
        mean = ratios / counts.clamp(min=1.0)
        loss = (mean[0] - mean[1] - 1 / (2 * dpo.beta)) ** 2
    rewards = dpo.beta * ratios.detach()
    return loss, rewards[0], rewards[1]


def uses_adapters_as_reference(model: Any) -> bool:
    """LoRA / QLoRA (a PEFT model): the reference is the same model with its adapters off. Full fine-tuning:
    the reference log-probs are computed before training (``precompute``)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def pair_batches(pairs: list[PreferencePair], indices: list[int], micro_size: int, max_length: int, pad_id: int,
                 packed: bool, row_tokens: int | None = None) -> Iterator[tuple[MicroBatch, list[int]]]:
    """Micro-batches of whole pairs (their chosen sequences, then their rejected ones, as TRL lays them out), with
    the pairs' indices. Padded: ``micro_size`` pairs each. Packed: the pairs laid into rows of at most the row
    budget (``batching.row_budget``: what the memory plan assumed) with similar token counts, a pair never split
    — fewer, fuller rows than ``micro_size`` pairs to a row, and never a row longer than the plan allowed."""
    if not packed:
        groups = [indices[s:s + micro_size] for s in range(0, len(indices), micro_size)]
    else:
        budget = row_budget(row_tokens=row_tokens, batch_size=micro_size, max_length=max_length, packed=True,
                            pairs=True)
        lengths = [len(pairs[i].chosen.input_ids) + len(pairs[i].rejected.input_ids) for i in indices]
        groups = [[indices[k] for k in row] for row in balanced_rows(lengths, budget) if row]
    for group in groups:
        seqs = [pairs[i].chosen for i in group] + [pairs[i].rejected for i in group]
        # one packed row holds the whole group (balanced_rows kept it within the budget)
        batch, = micro_batches(seqs, range(len(seqs)), len(seqs), max_length, pad_id, packed,
                               row_tokens=sum(len(s.input_ids) for s in seqs))
        yield batch, group


def _reference(model: Any, batch: MicroBatch, group: list[int], pairs: list[PreferencePair], setup: Any
               ) -> torch.Tensor:
    """[2, n] reference log-probs of the micro-batch's pairs: precomputed, or the model with its adapters off."""
    if pairs[group[0]].reference is not None:
        refs = [pairs[i].reference for i in group]
        return torch.tensor([[r[0] for r in refs], [r[1] for r in refs]], device=batch.input_ids.device)
    with torch.no_grad(), model.disable_adapter():
        logps, _ = sequence_logps(model, batch, setup)
    return logps.view(2, -1)


def accumulate(model: Any, *, setup: Any, dpo: DpoSection, pairs: list[PreferencePair], indices: list[int],
               micro_size: int, max_length: int, row_tokens: int | None = None
               ) -> tuple[list[MicroBatch], int, int, float, dict[str, float]]:
    """Forward and backward over one step's pairs (``pair_batches`` lays them out); gradients are left
    summed in ``.grad``, each pair weighted 1 / (the step's pairs) so the step's loss is the mean over its pairs
    whatever the accumulation. Returns the micro-batches, how many are this process's own, the step's pairs and
    summed loss over every process, and the step's reward metrics (TRL's names)."""
    from .loop import _autocast

    procs = setup.procs
    mine = indices[procs.rank::procs.world]
    batches = list(pair_batches(pairs, mine, micro_size, max_length, setup.pad_id, setup.packed, row_tokens))
    real = len(batches)
    n_micro = max_all(real, procs)
    if real < n_micro:  # every process runs as many forwards (FSDP2); the filler pair weighs nothing
        batches += list(pair_batches(pairs, indices[:1], 1, max_length, setup.pad_id, setup.packed)) \
            * (n_micro - real)
    n_pairs = int(sum_all(len(mine), procs))
    totals = torch.zeros(5, device=setup.device)  # loss, chosen reward, rejected reward, margin, accuracy
    for i, (batch, group) in enumerate(batches):
        set_gradient_sync(model, i == n_micro - 1)
        batch = batch.to(setup.device)
        with _autocast(setup.device, setup.precision):
            reference = _reference(model, batch, group, pairs, setup)
            logps, counts = sequence_logps(model, batch, setup)
        loss, chosen, rejected = dpo_loss(logps.view(2, -1), reference, counts.view(2, -1), dpo)
        weight = procs.world / n_pairs if i < real else 0.0  # FSDP2 averages gradients over processes
        (loss.sum() * weight).backward()
        if i < real:
            totals += torch.stack([loss.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                                   (chosen > rejected).float().sum()])
    totals = torch.tensor([sum_all(float(v), procs) for v in totals.tolist()])
    supervised = int(sum_all(sum(b.num_targets for b, _ in batches[:real]), procs))
    return [b for b, _ in batches], real, n_pairs, float(totals[0]), _reward_metrics(totals, n_pairs) | {
        "supervised_tokens": supervised, "pairs": n_pairs}


def _reward_metrics(totals: torch.Tensor, n: int) -> dict[str, float]:
    return {"rewards/chosen": float(totals[1]) / n, "rewards/rejected": float(totals[2]) / n,
            "rewards/margins": float(totals[3]) / n, "rewards/accuracies": float(totals[4]) / n}


@torch.no_grad()
def evaluate(model: Any, pairs: list[PreferencePair], *, setup: Any, tcfg: Any) -> dict[str, float]:
    """Mean DPO loss over held-out pairs and the win-rate: the share of pairs whose chosen answer has the higher
    implicit reward (β × policy-over-reference log-prob), with the mean rewards."""
    from .loop import _autocast

    procs = setup.procs
    model.eval()
    mine = list(range(len(pairs)))[procs.rank::procs.world]
    batches = list(pair_batches(pairs, mine, tcfg.per_device_train_batch_size, tcfg.max_length, setup.pad_id,
                                False))
    real = len(batches)
    batches += list(pair_batches(pairs, [0], 1, tcfg.max_length, setup.pad_id, False)) * \
        (max_all(real, procs) - real)
    totals = torch.zeros(5)
    for i, (batch, group) in enumerate(batches):
        batch = batch.to(setup.device)
        with _autocast(setup.device, setup.precision):
            reference = _reference(model, batch, group, pairs, setup)
            logps, counts = sequence_logps(model, batch, setup)
        loss, chosen, rejected = dpo_loss(logps.view(2, -1), reference, counts.view(2, -1), tcfg.dpo)
        if i < real:
            totals += torch.stack([loss.sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                                   (chosen > rejected).float().sum()]).cpu()
    totals = torch.tensor([sum_all(float(v), procs) for v in totals.tolist()])
    n = max(int(sum_all(len(mine), procs)), 1)
    rewards = _reward_metrics(totals, n)
    return {"eval_loss": float(totals[0]) / n, "eval_win_rate": rewards["rewards/accuracies"],
            **{f"eval_{k}": v for k, v in rewards.items() if k != "rewards/accuracies"}}


@torch.no_grad()
def precompute(model: Any, pairs: list[PreferencePair], *, setup: Any, micro_size: int, max_length: int
               ) -> list[PreferencePair]:
    """``pairs`` with their reference log-probs under the model as it is now (before the first step of full
    fine-tuning): the reference without a second copy of the weights in memory."""
    from .loop import _autocast

    if not pairs:
        return pairs
    training = model.training
    model.eval()
    out = list(pairs)
    for batch, group in pair_batches(pairs, list(range(len(pairs))), micro_size, max_length, setup.pad_id,
                                     setup.packed):
        with _autocast(setup.device, setup.precision):
            logps, _ = sequence_logps(model, batch.to(setup.device), setup)
        logps = logps.view(2, -1).tolist()
        for k, i in enumerate(group):
            out[i] = replace(pairs[i], reference=(logps[0][k], logps[1][k]))
    model.train(training)
    return out
