"""Per-element reference energies and the shared force scale.

Each fidelity has its own energy zero (different codes, functionals, basis
sets), so reference energies are fitted per fidelity: the caller passes one
fidelity's data at a time. The force scale is shared across fidelities, since
forces do not depend on the energy zero.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from .._sevenn import CONST, KEY

_NULL_TOL = 1e-8


class UndeterminedReferences(UserWarning):
    """A rank-deficient reference fit: normal for a fixed stoichiometry
    (ethanol; InGaN with N = Ga + In), so the CLI writes it as an info line
    in the training log instead of a warning on the terminal."""


def _symbol(s: Union[str, int]) -> str:
    if isinstance(s, str):
        if s not in atomic_numbers:
            raise ValueError(f'unknown element {s!r}')
        return s
    return chemical_symbols[int(s)]


def _numbers_energy_forces(item: Any):
    """(atomic numbers, energy, forces) of a Frame or a sevenn graph."""
    if hasattr(item, 'numbers') and hasattr(item, 'energy'):  # Frame
        return item.numbers, item.energy, item.forces
    z = item[KEY.ATOMIC_NUMBERS].detach().cpu().numpy()
    e = float(item[KEY.ENERGY])
    f = item[KEY.FORCE].detach().cpu().numpy()
    return z, e, f


def fit_reference_energies(
    data: Iterable[Any], species: Sequence[Union[str, int]]
) -> Dict[str, float]:
    """Least-squares e_Z with E_total ≈ Σ_Z n_Z e_Z, over structures whose
    energy is labelled (NaN energies are skipped).

    ``data``: graphs or frames of one fidelity. ``species``: symbols or
    atomic numbers. Returns ``{symbol: eV}`` for every species; an element
    absent from the labelled structures gets 0.0 (it cannot be fitted, and 0.0
    leaves the model's own shift in charge). When compositions cannot separate
    some elements (one composition only, a fixed stoichiometry, ...), the
    minimum-norm solution is returned with a warning naming them: only the
    combinations seen in the data are then meaningful.
    """
    symbols = [_symbol(s) for s in species]
    column = {atomic_numbers[s]: i for i, s in enumerate(symbols)}
    rows, energies = [], []
    for item in data:
        z, e, _ = _numbers_energy_forces(item)
        if not np.isfinite(e):
            continue
        counts = np.zeros(len(symbols))
        for zi in np.asarray(z, dtype=int):
            if int(zi) not in column:
                raise ValueError(
                    f'element {chemical_symbols[int(zi)]} is not in species '
                    f'({", ".join(symbols)})'
                )
            counts[column[int(zi)]] += 1
        rows.append(counts)
        energies.append(e)
    refs = {s: 0.0 for s in symbols}
    if not rows:
        warnings.warn(
            'no structure has an energy label: reference energies set to 0.0',
            stacklevel=2,
        )
        return refs
    a, y = np.array(rows), np.array(energies)
    seen = np.flatnonzero(a.sum(axis=0) > 0)
    a = a[:, seen]
    coef, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
    if rank < len(seen):
        _warn_undetermined(a, rank, [symbols[i] for i in seen])
    for i, c in zip(seen, coef):
        refs[symbols[i]] = float(c)
    return refs


def reference_energy(refs: Dict[str, float], numbers: Iterable[int]) -> float:
    """A structure's sum of per-element energies ``refs`` ({symbol: eV}, as
    :func:`fit_reference_energies` returns them) over its atoms."""
    return float(sum(refs[chemical_symbols[int(z)]] for z in numbers))


def _fractions(numbers, species=None):
    """(element fractions per structure, atom counts); columns ``species``
    (default: the elements present, sorted)."""
    numbers = [np.asarray(z, int) for z in numbers]
    if species is None:
        species = sorted({int(e) for z in numbers for e in z})
    n = np.array([len(z) for z in numbers], dtype=float)
    counts = np.array([[np.sum(z == e) for e in species] for z in numbers])
    return counts / n[:, None], n


def fit_energy_scale(
    numbers: Sequence[np.ndarray], y: Sequence[float], x: Sequence[float]
) -> Tuple[float, float]:
    """Least squares ``y_s / n_s = a * x_s / n_s + sum_Z (n_sZ / n_s) r_Z``
    over structures ``s`` (atomic numbers ``numbers[s]``, total energies
    ``y_s`` and ``x_s``): the slope ``a`` and its standard error. Only the part
    of ``x`` and ``y`` per atom that composition cannot take determines ``a``;
    the references ``r`` are left to the caller. ValueError if ``x`` per atom
    has no such part or the slope is not positive."""
    comp, n = _fractions(numbers)
    y, x = np.asarray(y, float) / n, np.asarray(x, float) / n
    u, sv, _ = np.linalg.svd(comp, full_matrices=False)
    q = u[:, sv > 1e-10 * sv.max()]
    rx, ry = x - q @ (q.T @ x), y - q @ (q.T @ y)
    if float(rx @ rx) <= 1e-18:
        raise ValueError(
            'the energy per atom it scales is the same for every structure of a '
            'composition; no scale can be fitted'
        )
    a = float(rx @ ry / (rx @ rx))
    if not np.isfinite(a) or a <= 0:
        raise ValueError(f'the least-squares scale is {a:g}, not a positive number')
    dof = max(len(y) - q.shape[1] - 1, 1)  # the references' rank + the slope
    se = float(np.sqrt(np.sum((ry - a * rx) ** 2) / dof / (rx @ rx)))
    return a, se


def scale_reach(
    fit_numbers: Sequence[np.ndarray],
    fit_x: Sequence[float],
    pool_numbers: Sequence[np.ndarray],
    pool_x: Sequence[float],
    percentile: float = 95.0,
) -> float:
    """How far (per atom) the energies ``pool_x`` of a pool reach beyond the
    structures a scale was fitted on (``fit_x``, on the same energy zero):
    the ``percentile`` of |pool - mean of the fit structures| once each
    structure's composition part (element references least-squares fitted on
    the pool) is taken out. A scale's standard error times this is how much
    it moves a prediction that far out."""
    species = sorted(
        {int(e) for z in list(pool_numbers) + list(fit_numbers) for e in z}
    )
    cp, n_pool = _fractions(pool_numbers, species)
    cf, n_fit = _fractions(fit_numbers, species)
    xp, xf = np.asarray(pool_x, float) / n_pool, np.asarray(fit_x, float) / n_fit
    refs = np.linalg.lstsq(cp, xp, rcond=None)[0]
    rp, rf = xp - cp @ refs, xf - cf @ refs
    return float(np.percentile(np.abs(rp - rf.mean()), percentile))


def reach_note(se: float, reach: float) -> str:
    """The log's words for :func:`scale_reach`: ``reach`` (eV/atom) and what
    a scale's standard error ``se`` moves a prediction by there."""
    return (
        f'{1000 * reach:.0f} meV/atom beyond them (95th percentile), where ± one '
        f'standard error moves a prediction by ± {1000 * se * reach:.1f} meV/atom'
    )


