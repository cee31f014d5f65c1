"""Which structures to label at high fidelity next: the ones where the
high-fidelity (HF) head disagrees most with the other heads, compared with
how much it disagreed on its own training structures.

A multi-fidelity model carries a free uncertainty signal. Where the HF head
has labels, its gap to the low-fidelity (LF) head (:mod:`sevenn_mf.gap`) is
what the true HF - LF difference is there; where the gap leaves that range,
the HF head is extrapolating. :func:`select` scores every candidate by that
distance, in training standard deviations (:meth:`GapRange.score`: the
larger of the energy-gap and force-gap deviations, over the other heads),
and picks the K highest subject to a diversity rule, so that K frames are
not one event:

* frames of the same file (one MD trajectory) at least ``min_separation``
  frames apart;
* every chosen structure at least ``diversity`` x (the median distance
  between candidates) from every other chosen one, in a pair-distance
  histogram descriptor (element-blind, smoothed, per atom); the threshold is
  halved until K are found.

``random_pick`` is the control: K uniformly at random (seeded) from the same
candidates. Both write an extxyz of the chosen structures (positions, cell,
species; no labels) with ``info``: source file and frame, score, gaps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..gap import GapRange, head_gaps

_BINS = np.linspace(0.5, 6.0, 56)


@dataclass
class Candidate:
    atoms: Any
    file: str
    frame: int
    score: float = float('nan')
    gaps: Optional[Dict[str, Tuple[float, float]]] = None  # other -> (eV/atom, eV/Å)


def read_candidates(files: Sequence[str]) -> List[Candidate]:
    """Every structure of the files (extxyz from md-check, or anything
    ``ase.io.read`` takes); labels are not needed."""
    from ase.io import iread

    out = []
    for path in files:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no such file')
        for i, atoms in enumerate(iread(path, index=':')):
            out.append(Candidate(atoms, path, i))
    if not out:
        raise ValueError('no candidate structures in ' + ', '.join(files))
    return out


def descriptor(atoms) -> np.ndarray:
    """Smoothed histogram of pair distances (0.5 - 6 Å) per atom."""
    from ase.neighborlist import neighbor_list

    if atoms.pbc.any():
        d = neighbor_list('d', atoms, float(_BINS[-1]))
    else:
        pos = atoms.positions
        dm = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        d = dm[np.triu_indices(len(atoms), 1)]
        d = np.concatenate([d, d])
    centers = 0.5 * (_BINS[1:] + _BINS[:-1])
    h = np.exp(-((d[:, None] - centers[None]) ** 2) / (2 * 0.1**2)).sum(0)
    return h / len(atoms)


def score_candidates(
    model_source: str, fidelity: str, cands: List[Candidate], batch_size: int = 8
) -> Optional[GapRange]:
    """Fill each candidate's gaps and score; returns the training range used
    (None when the checkpoint has none: the scores are then relative to the
    candidates' own gap distribution)."""
    from ..checkpoint import Checkpoint
    from ..data.databases import Frame
    from ..data.graphs import build_graphs

    cp = Checkpoint(model_source)
    if len(cp.fidelities) < 2:
        raise ValueError(
            f'{cp.path}: a single-fidelity model has no fidelity gap; '
            'selection by gap needs a multi-fidelity model'
        )
    frames = [Frame.from_atoms(c.atoms, c.file, c.frame) for c in cands]
    for fr in frames:  # unlabelled candidates: labels are NaN, which is fine here
        fr.present = {'energy': False, 'force': False, 'stress': False}
    graphs = build_graphs(frames, cp.cutoff, fidelity, 1.0, desc='candidates')
    gaps = head_gaps(
        cp.build_model(),
        cp.config,
        graphs,
        reference=fidelity,
        batch_size=batch_size,
    )
    ranges = GapRange.from_dict(cp.gap_range)
    if ranges is None or ranges.reference != fidelity:
        ranges = GapRange.from_gaps(gaps)  # fall back: the candidates themselves
        ranges.reference = f'{fidelity} (candidates)'
        own = None
    else:
        own = ranges
    for i, c in enumerate(cands):
        c.gaps = {
            o: (float(gaps.energy[o][i]), float(gaps.force[o][i]))
            for o in gaps.energy
        }
        c.score = max(ranges.score(o, e, f) for o, (e, f) in c.gaps.items())
    return own


def select(
    cands: List[Candidate],
    k: int,
    seed: int = 0,
    min_separation: int = 10,
    diversity: float = 0.3,
) -> List[Candidate]:
    """The K highest-scoring candidates under the diversity rule
    (deterministic: ties are broken by a seeded shuffle)."""
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    if len(cands) < k:
        raise ValueError(f'only {len(cands)} candidates for k = {k}')
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cands))
    order = sorted(
        order, key=lambda i: -cands[i].score
    )  # stable: ties keep the shuffle
    desc = np.array([descriptor(c.atoms) for c in cands])
    sample = rng.choice(len(cands), size=min(len(cands), 200), replace=False)
    dists = np.linalg.norm(desc[sample][:, None] - desc[sample][None], axis=-1)
    med = (
        float(np.median(dists[np.triu_indices(len(sample), 1)]))
        if len(sample) > 1
        else 0
    )
    threshold = diversity * med
    chosen: List[int] = []
    while True:
        for i in order:
            if len(chosen) == k:
                break
            if i in chosen:
                continue
            c = cands[i]
            if any(
                cands[j].file == c.file
                and abs(cands[j].frame - c.frame) < min_separation
                for j in chosen
            ):
                continue
            if any(np.linalg.norm(desc[i] - desc[j]) < threshold for j in chosen):
                continue
            chosen.append(i)
        if len(chosen) == k or threshold == 0:
            break
        threshold = threshold / 2 if threshold > 1e-6 else 0.0
        if threshold == 0:
            min_separation = 0
    return [cands[i] for i in chosen]


