"""How examples become optimizer steps and micro-batches.

An optimizer step is always the same set of sequences — ``per_device_train_batch_size × gradient_accumulation_steps
× world_size`` of them (the guide's 4 × 4 = 16) in a seeded per-epoch order — whatever the layout:

- padded: micro-batches of ``per_device_train_batch_size`` sequences, right-padded to the longest in the micro-batch;
- packed: the step's sequences concatenated into rows of at most ``per_device_train_batch_size × max_length`` tokens,
  with position ids restarting at 0 for each sequence (no padding, no cross-sequence attention).

So packing changes the compute, never the optimisation: both layouts give the same loss and gradients.
Labels are shifted inside each sequence before packing, so no token is trained to predict the next sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..chat import IGNORE_INDEX, TokenizedChat


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor        # [B, T]
    targets: torch.Tensor          # [B, T]: the next token where supervised, else IGNORE_INDEX
    position_ids: torch.Tensor     # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] for padded rows; None for packed rows
    cu_seq_lens: torch.Tensor | None     # [n + 1] int32 sequence starts of a packed row
    max_seq_len: int
    num_tokens: int                # real (non-pad) tokens
    num_targets: int               # supervised tokens
    host_input_ids: torch.Tensor | None = None  # the ids still in CPU memory after ``to(gpu)`` (CPU lookups)

    def to(self, device: torch.device) -> MicroBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        host = self.input_ids if self.input_ids.device.type == "cpu" else self.host_input_ids
        return MicroBatch(move(self.input_ids), move(self.targets), move(self.position_ids),
                          move(self.attention_mask), move(self.cu_seq_lens), self.max_seq_len, self.num_tokens,
                          self.num_targets, host)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of example indices, different for each epoch and reproducible on resume."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def packs(packing: str | bool, device_type: str) -> bool:
    """``train.packing``: ``auto`` packs on a CUDA GPU (variable-length attention) and pads elsewhere."""
    return device_type == "cuda" if packing == "auto" else bool(packing)


def row_budget(*, row_tokens: int | None, batch_size: int, max_length: int, packed: bool, pairs: bool) -> int:
    """Tokens of the largest micro-batch. Packed: a row's budget, ``row_tokens`` where set, else batch_size ×
    max_length. Padded: batch_size sequences of up to max_length. Preference pairs keep a pair's two sequences in
    one micro-batch, so a padded one holds 2 × batch_size sequences and a packed row at least one whole pair of
    the longest sequences (2 × max_length); with batch_size ≥ 2 a row's budget holds that already."""
    if not packed:
        return (2 if pairs else 1) * batch_size * max_length
    budget = row_tokens or batch_size * max_length
    return max(budget, 2 * max_length) if pairs else budget


def step_groups(order: Sequence[int], sequences_per_step: int) -> list[list[int]]:
    """The epoch's optimizer steps, each ``sequences_per_step`` sequences (all processes' together)."""
    return [list(order[start:start + sequences_per_step]) for start in range(0, len(order), sequences_per_step)]


def shifted_targets(chat: TokenizedChat) -> list[int]:
    return [*chat.labels[1:], IGNORE_INDEX]


def micro_batches(examples: Sequence[TokenizedChat], indices: Sequence[int], batch_size: int, max_length: int,
                  pad_id: int, packed: bool, rank: int = 0, world: int = 1,
                  row_tokens: int | None = None) -> list[MicroBatch]:
    """This process's micro-batches (padded or packed) of one optimizer step's sequences ``indices``.

    Padded: every ``world``-th sequence, ``batch_size`` to a micro-batch. Packed: the whole step is laid out at once
    into the same number of rows per process with similar token counts (``balanced_rows``), and this process takes
    its rows — a process never waits on another with more tokens, and no process pads its step with filler rows
    while another still has sequences (laying out each process's share alone did both: 2 processes spent ~27% of
    their compute waiting or on filler rows on the benchmark's chat lengths). A process can get no row when the step
    has fewer sequences than rows to fill; the caller gives it a filler. ``row_tokens``: a packed row's budget
    (default ``batch_size × max_length``)."""
    if not packed:
        mine = [examples[i] for i in indices[rank::world]]
        return [_padded(mine[i:i + batch_size], pad_id) for i in range(0, len(mine), batch_size)]
    seqs = [examples[i] for i in indices]
    rows = balanced_rows([len(s.input_ids) for s in seqs], row_tokens or batch_size * max_length, world)
    return [_packed([seqs[k] for k in row]) for row in rows[rank::world] if row]


def balanced_rows(lengths: Sequence[int], budget: int, groups: int = 1) -> list[list[int]]:
    """Lay sequences of ``lengths`` into ``groups × n`` rows of at most ``budget`` tokens with similar totals, n as
    small as fits; row k belongs to group (process) ``k % groups``. Returns positions into ``lengths``, in order
    within each row; a row may be empty when there are fewer sequences than rows.

    Filling rows greedily leaves a short last row (16 chat sequences of ~8.5K tokens with an 8K budget: 8,192 + ~350),
    and a row costs a fixed ~0.25 s of kernel launches on an 8B model whatever its length (measured on an H200), so
    the short row is pure overhead. Longest-first into the least-filled row gives rows of ~4.3K + ~4.3K instead.
    Deterministic; the step's sequences and loss are unchanged, only their layout."""
    total = sum(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n_rows = max(1, -(-total // (budget * groups))) * groups
    while True:
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        used = [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=lambda k: (used[k], k))
            if used[r] + lengths[i] > budget:
                break
            rows[r].append(i)
            used[r] += lengths[i]
        else:
            return [sorted(row) for row in rows]
        n_rows += groups


def _padded(seqs: list[TokenizedChat], pad_id: int) -> MicroBatch:
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        tgt[row, :n] = torch.tensor(shifted_targets(s))
        mask[row, :n] = 1
    pos = torch.arange(width).unsqueeze(0).expand(len(seqs), -1).contiguous()
    return MicroBatch(ids, tgt, pos, mask, None, width, int(mask.sum()), int((tgt != IGNORE_INDEX).sum()))


def _packed(seqs: list[TokenizedChat]) -> MicroBatch:
    ids: list[int] = []
    tgt: list[int] = []
    pos: list[int] = []
    starts = [0]
    for s in seqs:
        ids += s.input_ids
        tgt += shifted_targets(s)
        pos += range(len(s.input_ids))
        starts.append(len(ids))
    targets = torch.tensor([tgt])
    return MicroBatch(torch.tensor([ids]), targets, torch.tensor([pos]), None,
                      torch.tensor(starts, dtype=torch.int32), max(len(s.input_ids) for s in seqs), len(ids),
                      int((targets != IGNORE_INDEX).sum()))
