"""Seeded bucket batching with a resumable position (SPEC.md §5.6).

Every epoch, each bucket's samples are repeated ``num_multiply`` times (and, when that is
still fewer than one batch, repeated until it fills a batch), shuffled and cut into batches,
the last partial batch kept. Batches then come from a uniformly random bucket among those not
yet used up in the epoch, as the reference's loader does.

Hand-written rather than built from torch DataLoaders (the reference's way) because a run
must stop and resume at the same batch: each epoch's order is a pure function of
``(seed, epoch)``, so the state is three integers. An epoch's order is built once when it
starts (linear in its samples); each batch after that costs only its own size.

Differences from the reference: a bucket smaller than the batch is repeated just enough
times to fill one batch (the reference repeated it ``batch_size`` times, which made small
buckets count several times over).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np


def _positive(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or number < 1:
        raise ValueError(f"{name} {value!r} is not valid: it must be a whole number >= 1")
    return int(number)


def _sample_index(member: Any) -> int:
    """Members are sample indices, or planned samples whose ``index`` is their position."""
    if isinstance(member, (int, np.integer)) and not isinstance(member, bool):
        return int(member)
    index = getattr(member, "index", None)
    if not isinstance(index, int):
        raise TypeError(f"bucket members must be sample indices or planned samples, not {type(member).__name__}")
    return index


class BucketBatcher:
    """Endless iterator of batches (lists of sample indices) drawn bucket by bucket.

    ``groups`` maps a bucket key to its members: ints, or planned samples (their ``index``
    is used), as ``samples.group_by_bucket`` / ``bucket_indices`` give. ``epoch`` counts the
    epochs completed; ``last_bucket`` is the key of the batch returned last.
    """

    def __init__(self, groups: Mapping[Hashable, Sequence], batch_size: int, num_multiply: int = 1, seed: int = 0):
        self.batch_size = _positive(batch_size, "train_batch_size")
        self.num_multiply = _positive(num_multiply, "image_num_multiply")
        self.seed = int(seed)
        filled = [(key, members) for key, members in groups.items() if len(members) > 0]
        if not filled:
            raise ValueError("no samples to batch: every bucket is empty")
        self._keys = [key for key, _ in filled]
        self._members = [np.array([_sample_index(m) for m in members], dtype=np.int64) for _, members in filled]
        self.epoch = 0
        self.last_bucket: Hashable | None = None
        self._position = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        """Shuffle every bucket and draw the bucket order for epoch ``self.epoch``."""
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])
        size = self.batch_size
        pools = []
        for members in self._members:
            pool = np.tile(members, self.num_multiply)
            if len(pool) < size:
                pool = np.tile(pool, -(-size // len(pool)))
            pools.append(rng.permutation(pool))
        left = [-(-len(pool) // size) for pool in pools]
        active = list(range(len(pools)))
        used = [0] * len(pools)
        order: list[tuple[int, int]] = []
        while active:
            slot = int(rng.integers(len(active)))
            bucket = active[slot]
            order.append((bucket, used[bucket] * size))
            used[bucket] += 1
            if used[bucket] == left[bucket]:
                active[slot] = active[-1]  # O(1) removal; the order of `active` carries no meaning
                active.pop()
        self._pools, self._order = pools, order

    @property
    def batches_per_epoch(self) -> int:
        """How many batches one epoch has."""
        return len(self._order)

    @property
    def position(self) -> int:
        """Batches already taken from the current epoch."""
        return self._position

    def __iter__(self) -> "BucketBatcher":
        return self

    def __next__(self) -> list[int]:
        bucket, start = self._order[self._position]
        batch = self._pools[bucket][start:start + self.batch_size].tolist()
        self.last_bucket = self._keys[bucket]
        self._position += 1
        if self._position == len(self._order):
            self.epoch += 1
            self._position = 0
            self._start_epoch()
        return batch

    def _shape(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_multiply": self.num_multiply,
                "bucket_sizes": [len(m) for m in self._members]}

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state: load it into a batcher over the same buckets to continue here."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self._position, **self._shape()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; ValueError when the buckets or batch settings differ."""
        missing = [k for k in ("seed", "epoch", "position", "batch_size", "num_multiply", "bucket_sizes")
                   if k not in state]
        if missing:
            raise ValueError(f"batch-order state is missing {', '.join(missing)}; cannot resume the batch order")
        saved = {"batch_size": int(state["batch_size"]), "num_multiply": int(state["num_multiply"]),
                 "bucket_sizes": [int(n) for n in state["bucket_sizes"]]}
        for key, value in self._shape().items():
            if saved[key] != value:
                raise ValueError(f"cannot resume the batch order: {key} was {saved[key]!r} when it was saved "
                                 f"and is {value!r} now (the images or batch settings changed)")
        position = int(state["position"])
        # Every epoch has the same number of batches, so the current one tells the range.
        if not 0 <= position < len(self._order):
            raise ValueError(f"cannot resume the batch order: position {position} is outside the "
                             f"{len(self._order)} batches of an epoch")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._start_epoch()
        self._position = position
