"""Tokenised examples → fixed-shape batches: packed rows, length buckets, masked padding.

A batch holds ``B`` examples of ``K`` sequences each (``K = 2`` for pairs and ties, the list size for
rankings), and all ``B·K`` sequences go through the model in one forward pass. They are *packed*: a row of
``T`` tokens holds several sequences side by side (first-fit decreasing, at most ``sequences_per_row``),
told apart by segment ids, and the model keeps them apart with a block-diagonal attention mask
(`jaxrm.models.RewardModel.packed_rewards`). So the model computes (almost) no padding, whatever the
spread of lengths. ``sequences_per_row = 1`` gives the classic layout, one right-padded sequence per row.

Shapes are bucketed so a run compiles a handful of steps, not one per batch: ``T`` is the smallest
*length bucket* that fits the batch's longest sequence, and the number of rows ``R`` the smallest *row
bucket* (1–8, then steps of 2, 4, 8, … rows) that holds the packing. A batch that the data cannot fill
(the end of an epoch, the end of the eval set) is padded with masked examples (``example_mask = False``,
no tokens): nothing is dropped, nothing is repeated, and the loss is the exact mean over the real examples.

Which examples form batch ``i`` is a pure function of ``(seed, i)`` (:class:`BatchPlan`), so the data
position of a run is just the index of the next batch, and every process computes the same global batch
(and its packing) and keeps its own rows of it.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence

import flax.struct
import numpy as np

from jaxrm.data.tokenize import TokenizedExample

BUCKET_STEPS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
#: Sequences a row may hold by default: enough to pack hh-rlhf-like lengths into 256-token rows, few enough
#: that the reward model's last layer (which runs only on pooled tokens) stays small.
SEQUENCES_PER_ROW = 8


@flax.struct.dataclass
class Batch:
    """One global (or process-local) batch. Token fields have a leading axis of rows, the rest of examples.

    Attributes:
      input_ids: int32 ``[R, T]`` token ids of packed rows, padded with the pad id.
      segment_ids: int32 ``[R, T]``: 0 on padding, j ≥ 1 on the tokens of the row's j-th sequence.
      sequence_index: int32 ``[B, K]``: where response k of example b sits, as ``row · max_segments + j − 1``
        (rows counted within the micro-batch, see `collate`); 0 for empty slots and padding examples.
      ranks: int32 ``[B, K]``, 0 = best; equal ranks are ties. Pairs are ``[0, 1]`` (slot 0 = chosen).
      slot_mask: bool ``[B, K]``, real response slots (lists shorter than K are padded).
      outcome: int32 ``[B]``, +1 / −1 / 0 for tie records (+1 for pairs).
      margin: float32 ``[B]``, the pairwise margin m (0 when none).
      rating: int32 ``[B]``, index into ``RATING_LEVELS``, −1 when unknown.
      example_mask: bool ``[B]``, real examples (False on padding examples).
      max_segments: static: the most sequences a row holds (M).
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    sequence_index: np.ndarray
    ranks: np.ndarray
    slot_mask: np.ndarray
    outcome: np.ndarray
    margin: np.ndarray
    rating: np.ndarray
    example_mask: np.ndarray
    max_segments: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def num_examples(self) -> int:
        return int(np.sum(self.example_mask))

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in these rows."""
        return int(np.sum(np.asarray(self.segment_ids) != 0))


def default_buckets(max_length: int) -> list[int]:
    """Bucket lengths for ``max_length``: 32, 64, 96, 128, then ×1.5 steps, capped at max_length."""
    return sorted({min(step, max_length) for step in BUCKET_STEPS if step < max_length} | {max_length})


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")


def row_bucket(rows: int) -> int:
    """The smallest row count of the series 1 … 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, … (steps of 1/8
    to 1/4) that is at least ``rows``: few distinct shapes, at most ~20 % of empty rows."""
    step = 1
    while rows > 8 * step:
        step *= 2
    return -(-rows // step) * step


def example_length(example: TokenizedExample) -> int:
    return max(len(sequence) for sequence in example.sequences)


def pack(lengths: Sequence[int], *, capacity: int, max_segments: int) -> list[tuple[int, int, int]]:
    """First-fit decreasing: ``(row, start column, segment id)`` of each sequence, in input order.

    Longest first, each sequence goes to the first row with room for it (at most ``capacity`` tokens and
    ``max_segments`` sequences per row); segment ids count from 1 in the order sequences enter a row.
    """
    used: list[int] = []
    counts: list[int] = []
    placements: list[tuple[int, int, int]] = [(0, 0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sequence of {lengths[i]} tokens is longer than the row ({capacity} tokens)")
        row = next((r for r in range(len(used)) if used[r] + lengths[i] <= capacity and counts[r] < max_segments),
                   len(used))
        if row == len(used):
            used.append(0)
            counts.append(0)
        placements[i] = (row, used[row], counts[row] + 1)
        used[row] += lengths[i]
        counts[row] += 1
    return placements


def collate(
    examples: Sequence[TokenizedExample | None],
    *,
    list_size: int,
    length: int,
    pad_id: int,
    sequences_per_row: int = 1,
    micro_batches: int = 1,
    row_shards: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Batch:
    """Packs a global batch (``None`` = a padding example) into rows of ``length`` tokens; returns the rows
    and examples of process ``process_index``.

    Example ``e`` belongs to micro-batch ``e % micro_batches`` (the split of `jaxrm.train.step`), whose
    sequences are packed together into rows ``q · micro_batches + i`` (q = 0, 1, …): a micro-batch's rows
    are then the same stride of the row axis, and ``sequence_index`` counts rows within it. Every
    micro-batch gets the same number of rows: a row bucket, times ``row_shards`` (the devices the rows are
    split over) so that each device holds whole rows.
    """
    num = len(examples)
    if num % (micro_batches * process_count):
        raise ValueError(f"{num} examples do not divide into {micro_batches} micro-batches × {process_count} processes")
    placements: dict[tuple[int, int], tuple[int, int, int]] = {}
    rows_needed = 1
    for micro in range(micro_batches):
        slots = [(e, k) for e in range(micro, num, micro_batches) if examples[e] is not None
                 for k in range(len(examples[e].sequences))]
        lengths = [len(examples[e].sequences[k]) for e, k in slots]
        packed = pack(lengths, capacity=length, max_segments=sequences_per_row)
        for (e, k), (row, start, segment) in zip(slots, packed):
            placements[e, k] = (row * micro_batches + micro, start, segment)
        rows_needed = max(rows_needed, 1 + max((row for row, _, _ in packed), default=0))
    shards = math.lcm(row_shards, process_count)  # every device, and so every process, holds whole rows
    rows = micro_batches * shards * row_bucket(-(-rows_needed // shards))

    rows_per_process, per_process = rows // process_count, num // process_count
    first_row, first_example = process_index * rows_per_process, process_index * per_process
    input_ids = np.full((rows_per_process, length), pad_id, np.int32)
    segment_ids = np.zeros((rows_per_process, length), np.int32)
    for (e, k), (row, start, segment) in placements.items():
        if first_row <= row < first_row + rows_per_process:
            sequence = examples[e].sequences[k]
            input_ids[row - first_row, start : start + len(sequence)] = sequence
            segment_ids[row - first_row, start : start + len(sequence)] = segment

    local = range(first_example, first_example + per_process)
    sequence_index = np.zeros((per_process, list_size), np.int32)
    ranks = np.zeros((per_process, list_size), np.int32)
    slot_mask = np.zeros((per_process, list_size), bool)
    outcome = np.ones((per_process,), np.int32)
    margin = np.zeros((per_process,), np.float32)
    rating = np.full((per_process,), -1, np.int32)
    example_mask = np.zeros((per_process,), bool)
    for i, e in enumerate(local):
        example = examples[e]
        if example is None:
            continue
        k = len(example.sequences)
        for slot in range(k):
            row, _, segment = placements[e, slot]
            sequence_index[i, slot] = (row // micro_batches) * sequences_per_row + segment - 1
        ranks[i, :k] = example.ranks
        slot_mask[i, :k] = True
        outcome[i] = example.outcome
        margin[i] = example.margin
        rating[i] = example.rating
        example_mask[i] = True
    return Batch(input_ids, segment_ids, sequence_index, ranks, slot_mask, outcome, margin, rating, example_mask,
                 max_segments=sequences_per_row)


class BatchPlan:
    """Which examples make global batch ``i``: seeded, epoch by epoch, optionally grouped.

    Each epoch is a fresh permutation (seeded by ``(seed, epoch)``) of every example, cut into
    ``ceil(N / batch_size)`` batches, the last one padded with ``-1`` (masked) slots. Two ways to shape
    the batches, each over groups of ``G`` batches of the permutation, whose batches are then shuffled
    again (every example is still seen exactly once per epoch):

    - ``balance_group_batches = G``: the group's examples are dealt (`balanced_batches`) so that its
      batches hold nearly the same number of tokens — packed rows then need the same row count batch after
      batch (one or two shapes to compile, few empty rows);
    - ``length_group_batches = G``: the group is sorted by length, so batches hold similar lengths (little
      padding with one sequence per row).
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int, seed: int, length_group_batches: int = 0,
                 tokens: Sequence[int] | None = None, balance_group_batches: int = 0):
        if len(lengths) == 0:
            raise ValueError("no examples to batch")
        if length_group_batches > 0 and balance_group_batches > 0:
            raise ValueError("group batches by length or balance their tokens, not both")
        self.lengths = np.asarray(lengths)
        self.tokens = np.asarray(tokens if tokens is not None else lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.length_group_batches = length_group_batches
        self.balance_group_batches = balance_group_batches
        self.batches_per_epoch = -(-len(self.lengths) // batch_size)

    def __call__(self, index: int) -> np.ndarray:
        """Indices of global batch ``index`` (int64 ``[batch_size]``, −1 = padding example)."""
        epoch, position = divmod(index, self.batches_per_epoch)
        return self._epoch(epoch)[position]

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        group = (self.length_group_batches or self.balance_group_batches) * self.batch_size
        chunks = np.split(order, range(group, len(order), group)) if group else []
        if self.balance_group_batches > 0:
            batches = np.concatenate([balanced_batches(chunk, self.tokens, self.batch_size) for chunk in chunks])
        else:
            if self.length_group_batches > 0:
                order = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")] for chunk in chunks])
            padded = np.full(self.batches_per_epoch * self.batch_size, -1, np.int64)
            padded[: len(order)] = order
            batches = padded.reshape(self.batches_per_epoch, self.batch_size)
        return batches[rng.permutation(self.batches_per_epoch)] if group else batches


def balanced_batches(indices: np.ndarray, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Deals ``indices`` into ``ceil(n / batch_size)`` batches, int64 ``[num, batch_size]`` (−1 = padding).

    Largest first, each example goes to the batch with the fewest tokens so far that has a free slot, so
    the batches' token totals come out nearly equal (within about one example's tokens). When ``n`` does
    not fill them, the padding slots are spread (batch sizes differ by at most one), so that even then
    every batch holds about the same number of tokens.
    """
    indices = np.asarray(indices)
    num = -(-len(indices) // batch_size)
    batches = np.full((num, batch_size), -1, np.int64)
    room = [len(indices) // num + (b < len(indices) % num) for b in range(num)]
    filled = [0] * num
    heap = [(0, b) for b in range(num)]
    for i in indices[np.argsort(-tokens[indices], kind="stable")]:
        total, b = heapq.heappop(heap)
        batches[b, filled[b]] = i
        filled[b] += 1
        if filled[b] < room[b]:
            heapq.heappush(heap, (total + int(tokens[i]), b))
    return batches


def sequential_batches(lengths: Sequence[int], batch_size: int, *, tokens: Sequence[int] | None = None
                       ) -> list[np.ndarray]:
    """Every example exactly once (eval and scoring: order does not matter there): sorted by length (least
    padding with one sequence per row), or, given ``tokens``, dealt into batches of nearly equal token
    totals (`balanced_batches`: packed rows of the same shape batch after batch)."""
    if tokens is not None:
        return list(balanced_batches(np.arange(len(lengths)), np.asarray(tokens), batch_size))
    order = np.argsort(np.asarray(lengths), kind="stable")
    num_batches = -(-len(order) // batch_size)
    padded = np.full(num_batches * batch_size, -1, np.int64)
    padded[: len(order)] = order
    return list(padded.reshape(num_batches, batch_size))


class Collator:
    """Turns a row of global example indices into a :class:`Batch` (this process's part, if several).

    Args:
      examples: the tokenised examples the indices point into.
      buckets: row lengths T; a batch takes the smallest that fits its longest sequence.
      pad_id: token id of padding.
      list_size: K (default: the longest list among ``examples``).
      sequences_per_row: most sequences packed into one row (1: one padded sequence per row).
      micro_batches: gradient-accumulation steps the batch is split into (each is packed on its own).
      row_shards: devices the rows are split over (data × fsdp); rows per micro-batch are a multiple of it.
      process_index, process_count: this process among those that share the global batch.
    """

    def __init__(self, examples: Sequence[TokenizedExample], *, buckets: Sequence[int], pad_id: int,
                 list_size: int | None = None, sequences_per_row: int = SEQUENCES_PER_ROW, micro_batches: int = 1,
                 row_shards: int = 1, process_index: int = 0, process_count: int = 1):
        self.examples = examples
        self.buckets = sorted(buckets)
        self.pad_id = pad_id
        self.list_size = list_size or max(len(example.sequences) for example in examples)
        self.lengths = np.array([example_length(example) for example in examples])
        self.tokens = np.array([sum(len(sequence) for sequence in example.sequences) for example in examples])
        self.options = dict(sequences_per_row=sequences_per_row, micro_batches=micro_batches, row_shards=row_shards,
                            process_index=process_index, process_count=process_count)

    def __call__(self, indices: np.ndarray) -> Batch:
        real = indices[indices >= 0]
        # The bucket comes from the whole global batch, so every process pads to the same length.
        length = bucket_length(int(self.lengths[real].max()) if len(real) else 1, self.buckets)
        return collate([self.examples[i] if i >= 0 else None for i in indices], list_size=self.list_size,
                       length=length, pad_id=self.pad_id, **self.options)
