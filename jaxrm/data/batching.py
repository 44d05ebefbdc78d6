"""Tokenised examples → fixed-shape batches: length buckets, length grouping, masked padding.

A batch holds ``B`` examples of ``K`` sequences each (``K = 2`` for pairs and ties, the list size for
rankings), so chosen and rejected go through the model in one forward pass of ``B·K`` rows. Every
sequence of a batch is padded on the right to the smallest *bucket* length that fits the longest one,
so a run compiles one step per bucket, not one per batch. A batch that the data cannot fill (the end
of an epoch, the end of the eval set) is padded with masked examples (``example_mask = False``):
nothing is dropped, nothing is repeated, and the loss is the exact mean over the real examples.

Which examples form batch ``i`` is a pure function of ``(seed, i)`` (:class:`BatchPlan`), so the data
position of a run is just the index of the next batch, and every process computes the same global batch
and keeps its own rows of it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import numpy as np

from jaxrm.data.tokenize import TokenizedExample

BUCKET_STEPS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


@flax.struct.dataclass
class Batch:
    """One global (or process-local) batch; leading axis = examples.

    Attributes:
      input_ids: int32 ``[B, K, T]`` token ids, right-padded with the pad id.
      attention_mask: int32 ``[B, K, T]``, 1 on real tokens.
      ranks: int32 ``[B, K]``, 0 = best; equal ranks are ties. Pairs are ``[0, 1]`` (slot 0 = chosen).
      slot_mask: bool ``[B, K]``, real response slots (lists shorter than K are padded).
      outcome: int32 ``[B]``, +1 / −1 / 0 for tie records (+1 for pairs).
      margin: float32 ``[B]``, the pairwise margin m (0 when none).
      rating: int32 ``[B]``, index into ``RATING_LEVELS``, −1 when unknown.
      example_mask: bool ``[B]``, real examples (False on padding examples).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    ranks: np.ndarray
    slot_mask: np.ndarray
    outcome: np.ndarray
    margin: np.ndarray
    rating: np.ndarray
    example_mask: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(np.sum(self.example_mask))


def default_buckets(max_length: int) -> list[int]:
    """Bucket lengths for ``max_length``: 32, 64, 96, 128, then ×1.5 steps, capped at max_length."""
    return sorted({min(step, max_length) for step in BUCKET_STEPS if step < max_length} | {max_length})


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")


def example_length(example: TokenizedExample) -> int:
    return max(len(sequence) for sequence in example.sequences)


def collate(
    examples: Sequence[TokenizedExample | None],
    *,
    list_size: int,
    length: int,
    pad_id: int,
) -> Batch:
    """Stacks examples into a :class:`Batch` padded to ``length`` tokens; ``None`` = a padding example."""
    num = len(examples)
    input_ids = np.full((num, list_size, length), pad_id, np.int32)
    attention_mask = np.zeros((num, list_size, length), np.int32)
    ranks = np.zeros((num, list_size), np.int32)
    slot_mask = np.zeros((num, list_size), bool)
    outcome = np.ones((num,), np.int32)
    margin = np.zeros((num,), np.float32)
    rating = np.full((num,), -1, np.int32)
    example_mask = np.zeros((num,), bool)
    for row, example in enumerate(examples):
        if example is None:
            # A padding example still needs one real token per slot so attention rows are well defined.
            attention_mask[row, :, 0] = 1
            continue
        for slot, sequence in enumerate(example.sequences):
            input_ids[row, slot, : len(sequence)] = sequence
            attention_mask[row, slot, : len(sequence)] = 1
        k = len(example.sequences)
        attention_mask[row, k:, 0] = 1
        ranks[row, :k] = example.ranks
        slot_mask[row, :k] = True
        outcome[row] = example.outcome
        margin[row] = example.margin
        rating[row] = example.rating
        example_mask[row] = True
    return Batch(input_ids, attention_mask, ranks, slot_mask, outcome, margin, rating, example_mask)


class BatchPlan:
    """Which examples make global batch ``i``: seeded, epoch by epoch, optionally grouped by length.

    Each epoch is a fresh permutation (seeded by ``(seed, epoch)``) of every example, cut into
    ``ceil(N / batch_size)`` batches, the last one padded with ``-1`` (masked) slots. With
    ``length_group_batches = G > 0`` the permutation is cut into groups of ``G`` batches, sorted by
    length inside each group, and the batches of the epoch are shuffled again: batches hold similar
    lengths (little padding) while every example is still seen exactly once per epoch.
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int, seed: int, length_group_batches: int = 0):
        if len(lengths) == 0:
            raise ValueError("no examples to batch")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.length_group_batches = length_group_batches
        self.batches_per_epoch = -(-len(self.lengths) // batch_size)

    def __call__(self, index: int) -> np.ndarray:
        """Indices of global batch ``index`` (int64 ``[batch_size]``, −1 = padding example)."""
        epoch, position = divmod(index, self.batches_per_epoch)
        return self._epoch(epoch)[position]

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        if self.length_group_batches > 0:
            group = self.length_group_batches * self.batch_size
            order = np.concatenate([
                chunk[np.argsort(self.lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(group, len(order), group))
            ])
        padded = np.full(self.batches_per_epoch * self.batch_size, -1, np.int64)
        padded[: len(order)] = order
        batches = padded.reshape(self.batches_per_epoch, self.batch_size)
        if self.length_group_batches > 0:
            batches = batches[rng.permutation(self.batches_per_epoch)]
        return batches


def sequential_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Every example exactly once, sorted by length (eval and scoring: order does not matter there)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    num_batches = -(-len(order) // batch_size)
    padded = np.full(num_batches * batch_size, -1, np.int64)
    padded[: len(order)] = order
    return list(padded.reshape(num_batches, batch_size))


class Collator:
    """Turns a row of example indices into a :class:`Batch` (the rows of one process, if sharded)."""

    def __init__(self, examples: Sequence[TokenizedExample], *, buckets: Sequence[int], pad_id: int,
                 list_size: int | None = None, process_index: int = 0, process_count: int = 1):
        self.examples = examples
        self.buckets = sorted(buckets)
        self.pad_id = pad_id
        self.list_size = list_size or max(len(example.sequences) for example in examples)
        self.lengths = np.array([example_length(example) for example in examples])
        self.process_index = process_index
        self.process_count = process_count

    def __call__(self, indices: np.ndarray) -> Batch:
        real = indices[indices >= 0]
        # The bucket comes from the whole global batch, so every process pads to the same length.
        length = bucket_length(int(self.lengths[real].max()) if len(real) else 1, self.buckets)
        per_process = len(indices) // self.process_count
        local = indices[self.process_index * per_process : (self.process_index + 1) * per_process]
        return collate(
            [self.examples[i] if i >= 0 else None for i in local],
            list_size=self.list_size, length=length, pad_id=self.pad_id,
        )
