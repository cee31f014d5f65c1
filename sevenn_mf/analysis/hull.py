"""Mixing energies of pseudo-binary alloys and energies above the convex hull
(pymatgen), predicted at one fidelity and compared with reference labels.

Mixing energy
    For a structure made of end-member formula units (In_x Ga_1-x N = x InN
    + (1-x) GaN), ``E_mix = E - sum_i n_i e_i`` with n_i the number of
    formula units of end member i it contains and e_i the end member's energy
    per formula unit *at the same fidelity*, reported per atom (meV/atom) and
    per formula unit. The end-member energies e_i come from end-member
    structures given by the user (for InGaN: the x = 0 and x = 1 cells of the
    data): with ``choice='lowest'`` (default) the structure of lowest
    *reference* energy per formula unit of each end member (the least
    distorted one; the lowest *predicted* energy when there are no reference
    labels), with ``choice='mean'`` the mean over all of them. The predicted
    mixing energy uses the model's energies of the *same* end-member
    structures, the reference one their labels, so both sides share the
    structure choice and differ only by the model's errors.
Energy above hull
    A pymatgen ``PDEntry`` per structure and per competing phase with its
    total energy; the hull is built from all of them (structures included, so
    E_hull >= 0) and ``get_e_above_hull`` gives eV/atom. Without elemental
    entries for every element the diagram is a ``CompoundPhaseDiagram`` on
    ``terminals`` (e.g. GaN, InN); e_above_hull is then per atom of the real
    compositions as well.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np


def _composition(numbers) -> Dict[str, int]:
    from ase.data import chemical_symbols

    out: Dict[str, int] = {}
    for z in np.asarray(numbers, dtype=int):
        s = chemical_symbols[int(z)]
        out[s] = out.get(s, 0) + 1
    return out


def _pmg_comp(c):
    from pymatgen.core import Composition

    return c if isinstance(c, Composition) else Composition(c)


# ---- statistics ------------------------------------------------------------------
def compare(pred: Sequence[float], ref: Sequence[float]) -> Dict[str, float]:
    """MAE, RMSE and R^2 (= 1 - SS_res / SS_tot about the reference mean) over
    the finite pairs."""
    pred, ref = np.asarray(pred, float), np.asarray(ref, float)
    ok = np.isfinite(pred) & np.isfinite(ref)
    if not ok.any():
        return {
            'n': 0,
            'mae': float('nan'),
            'rmse': float('nan'),
            'r2': float('nan'),
        }
    d = pred[ok] - ref[ok]
    ss_tot = float(((ref[ok] - ref[ok].mean()) ** 2).sum())
    r2 = 1.0 - float((d**2).sum()) / ss_tot if ss_tot > 0 else float('nan')
    return {
        'n': int(ok.sum()),
        'mae': float(np.abs(d).mean()),
        'rmse': float(np.sqrt((d**2).mean())),
        'r2': r2,
    }


# ---- mixing energy ---------------------------------------------------------------
def formula_units(
    composition, end_members: Sequence[str], tol: float = 1e-6
) -> np.ndarray:
    """Number of formula units of each end member in ``composition``
    (a dict or pymatgen Composition); ValueError if it is not a non-negative
    combination of them."""
    comp = _pmg_comp(composition)
    ends = [_pmg_comp(e) for e in end_members]
    elements = sorted({str(el) for c in [comp, *ends] for el in c.elements})
    a = np.array([[e[el] for e in ends] for el in elements], float)
    b = np.array([comp[el] for el in elements], float)
    n, *_ = np.linalg.lstsq(a, b, rcond=None)
    if np.abs(a @ n - b).max() > tol or (n < -tol).any():
        raise ValueError(
            f'{comp.formula} is not a combination of the end members '
            f'{", ".join(end_members)}'
        )
    return np.clip(n, 0.0, None)


def mixing_energies(
    energies: Sequence[float],
    compositions: Sequence[Any],
    end_member_energies: Dict[str, float],
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per atom, per formula unit, formula-unit fractions) of each structure.

    ``energies``: total energies (eV); ``end_member_energies``: {formula:
    energy per formula unit of that formula} at the same fidelity."""
    names = list(end_member_energies)
    e_ref = np.array([end_member_energies[k] for k in names], float)
    per_atom, per_fu, frac = [], [], []
    for e, c in zip(energies, compositions):
        comp = _pmg_comp(c)
        n = formula_units(comp, names)
        mix = float(e) - float(n @ e_ref)
        per_atom.append(mix / comp.num_atoms)
        per_fu.append(mix / n.sum())
        frac.append(n / n.sum())
    return np.array(per_atom), np.array(per_fu), np.array(frac)


