"""Which structures an epoch visits, across databases of very different size.

``proportional``: every structure once per epoch (a shuffled permutation);
``temperature``: database d is drawn with probability ∝ n_d^(1/T);
``explicit``: database d is drawn with a given ratio.
The order depends only on (seed, epoch), so a resumed run repeats the same
schedule, and with ``num_replicas`` > 1 each rank takes a disjoint shard: rank
r gets positions r, r + R, r + 2R, ... of the epoch's global order, so that
with per-rank batch b the ranks' k-th batches together are exactly the k-th
batch of size R*b of a single-process run. In ``proportional`` mode the shards
partition the epoch (no structure repeated or dropped; shard sizes differ by
at most one, the trainer evens out the step count with DDP's ``join``). The
sampling modes draw with replacement anyway, so there the epoch is rounded up
to a multiple of R by wrapping around.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler

MODES = ('proportional', 'temperature', 'explicit')


class DatabaseSampler(Sampler[int]):
    def __init__(
        self,
        sizes: Sequence[int],
        mode: str = 'proportional',
        names: Optional[Sequence[str]] = None,
        temperature: float = 1.0,
        ratios: Optional[Dict[str, float]] = None,
        epoch_length: Optional[int] = None,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f'sampling mode must be one of {MODES}, got {mode!r}')
        self.sizes = [int(n) for n in sizes]
        if any(n <= 0 for n in self.sizes):
            raise ValueError(f'every database needs structures, sizes: {self.sizes}')
        self.names = (
            list(names) if names is not None else [str(i) for i in range(len(sizes))]
        )
        self.mode = mode
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        total = sum(self.sizes)
        self.epoch_length = int(epoch_length or total)
        if mode == 'proportional' and epoch_length not in (None, total):
            raise ValueError(
                'proportional sampling visits every structure once; '
                'epoch_length applies to temperature/explicit modes'
            )
        if mode == 'temperature':
            w = [n ** (1.0 / temperature) for n in self.sizes]
        elif mode == 'explicit':
            if not ratios:
                raise ValueError('explicit sampling needs ratios: {database: ratio}')
            missing = set(self.names) - set(ratios)
            extra = set(ratios) - set(self.names)
            if missing or extra:
                raise ValueError(
                    f'explicit ratios must name each database once '
                    f'(missing: {sorted(missing)}, unknown: {sorted(extra)})'
                )
            w = [float(ratios[n]) for n in self.names]
        else:
            w = [float(n) for n in self.sizes]
        s = sum(w)
        self.probabilities = [x / s for x in w]
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in a world of {num_replicas}')
        if mode == 'proportional':  # a partition: no padding
            self.num_samples = len(range(rank, self.epoch_length, num_replicas))
        else:
            self.num_samples = math.ceil(self.epoch_length / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_order(self) -> List[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        total = sum(self.sizes)
        if self.mode == 'proportional':
            if not self.shuffle:
                return list(range(total))
            return torch.randperm(total, generator=g).tolist()
        p = torch.tensor(self.probabilities, dtype=torch.float64)
        db = torch.multinomial(p, self.epoch_length, replacement=True, generator=g)
        order = torch.empty(self.epoch_length, dtype=torch.long)
        for d, n in enumerate(self.sizes):
            sel = (db == d).nonzero().reshape(-1)
            if sel.numel() == 0:
                continue
            # walk through a permutation of the database, repeating it if drawn
            # more often than it has structures: no structure twice before all once
            reps = math.ceil(sel.numel() / n)
            perm = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])
            order[sel] = perm[: sel.numel()] + self.offsets[d]
        return order.tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._global_order()
        if self.mode == 'proportional':
            return iter(order[self.rank :: self.num_replicas])
        padded = self.num_samples * self.num_replicas
        if len(order) < padded:  # pad by wrapping so every rank has equal steps
            order = order + order[: padded - len(order)]
        return iter(order[self.rank : padded : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Evaluation sets under DDP: rank r takes r, r + R, ... (no padding, no
    shuffling); per-rank error sums are all-reduced afterwards."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = range(rank, int(size), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
