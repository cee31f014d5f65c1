"""Structures evaluated at a fidelity other than their own, in the same batch.

A training batch can carry, next to its structures, unlabelled *copies* of
some of them tagged with another fidelity: one forward pass of the model then
gives both heads' predictions on the same geometry, which is what coupling the
fidelity heads needs (:mod:`sevenn_mf.coupling`). A copy's labels are NaN, so
sevenn's loss and every error metric skip it (absent labels are masked, never
zero-filled); it only enters the coupling penalty.

Index space of :class:`CrossFidelityDataset`: ``i`` (``0 <= i < N``) is
structure ``i`` of the training set itself; ``i + k N`` is its copy at the
``k``-th target fidelity. :class:`CrossFidelityBatchSampler` chunks the epoch's
order (sevenn_mf's :class:`~sevenn_mf.data.sampler.DatabaseSampler`, so
sampling modes, determinism and DDP shards are unchanged) into batches and,
on a deterministic fraction of them (one draw per batch from (seed, epoch)),
appends the copies of the batch's structures whose fidelity is a source.
Every graph carries ``mf_structure`` (its structure number) and ``mf_copy`` (0 for
the structure itself, ``k`` for a copy), from which the pairs are found.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Iterator, List, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .._sevenn import KEY

# not '*index*': PyG offsets such keys by the node count when batching
INDEX_KEY = 'mf_structure'
COPY_KEY = 'mf_copy'
_LABELS = (KEY.ENERGY, KEY.FORCE, KEY.STRESS)


class CrossFidelityDataset(Dataset):
    """``base`` plus copies of its structures at ``targets`` fidelities."""

    def __init__(self, base, targets: Sequence[str]) -> None:
        self.base = base
        self.n = len(base)
        self.targets = list(targets)

    def __len__(self) -> int:
        return self.n * (1 + len(self.targets))

    def __getitem__(self, j: int):
        k, i = divmod(int(j), self.n)
        # never tag the stored graph itself: other readers of the training
        # set (statistics, the gap range, other ranks' shards) share it
        g = copy.copy(self.base[i])
        if k:
            g = g.clone()
            g[KEY.DATA_MODALITY] = self.targets[k - 1]
            for key in _LABELS:
                if key in g:
                    g[key] = torch.full_like(g[key], float('nan'))
        g[INDEX_KEY] = torch.tensor(i)
        g[COPY_KEY] = torch.tensor(k)
        return g


class CrossFidelityBatchSampler(Sampler[List[int]]):
    """Batches of ``sampler``'s order; a ``fraction`` of them carry copies:
    for a structure of fidelity ``f``, one copy per target in
    ``copies_of[f]`` (target numbers 1..K of the dataset)."""

    def __init__(
        self,
        sampler,
        batch_size: int,
        fidelity_of: Sequence[str],
        copies_of: Dict[str, List[int]],
        fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f'batch size must be >= 1, got {batch_size}')
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f'fraction must be in (0, 1], got {fraction}')
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.fidelity_of = list(fidelity_of)
        self.n = len(self.fidelity_of)
        self.copies_of = {f: list(ks) for f, ks in copies_of.items()}
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def _with_copies(self, batch: List[int]) -> List[int]:
        extra = [
            i + k * self.n
            for i in batch
            for k in self.copies_of.get(self.fidelity_of[i], ())
        ]
        return batch + extra

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator()
        # its own stream: the sampler's order does not change with coupling
        g.manual_seed(self.seed * 1_000_003 + self.epoch + 104_729)
        batch: List[int] = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                yield self._decide(batch, g)
                batch = []
        if batch:
            yield self._decide(batch, g)

    def _decide(self, batch: List[int], g: torch.Generator) -> List[int]:
        draw = float(torch.rand(1, generator=g))  # one draw per batch, always
        return self._with_copies(batch) if draw < self.fraction else batch

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


def pairs_in_batch(batch) -> List[tuple]:
    """[(copy position, original position)] of the graphs of a collated batch
    (empty when it has no copies)."""
    if COPY_KEY not in batch:
        return []
    copy = batch[COPY_KEY].reshape(-1).tolist()
    index = batch[INDEX_KEY].reshape(-1).tolist()
    where = {i: p for p, (i, k) in enumerate(zip(index, copy)) if k == 0}
    return [(p, where[i]) for p, (i, k) in enumerate(zip(index, copy)) if k > 0]
