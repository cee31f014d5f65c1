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
# the keys of ``data.sampling`` (mode + DatabaseSampler's options)
SAMPLING_KEYS = ('mode', 'temperature', 'ratios', 'epoch_length')
# which options each mode reads (any other one would be silently ignored)
MODE_OPTIONS = {
    'proportional': (),
    'temperature': ('temperature', 'epoch_length'),
    'explicit': ('ratios', 'epoch_length'),
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_temperature(t) -> float:
    if not _is_number(t) or not math.isfinite(t) or t <= 0:
        raise ValueError(
            f'data.sampling.temperature must be a number > 0, got {t!r}'
        )
    return float(t)


def check_epoch_length(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(
            f'data.sampling.epoch_length must be a positive integer, got {n!r}'
        )
    return n


def check_ratios(ratios, names: Optional[Sequence[str]]) -> Dict[str, float]:
    """Explicit ratios: a mapping naming each (training) database once, every
    ratio a finite number > 0 (a database not to draw from is left out of
    the run, not given ratio 0)."""
    if not ratios:
        raise ValueError(
            'data.sampling: explicit sampling needs ratios: {database: ratio}'
        )
    if not isinstance(ratios, dict):
        raise ValueError(
            f'data.sampling.ratios must be a mapping {{database: ratio}}, '
            f'got {ratios!r}'
        )
    for k, v in ratios.items():
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise ValueError(
                f'data.sampling.ratios.{k} must be a number > 0, got {v!r}'
            )
    if names is not None:
        missing = set(names) - set(ratios)
        extra = set(ratios) - set(names)
        if missing or extra:
            raise ValueError(
                f'data.sampling.ratios: explicit ratios must name each '
                'training database once '
                f'(missing: {sorted(missing)}, unknown: {sorted(extra)}; '
                f'databases: {", ".join(names)})'
            )
    return {str(k): float(v) for k, v in ratios.items()}


def check_sampling(options, names: Optional[Sequence[str]] = None) -> None:
    """The values of a ``data.sampling`` mapping (its keys are checked with
    the other config keys, by :mod:`sevenn_mf.config`): ``names`` are the
    training databases' names, when known. Raises ValueError naming the
    option."""
    if not isinstance(options, dict):
        raise ValueError(f'data.sampling must be a mapping, got {options!r}')
    mode = options.get('mode', 'proportional')
    if mode not in MODES:
        raise ValueError(
            f'data.sampling: sampling mode must be one of {", ".join(MODES)}, '
            f'got {mode!r}'
        )
    unused = sorted(
        k
        for k in options
        if k in SAMPLING_KEYS and k != 'mode' and k not in MODE_OPTIONS[mode]
    )
    if unused:
        reads = ', '.join(MODE_OPTIONS[mode]) or 'no other option'
        raise ValueError(
            f'data.sampling: {", ".join(unused)} does nothing in mode {mode} '
            f'(it reads {reads}); '
            + (
                'epoch_length applies to temperature/explicit modes: '
                'proportional sampling visits every structure once'
                if 'epoch_length' in unused
                else 'remove it or change the mode'
            )
        )
    if 'temperature' in options:
        check_temperature(options['temperature'])
    if 'epoch_length' in options:
        check_epoch_length(options['epoch_length'])
    if mode == 'explicit':
        check_ratios(options.get('ratios'), names)


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
        if epoch_length is not None:
            check_epoch_length(epoch_length)
        self.epoch_length = int(epoch_length or total)
        if mode == 'proportional' and epoch_length not in (None, total):
            raise ValueError(
                'proportional sampling visits every structure once; '
                'epoch_length applies to temperature/explicit modes'
            )
        if mode == 'temperature':
            temperature = check_temperature(temperature)
            w = [n ** (1.0 / temperature) for n in self.sizes]
        elif mode == 'explicit':
            ratios = check_ratios(ratios, self.names)
            w = [ratios[n] for n in self.names]
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