def random_pick(cands: List[Candidate], k: int, seed: int = 0) -> List[Candidate]:
    if len(cands) < k:
        raise ValueError(f'only {len(cands)} candidates for k = {k}')
    idx = np.random.default_rng(seed).choice(len(cands), size=k, replace=False)
    return [cands[i] for i in sorted(idx)]


def write_chosen(chosen: Sequence[Candidate], path: str) -> str:
    """The chosen structures, unlabelled, ready for the HF code."""
    from ase import Atoms

    from ..data.databases import write_extxyz

    out = []
    for c in chosen:
        a = Atoms(
            numbers=c.atoms.numbers,
            positions=c.atoms.positions,
            cell=c.atoms.cell,
            pbc=c.atoms.pbc,
        )
        a.info.update(source_file=c.file, source_frame=int(c.frame))
        if np.isfinite(c.score):
            a.info['gap_score'] = round(float(c.score), 4)
        for o, (e, f) in (c.gaps or {}).items():
            a.info[f'gap_{o}_energy_meV_atom'] = round(1000 * e, 3)
            a.info[f'gap_{o}_force_meV_A'] = round(1000 * f, 3)
        out.append(a)
    write_extxyz(path, out)
    return os.path.abspath(path)


def report(chosen: Sequence[Candidate], ranges: Optional[GapRange]) -> str:
    rows = []
    if ranges is not None:
        for o in ranges.ranges:
            rows.append(f'training range ({o}): {ranges.describe(o)}')
    else:
        rows.append(
            'no training gap range in the checkpoint: scores are relative '
            'to the candidates'
        )
    rows.append(f'{"#":>3} {"score":>8}  gaps (meV/atom, meV/Å)   source')
    for n, c in enumerate(chosen, 1):
        gaps = ', '.join(
            f'{o} {1000 * e:.1f} / {1000 * f:.0f}'
            for o, (e, f) in (c.gaps or {}).items()
        )
        rows.append(f'{n:>3} {c.score:8.2f}  {gaps:<24} {c.file}:{c.frame}')
    return '\n'.join(rows)