def end_member_references(
    compositions: Sequence[Any],
    ref_energies: Sequence[float],
    pred_energies: Sequence[float],
    end_members: Sequence[str],
    choice: str = 'lowest',
) -> Dict[str, Dict[str, Any]]:
    """{end member: {'ref', 'pred' (eV per formula unit), 'indices'}} from
    end-member structures (see the module doc for ``choice``)."""
    if choice not in ('lowest', 'mean'):
        raise ValueError(f"choice must be 'lowest' or 'mean', got {choice!r}")
    ref_energies = np.asarray(ref_energies, float)
    pred_energies = np.asarray(pred_energies, float)
    out = {}
    for em in end_members:
        target = _pmg_comp(em).reduced_formula
        idx, nfu = [], []
        for i, c in enumerate(compositions):
            comp = _pmg_comp(c)
            if comp.reduced_formula == target:
                idx.append(i)
                nfu.append(comp.num_atoms / _pmg_comp(em).num_atoms)
        if not idx:
            raise ValueError(f'no {em} structure among the end-member structures')
        idx, nfu = np.array(idx), np.array(nfu)
        ref = ref_energies[idx] / nfu
        pred = pred_energies[idx] / nfu
        if choice == 'mean':
            out[em] = {
                'ref': float(np.mean(ref)),
                'pred': float(np.mean(pred)),
                'indices': idx.tolist(),
            }
        else:
            key = ref if np.isfinite(ref).all() else pred
            k = int(np.argmin(key))
            out[em] = {
                'ref': float(ref[k]),
                'pred': float(pred[k]),
                'indices': [int(idx[k])],
            }
    return out


def mixing_report(
    model,
    structures: Sequence[str],
    end_member_files: Sequence[str],
    end_members: Sequence[str] = ('GaN', 'InN'),
    choice: str = 'lowest',
    output: Optional[str] = None,
) -> Dict[str, Any]:
    """Predicted vs reference mixing energies (meV/atom) of ``structures``.
    ``model``: a :class:`~sevenn_mf.analysis.predict.MethodModel`."""
    from .predict import total_energies

    frames, p = model.predict_files(structures)
    em_frames, pe = model.predict_files(end_member_files)
    comps = [_composition(f.numbers) for f in frames]
    em_comps = [_composition(f.numbers) for f in em_frames]
    em_ref, em_pred = total_energies(pe)
    refs = end_member_references(em_comps, em_ref, em_pred, end_members, choice)
    ref_e, pred_e = total_energies(p)
    mix_pred, fu_pred, frac = mixing_energies(
        pred_e, comps, {k: v['pred'] for k, v in refs.items()}
    )
    have_ref = all(np.isfinite(v['ref']) for v in refs.values())
    if have_ref:
        mix_ref, fu_ref, _ = mixing_energies(
            ref_e, comps, {k: v['ref'] for k, v in refs.items()}
        )
    else:
        mix_ref = fu_ref = np.full(len(frames), np.nan)
    stats = compare(1000 * mix_pred, 1000 * mix_ref)
    summary = {
        'n_structures': len(frames),
        'mixing_mae_meV_atom': stats['mae'],
        'mixing_rmse_meV_atom': stats['rmse'],
        'mixing_r2': stats['r2'],
        'mixing_mae_meV_fu': compare(1000 * fu_pred, 1000 * fu_ref)['mae'],
        'mean_mixing_ref_meV_atom': float(np.nanmean(1000 * mix_ref))
        if np.isfinite(mix_ref).any()
        else float('nan'),
        'mean_mixing_pred_meV_atom': float(np.mean(1000 * mix_pred)),
        'end_members': {
            k: {
                'ref_eV_fu': v['ref'],
                'pred_eV_fu': v['pred'],
                'structures': [em_frames[i].where for i in v['indices']],
            }
            for k, v in refs.items()
        },
        'choice': choice,
    }
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)) or '.', exist_ok=True)
        with open(output, 'w', newline='') as fh:
            w = csv.writer(fh)
            w.writerow(
                ['structure', 'formula']
                + [f'fraction_{e}' for e in refs]
                + [
                    'mixing_ref_meV_atom',
                    'mixing_pred_meV_atom',
                    'mixing_ref_meV_fu',
                    'mixing_pred_meV_fu',
                ]
            )
            for i, f in enumerate(frames):
                w.writerow(
                    [f.where, _pmg_comp(comps[i]).formula.replace(' ', '')]
                    + [f'{x:.4f}' for x in frac[i]]
                    + [
                        f'{1000 * mix_ref[i]:.3f}',
                        f'{1000 * mix_pred[i]:.3f}',
                        f'{1000 * fu_ref[i]:.3f}',
                        f'{1000 * fu_pred[i]:.3f}',
                    ]
                )
        summary['per_structure_csv'] = output
    return summary


