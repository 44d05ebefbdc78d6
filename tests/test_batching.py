"""Batches: buckets, masked padding examples, the seeded plan, and grain's resumable position."""

import numpy as np
import pytest

from jaxrm.data.batching import (
    BatchPlan,
    Collator,
    balanced_batches,
    bucket_length,
    collate,
    default_buckets,
    pack,
    row_bucket,
    sequential_batches,
)
from jaxrm.data.pipeline import training_batches
from jaxrm.data.tokenize import TokenizedExample


def make_example(lengths, ranks=None, source="x:1", margin=0.0, rating=-1):
    sequences = tuple(np.arange(1, n + 1, dtype=np.int32) for n in lengths)
    return TokenizedExample(
        sequences=sequences,
        ranks=np.asarray(ranks if ranks is not None else range(len(lengths)), np.int32),
        outcome=1, margin=margin, rating=rating, true_rewards=None, source=source, truncated=False,
        subset=None, response_lengths=np.asarray(lengths, np.int32),
    )


def test_default_buckets():
    assert default_buckets(256) == [32, 64, 96, 128, 192, 256]
    assert default_buckets(100) == [32, 64, 96, 100]
    assert bucket_length(65, [32, 64, 96]) == 96
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_length(97, [32, 64, 96])


def tokens_of(batch, example, slot, micro_batches=1):
    """The tokens ``batch`` holds for response ``slot`` of ``example``, read back through sequence_index."""
    row, segment = divmod(int(batch.sequence_index[example, slot]), batch.max_segments)
    rows = batch.input_ids[example % micro_batches :: micro_batches]
    segments = batch.segment_ids[example % micro_batches :: micro_batches]
    return rows[row][segments[row] == segment + 1]


def test_collate_one_sequence_per_row_pads_and_masks():
    batch = collate([make_example([3, 5], margin=0.5, rating=2), None], list_size=2, length=8, pad_id=0)
    assert batch.input_ids.shape == (2, 8) and batch.max_segments == 1
    np.testing.assert_array_equal(batch.segment_ids[batch.sequence_index[0, 0]], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch.input_ids[batch.sequence_index[0, 1]], [1, 2, 3, 4, 5, 0, 0, 0])
    assert batch.sequence_index[0, 0] != batch.sequence_index[0, 1]
    np.testing.assert_array_equal(batch.example_mask, [True, False])
    assert batch.margin[0] == 0.5 and batch.rating[0] == 2 and batch.rating[1] == -1
    assert batch.num_tokens == 8  # the padding example brings no tokens


