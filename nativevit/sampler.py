"""Token-budget batches for training and dataset-scale encoding, for one process or many (DDP).

A packed batch costs what its tokens cost, not what its image count is: batches are formed by a token
budget. ``TokenBudgetSampler`` is a ``DataLoader`` batch sampler that does this deterministically
per (seed, epoch) and splits the batches evenly over ranks, so every rank takes the same number of
steps (a rank that runs out early would leave the others waiting in a collective forever).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .packing import pack_by_budget


class TokenBudgetSampler(torch.utils.data.Sampler):
    """Batches of dataset indices holding at most ``budget`` tokens each (an item over the budget is a
    batch of its own).

    Each epoch: the indices are shuffled (``shuffle``) with a generator seeded by ``(seed, epoch)``,
    cut into pools of ``pool`` consecutive items, each pool packed longest-first by
    :func:`nativevit.packing.pack_by_budget`, and the batches shuffled again. Every rank computes the
    same global list and takes every ``world_size``-th batch from ``rank``. With ``drop_last`` the
    batches that do not divide evenly over ranks are dropped; without it the fewest batches needed are
    repeated from the start of the list, so each index appears once per epoch plus those repeats.

    Args:
        lengths: token count of every dataset item (e.g. ``ImageProcessor.grid_for`` products).
        budget: most tokens per batch.
        shuffle, seed: randomise per epoch (``set_epoch``), deterministically.
        rank, world_size: this process's place among the data-parallel processes.
        drop_last: drop the uneven tail instead of repeating batches.
        pool: items packed together (larger: fuller batches, less randomness).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        budget: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pool: int = 4096,
    ):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("lengths is empty: nothing to sample")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int, got {budget!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be a positive int, got {pool!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.budget, self.shuffle, self.seed = budget, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.pool = rank, world_size, drop_last, pool
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order (call before iterating each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, before the split over ranks (even count, repeats included)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (1 << 63))
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        batches = []
        for start in range(0, n, self.pool):
            chunk = order[start : start + self.pool]
            packed = pack_by_budget([self.lengths[i] for i in chunk], self.budget)
            batches.extend([chunk[j] for j in b] for b in packed)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        extra = len(batches) % self.world_size
        if extra and self.drop_last:
            batches = batches[: len(batches) - extra]
        elif extra:
            need = self.world_size - extra
            batches = batches + [batches[i % len(batches)] for i in range(need)]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.global_batches()) // self.world_size