# ---- energy above hull ------------------------------------------------------------
def energies_above_hull(
    compositions: Sequence[Any],
    energies: Sequence[float],
    terminals: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """eV/atom above the lower convex hull of all the given entries (total
    energies in eV). Elemental entries for every element give a
    ``PhaseDiagram``; otherwise ``terminals`` (compositions) are required and
    a ``CompoundPhaseDiagram`` is used."""
    from pymatgen.analysis.phase_diagram import (
        CompoundPhaseDiagram,
        PDEntry,
        PhaseDiagram,
    )

    entries = [
        PDEntry(_pmg_comp(c), float(e), attribute=i)
        for i, (c, e) in enumerate(zip(compositions, energies))
    ]
    elements = {el for e in entries for el in e.composition.elements}
    have_elements = {e.composition.elements[0] for e in entries if e.is_element}
    out = np.full(len(entries), np.nan)
    if terminals:
        pd = CompoundPhaseDiagram(entries, [_pmg_comp(t) for t in terminals])
        for te in pd.all_entries:
            orig = te.original_entry
            n_dummy = te.composition.num_atoms
            e_hull = pd.get_e_above_hull(te)
            # per dummy atom -> per real atom
            out[orig.attribute] = e_hull * n_dummy / orig.composition.num_atoms
    else:
        missing = elements - have_elements
        if missing:
            raise ValueError(
                'no elemental entry for '
                + ', '.join(sorted(str(m) for m in missing))
                + ': give the end members of the chemical space as terminals '
                '(e.g. --terminals GaN InN) for a compound phase diagram'
            )
        pd = PhaseDiagram(entries)
        for e in entries:
            out[e.attribute] = pd.get_e_above_hull(e)
    if np.isnan(out).any():
        raise ValueError(
            'some entries are outside the phase diagram (check terminals)'
        )
    return out


def hull_report(
    model,
    structures: Sequence[str],
    phases: Sequence[str],
    terminals: Optional[Sequence[str]] = None,
    output: Optional[str] = None,
) -> Dict[str, Any]:
    """Energies above hull of ``structures`` among themselves and ``phases``,
    with the model's energies, and with the reference labels when every
    structure and phase has one."""
    from .predict import total_energies

    s_frames, ps = model.predict_files(structures)
    p_frames, pp = model.predict_files(phases) if phases else ([], None)
    comps = [_composition(f.numbers) for f in s_frames + p_frames]
    ref_s, pred_s = total_energies(ps)
    if pp is not None:
        ref_p, pred_p = total_energies(pp)
    else:
        ref_p = pred_p = np.zeros(0)
    pred = np.concatenate([pred_s, pred_p])
    ref = np.concatenate([ref_s, ref_p])
    eh_pred = energies_above_hull(comps, pred, terminals)
    have_ref = bool(np.isfinite(ref).all())
    eh_ref = (
        energies_above_hull(comps, ref, terminals)
        if have_ref
        else np.full(len(comps), np.nan)
    )
    n = len(s_frames)
    stats = compare(1000 * eh_pred[:n], 1000 * eh_ref[:n])
    summary: Dict[str, Any] = {
        'n_structures': n,
        'n_phases': len(p_frames),
        'reference_labels': have_ref,
        'e_above_hull_mae_meV_atom': stats['mae'],
        'e_above_hull_rmse_meV_atom': stats['rmse'],
        'e_above_hull_r2': stats['r2'],
        'mean_e_above_hull_pred_meV_atom': float(np.mean(1000 * eh_pred[:n])),
        'mean_e_above_hull_ref_meV_atom': float(np.mean(1000 * eh_ref[:n])),
        'terminals': list(terminals or []),
    }
    if have_ref:
        on_pred, on_ref = eh_pred[:n] < 1e-3, eh_ref[:n] < 1e-3
        summary['on_hull_agreement'] = float(np.mean(on_pred == on_ref))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)) or '.', exist_ok=True)
        frames = s_frames + p_frames
        with open(output, 'w', newline='') as fh:
            w = csv.writer(fh)
            w.writerow(
                [
                    'kind',
                    'structure',
                    'formula',
                    'natoms',
                    'energy_ref_eV',
                    'energy_pred_eV',
                    'e_above_hull_ref_meV_atom',
                    'e_above_hull_pred_meV_atom',
                ]
            )
            for i, f in enumerate(frames):
                w.writerow(
                    [
                        'structure' if i < n else 'phase',
                        f.where,
                        _pmg_comp(comps[i]).formula.replace(' ', ''),
                        len(f.numbers),
                        f'{ref[i]:.6f}',
                        f'{pred[i]:.6f}',
                        f'{1000 * eh_ref[i]:.3f}',
                        f'{1000 * eh_pred[i]:.3f}',
                    ]
                )
        summary['per_structure_csv'] = output
    return summary