def _warn_undetermined(a: np.ndarray, rank: int, symbols: List[str]) -> None:
    # Elements with weight in the null space of the composition matrix are
    # those whose individual values the data cannot fix.
    _, _, vt = np.linalg.svd(a, full_matrices=True)
    null = vt[rank:]
    loose = [s for s, col in zip(symbols, null.T) if np.abs(col).max() > _NULL_TOL]
    warnings.warn(
        f'reference energies of {", ".join(loose)} are not separately determined '
        f'by the data (composition rank {rank} < {len(symbols)} elements): using '
        'the minimum-norm least-squares solution; only the compositions present '
        'in the data are fitted',
        UndeterminedReferences,
        stacklevel=3,
    )


def force_rms(data: Iterable[Any]) -> float:
    """RMS of all labelled force components (NaN = unlabelled, skipped)."""
    total, count = 0.0, 0
    for item in data:
        f = np.asarray(_numbers_energy_forces(item)[2], dtype=float)
        f = f[~np.isnan(f)]
        total += float(np.sum(f * f))
        count += f.size
    if count == 0:
        raise ValueError('no force labels: cannot compute a force scale')
    return float(np.sqrt(total / count))


def as_univ_list(refs: Dict[str, float]) -> List[float]:
    """sevenn's "univ" shift format: a list indexed by atomic number."""
    out = [0.0] * CONST.NUM_UNIV_ELEMENT
    for s, v in refs.items():
        out[atomic_numbers[_symbol(s)]] = float(v)
    return out