def test_collate_pads_short_lists():
    batch = collate([make_example([2, 2, 2], ranks=[1, 0, 2]), make_example([2, 2])], list_size=3, length=4, pad_id=0)
    np.testing.assert_array_equal(batch.slot_mask, [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(batch.ranks[0], [1, 0, 2])


def test_row_buckets():
    assert [row_bucket(n) for n in range(1, 10)] == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert [row_bucket(n) for n in (11, 15, 17, 33, 70)] == [12, 16, 20, 40, 80]
    for n in range(1, 500):
        assert n <= row_bucket(n) <= 1.25 * n + 1


def test_pack_first_fit_decreasing_respects_capacity_and_segments():
    lengths = list(np.random.default_rng(0).integers(1, 60, size=40))
    placements = pack(lengths, capacity=64, max_segments=3)
    rows = {}
    for length, (row, start, segment) in zip(lengths, placements):
        rows.setdefault(row, []).append((start, length, segment))
    for spans in rows.values():
        spans.sort()
        assert len(spans) <= 3 and sorted(s for _, _, s in spans) == list(range(1, len(spans) + 1))
        assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous
        assert spans[-1][0] + spans[-1][1] <= 64
    assert len(rows) <= -(-sum(lengths) // 64) + 3  # close to the fewest rows the tokens need
    with pytest.raises(ValueError, match="longer than the row"):
        pack([65], capacity=64, max_segments=2)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_packed_rows_hold_every_sequence_once(micro_batches):
    rng = np.random.default_rng(1)
    examples = [make_example(rng.integers(1, 30, size=2)) for _ in range(7)] + [None]
    batch = collate(examples, list_size=2, length=32, pad_id=0, sequences_per_row=4, micro_batches=micro_batches,
                    row_shards=2)
    assert batch.input_ids.shape[0] % (2 * micro_batches) == 0
    assert batch.input_ids.shape[0] < 14  # fewer rows than sequences
    for e, example in enumerate(examples[:7]):
        for slot, sequence in enumerate(example.sequences):
            np.testing.assert_array_equal(tokens_of(batch, e, slot, micro_batches), sequence)
    assert batch.num_tokens == sum(len(q) for example in examples[:7] for q in example.sequences)
    np.testing.assert_array_equal(batch.input_ids[batch.segment_ids == 0], 0)


def test_process_rows_share_the_global_packing():
    examples = [make_example([n, n + 1]) for n in (5, 40, 6, 7)]
    whole = Collator(examples, buckets=[32, 64], pad_id=0, row_shards=2)(np.arange(4))
    parts = [Collator(examples, buckets=[32, 64], pad_id=0, process_index=p, process_count=2)(np.arange(4))
             for p in range(2)]
    assert parts[0].input_ids.shape == parts[1].input_ids.shape
    assert parts[0].input_ids.shape[1] == 64
    np.testing.assert_array_equal(np.concatenate([p.input_ids for p in parts]), whole.input_ids)
    np.testing.assert_array_equal(np.concatenate([p.sequence_index for p in parts]), whole.sequence_index)


@pytest.mark.parametrize("group, balance", [(0, 0), (4, 0), (0, 4)])
def test_plan_is_an_epoch_permutation_with_padding(group, balance):
    lengths = np.random.default_rng(0).integers(1, 100, size=103)
    plan = BatchPlan(lengths, batch_size=8, seed=3, length_group_batches=group, balance_group_batches=balance)
    assert plan.batches_per_epoch == 13
    for epoch in range(2):
        indices = np.concatenate([plan(epoch * 13 + i) for i in range(13)])
        real = indices[indices >= 0]
        assert sorted(real.tolist()) == list(range(103))  # every example once: none dropped, none repeated
        assert (indices < 0).sum() == 1
    assert not np.array_equal(plan(0), plan(13))  # a new order every epoch
    again = BatchPlan(lengths, batch_size=8, seed=3, length_group_batches=group, balance_group_batches=balance)
    np.testing.assert_array_equal(plan(5), again(5))


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(1).integers(10, 250, size=4096)
    buckets = default_buckets(256)

    def padded_tokens(plan):
        total = 0
        for i in range(plan.batches_per_epoch):
            real = plan(i)[plan(i) >= 0]
            total += bucket_length(lengths[real].max(), buckets) * len(real)
        return total

    plain = padded_tokens(BatchPlan(lengths, batch_size=16, seed=0))
    grouped = padded_tokens(BatchPlan(lengths, batch_size=16, seed=0, length_group_batches=16))
    assert grouped < 0.75 * plain
    assert lengths.sum() / grouped > 0.8


def test_balanced_batches_equalise_tokens_and_spread_padding():
    tokens = np.random.default_rng(2).integers(20, 500, size=203)
    batches = balanced_batches(np.arange(203), tokens, 16)
    assert batches.shape == (13, 16)
    real = batches[batches >= 0]
    assert sorted(real.tolist()) == list(range(203))
    assert set((batches >= 0).sum(axis=1).tolist()) == {15, 16}  # the 5 padding slots are spread
    totals = np.array([tokens[b[b >= 0]].sum() for b in batches])
    assert totals.max() - totals.min() <= tokens.max()  # vs. ~3000 apart for random batches of 16
    shuffled = np.random.default_rng(0).permutation(203)[: 13 * 15].reshape(13, 15)
    assert np.ptp(totals) < 0.25 * np.ptp(tokens[shuffled].sum(axis=1))


def test_balanced_plan_keeps_the_row_count_steady():
    rng = np.random.default_rng(3)
    examples = [make_example(rng.integers(20, 250, size=2)) for _ in range(300)]
    collator = Collator(examples, buckets=[256], pad_id=0)
    rows = {}
    for balance in (0, 16):
        plan = BatchPlan(collator.lengths, batch_size=16, seed=0, tokens=collator.tokens, balance_group_batches=balance)
        rows[balance] = {collator(plan(i)).input_ids.shape[0] for i in range(plan.batches_per_epoch)}
    assert len(rows[16]) <= 2 < len(rows[0])
    with pytest.raises(ValueError, match="not both"):
        BatchPlan(collator.lengths, batch_size=16, seed=0, length_group_batches=4, balance_group_batches=4)


def test_sequential_batches_cover_everything_once():
    batches = sequential_batches([5, 3, 9, 1, 7], 2)
    flat = np.concatenate(batches)
    assert sorted(flat[flat >= 0].tolist()) == [0, 1, 2, 3, 4]
    assert len(batches) == 3


def test_grain_iterator_resumes_exactly():
    examples = [make_example([n % 30 + 2, n % 17 + 2], source=f"f:{n}") for n in range(50)]
    iterator, _ = training_batches(examples, batch_size=8, seed=1, buckets=[32], pad_id=0)
    first = [next(iterator) for _ in range(4)]
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed, _ = training_batches(examples, batch_size=8, seed=1, buckets=[32], pad_id=0)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(3)]):
        np.testing.assert_array_equal(want.input_ids, got.input_ids)
    assert not np.array_equal(first[0].input_ids, expected[0].input_ids)
