"""The grain input pipeline: an endless, seeded, checkpointable stream of training batches.

Element ``i`` of the dataset is global batch ``i`` of a :class:`~jaxrm.data.batching.BatchPlan`, so
grain's iterator state (``{"next_index": i}``) is the whole data position of a run: saving it with
the checkpoint and restoring it continues at the exact next example, on any number of processes.
Collation runs in grain's reader threads and is prefetched while the device computes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grain

from jaxrm.data.batching import SEQUENCES_PER_ROW, BatchPlan, Collator
from jaxrm.data.tokenize import TokenizedExample


def training_batches(
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    seed: int,
    buckets: Sequence[int],
    pad_id: int,
    length_group_batches: int = 0,
    balance_group_batches: int = 0,
    sequences_per_row: int = SEQUENCES_PER_ROW,
    micro_batches: int = 1,
    row_shards: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 4,
) -> tuple[grain.DatasetIterator, BatchPlan]:
    """An endless iterator of :class:`~jaxrm.data.batching.Batch` (this process's rows of each batch),
    and the plan that says which examples form global batch ``i`` (to name them in error messages).

    ``iterator.get_state()`` / ``iterator.set_state(state)`` save and restore the position.
    """
    if batch_size % process_count:
        raise ValueError(f"train.batch_size ({batch_size}) must divide by the number of processes ({process_count})")
    collator = Collator(examples, buckets=buckets, pad_id=pad_id, sequences_per_row=sequences_per_row,
                        micro_batches=micro_batches, row_shards=row_shards, process_index=process_index,
                        process_count=process_count)
    plan = BatchPlan(collator.lengths, batch_size=batch_size, seed=seed, length_group_batches=length_group_batches,
                     tokens=collator.tokens, balance_group_batches=balance_group_batches)
    dataset = grain.MapDataset.range(0, sys.maxsize).map(lambda index: collator(plan(index)))
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options)), plan