# ---- energy outliers ---------------------------------------------------------
OUTLIER_FLOOR = 10.0  # eV/atom: no threshold is tighter than this by default
OUTLIER_K = 10.0  # robust standard deviations (1.4826 MAD) beyond the median
_IRLS_STEPS = 60
_IRLS_DELTA = 1e-4  # eV/atom: |residual| below which IRLS weights stop growing


def energy_outliers(
    numbers: Sequence[Any],
    energies: Sequence[float],
    floor: float = OUTLIER_FLOOR,
    k: float = OUTLIER_K,
) -> Tuple[np.ndarray, np.ndarray, float]:
    """Structures whose energy per atom is far from the data's own element
    reference fit: ``(indices, residuals in eV/atom, threshold)``.

    The fit minimises the sum of absolute per-atom residuals (IRLS, over
    unique compositions weighted by their count, each at its median energy
    per atom), so a few wild labels cannot drag it as they drag least squares
    (one energy of 1e10 eV moves a least-squares reference by ~1e8 eV).
    A structure is flagged when its residual is further than ``max(floor, k *
    1.4826 * MAD)`` from the median residual. Structures without a finite
    energy are never flagged. An element that only flagged structures
    contain is fitted through them: such a label cannot be told from its own
    reference and is not flagged.
    """
    energies = np.asarray(energies, dtype=float)
    keep = np.flatnonzero(np.isfinite(energies))
    if len(keep) < 3:
        return np.zeros(0, dtype=int), np.zeros(0), float(floor)
    parts = [np.asarray(numbers[i], dtype=np.int64).reshape(-1) for i in keep]
    flat = np.concatenate(parts)
    zs, cols = np.unique(flat, return_inverse=True)
    rows = np.repeat(np.arange(len(keep)), [len(p) for p in parts])
    counts = np.bincount(
        rows * len(zs) + cols.reshape(-1), minlength=len(keep) * len(zs)
    ).reshape(len(keep), len(zs))
    n_atoms = counts.sum(axis=1)
    x = counts / n_atoms[:, None]
    e = energies[keep] / n_atoms
    comps, group = np.unique(counts, axis=0, return_inverse=True)
    comps = comps / comps.sum(axis=1, keepdims=True)
    group = group.reshape(-1)
    size = np.bincount(group)
    # median energy per atom of each composition, vectorised
    v = e[np.lexsort((e, group))]
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    median = 0.5 * (v[start + (size - 1) // 2] + v[start + size // 2])
    coef = _weighted_fit(comps, median, size.astype(float))
    for _ in range(_IRLS_STEPS):
        r = np.abs(median - comps @ coef)
        new = _weighted_fit(comps, median, size / np.maximum(r, _IRLS_DELTA))
        done = np.allclose(new, coef, rtol=1e-9, atol=1e-9)
        coef = new
        if done:
            break
    residual = e - x @ coef
    center = np.median(residual)
    mad = 1.4826 * np.median(np.abs(residual - center))
    threshold = max(float(floor), float(k) * float(mad))
    bad = np.flatnonzero(np.abs(residual - center) > threshold)
    return keep[bad], residual[bad], threshold


def _weighted_fit(a: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin sum w (y - a c)^2 through the normal equations (few columns,
    many rows); minimum norm where the compositions leave it open."""
    aw = a * w[:, None]
    return np.linalg.lstsq(aw.T @ a, aw.T @ y, rcond=None)[0]
