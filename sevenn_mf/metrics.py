"""Per-database and per-fidelity errors in the units people quote."""

from __future__ import annotations

import csv
import os
from collections import OrderedDict
from typing import Dict, List, Sequence

import torch

from ._sevenn import KEY

EV_A3_TO_GPA = 160.21766208
# Written under the first per-set table of a run: sevenn's own table (above it)
# takes the RMSE of whole vectors, ours per component, so the same errors
# differ by sqrt(3) (force) and sqrt(6) (stress, also kbar = 10 x GPa).
UNITS_NOTE = (
    "note: sevenn's table above gives the RMSE of force vectors (eV/Å) and "
    'of 6-component stress vectors (kbar); this table and metrics.csv are per '
    'component (meV/Å, GPa): sevenn Force RMSE = sqrt(3) x force_rmse / 1000, '
    'sevenn Stress RMSE = 10 x sqrt(6) x stress_rmse, sevenn Energy RMSE '
    '(eV/atom) = energy_rmse / 1000'
)
# (column, unit, scale from sevenn's eV-based units)
QUANTITIES = (
    ('energy', 'meV/atom', 1000.0),
    ('force', 'meV/Å', 1000.0),
    ('stress', 'GPa', EV_A3_TO_GPA),
)


class _Accumulator:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.abs = {q: 0.0 for q, _, _ in QUANTITIES}
        self.sq = {q: 0.0 for q, _, _ in QUANTITIES}
        self.n = {q: 0 for q, _, _ in QUANTITIES}

    @torch.no_grad()
    def update(self, output, *args, **kwargs) -> None:
        natoms = output[KEY.NUM_ATOMS].reshape(-1).to(torch.float64)
        pairs = {
            'energy': (
                output[KEY.PRED_TOTAL_ENERGY].reshape(-1).double() / natoms,
                output[KEY.ENERGY].reshape(-1).double() / natoms,
            ),
            'force': (
                output[KEY.PRED_FORCE].reshape(-1).double(),
                output[KEY.FORCE].reshape(-1).double(),
            ),
            'stress': (
                output[KEY.PRED_STRESS].reshape(-1).double(),
                output[KEY.STRESS].reshape(-1).double(),
            ),
        }
        for q, (pred, ref) in pairs.items():
            ok = torch.isfinite(ref)  # absent labels are NaN: not counted
            if not ok.any():
                continue
            d = (pred[ok] - ref[ok]).detach()
            self.abs[q] += float(d.abs().sum())
            self.sq[q] += float((d * d).sum())
            self.n[q] += int(ok.sum())

    def all_reduce(self, device=None) -> None:
        """Sum the per-rank error sums and counts (DDP): every rank then holds
        the errors over all ranks' structures."""
        import torch.distributed as dist

        names = [q for q, _, _ in QUANTITIES]
        t = torch.tensor(
            [self.abs[q] for q in names]
            + [self.sq[q] for q in names]
            + [float(self.n[q]) for q in names],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        k = len(names)
        for i, q in enumerate(names):
            self.abs[q] = float(t[i])
            self.sq[q] = float(t[k + i])
            self.n[q] = int(round(float(t[2 * k + i])))

    def result(self) -> Dict[str, float]:
        out = {}
        for q, _, scale in QUANTITIES:
            n = self.n[q]
            out[f'{q}_mae'] = self.abs[q] / n * scale if n else float('nan')
            out[f'{q}_rmse'] = (self.sq[q] / n) ** 0.5 * scale if n else float('nan')
        return out


class FidelityMetrics:
    """One accumulator per loader (trainset, validset, <fidelity>_validset, ...).

    ``extra_columns``: further per-set columns of metrics.csv (the fidelity gap
    monitor's), filled per epoch in ``extra[set name][column]``; blank where a
    set has none."""

    def __init__(self, extra_columns: Sequence[str] = ()) -> None:
        self.acc: Dict[str, _Accumulator] = OrderedDict()
        self.extra_columns = list(extra_columns)
        self.extra: Dict[str, Dict[str, float]] = {}
        self._noted = False  # UNITS_NOTE: once, under the first table

    def recorder(self, name: str) -> _Accumulator:
        if name not in self.acc:
            self.acc[name] = _Accumulator()
        return self.acc[name]

    def reset(self) -> None:
        for a in self.acc.values():
            a.reset()

    def results(self) -> Dict[str, Dict[str, float]]:
        return {k: a.result() for k, a in self.acc.items()}

    def table(self, epoch: int) -> str:
        units = {q: u for q, u, _ in QUANTITIES}
        head = f'{"set":<28}' + ''.join(
            f'{q + " MAE (" + units[q] + ")":>24}' for q, _, _ in QUANTITIES
        )
        rows = [f'per-set errors, epoch {epoch}', head]
        for name, r in self.results().items():
            rows.append(
                f'{name:<28}'
                + ''.join(f'{r[q + "_mae"]:>24.3f}' for q, _, _ in QUANTITIES)
            )
        if not self._noted:
            rows.append(UNITS_NOTE)
            self._noted = True
        return '\n'.join(rows) + '\n'

    def write_epoch(self, path: str, epoch: int, lr: float) -> None:
        """Append one row per set, then reset for the next epoch."""
        new = not os.path.isfile(path)
        cols = ['epoch', 'lr', 'set'] + [
            f'{q}_{m}' for q, _, _ in QUANTITIES for m in ('mae', 'rmse')
        ]
        n_err = len(cols)
        cols += self.extra_columns
        with open(path, 'a', newline='') as f:
            w = csv.writer(f)
            if new:
                w.writerow(cols)
            for name, r in self.results().items():
                extra = self.extra.get(name, {})
                w.writerow(
                    [epoch, f'{lr:.6g}', name]
                    + [f'{r[c]:.6g}' for c in cols[3:n_err]]
                    + [
                        f'{extra[c]:.6g}' if c in extra else ''
                        for c in self.extra_columns
                    ]
                )
        for a in self.acc.values():
            a.reset()
        self.extra = {}

    @staticmethod
    def truncate_csv(path: str, start_epoch: int) -> None:
        """Drop rows of epochs a resumed run will redo."""
        if not os.path.isfile(path):
            return
        with open(path, newline='') as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < start_epoch]
        with open(path, 'w', newline='') as f:
            csv.writer(f).writerows(keep)

    @staticmethod
    def read_csv(path: str) -> List[Dict[str, str]]:
        with open(path, newline='') as f:
            return list(csv.DictReader(f))
