"""The fidelity gap: how far one fidelity head's prediction is from another's
on the same structure.

For heads ``f`` and ``g`` and a structure ``s`` of ``N`` atoms:

* energy gap ``dE_s = [E_f(s) - E_g(s) - sum_i (ref_f(Z_i) - ref_g(Z_i))] / N``:
  the per-atom energy difference beyond the two fidelities' per-element
  reference energies (the part that is not a change of energy zero);
* force gap ``dF_s``: the mean absolute difference of the force components.

The true HF - LF difference of two electronic-structure methods is mostly a
smooth function of the structure, so a head whose gap to the others is far
outside the range it had on its own training structures is extrapolating:
:class:`GapRange` keeps that range (stored in sevenn_mf checkpoints) and says
when a structure is outside it. The same quantities are the penalties of
:mod:`sevenn_mf.coupling` and the per-epoch gap monitor of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from ._sevenn import KEY
from .model import fidelity_names, model_device

RESCALE = 'rescale_atomic_energy'


def atom_fidelities(output: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Each atom's fidelity index (N,): its structure's, in a batch or not."""
    types = output[KEY.ATOM_TYPE].reshape(-1)
    modal = output[KEY.MODAL_TYPE].reshape(-1)
    if KEY.BATCH in output and modal.numel() > 1:
        return modal[output[KEY.BATCH]]
    return modal[:1].expand_as(types)


def net_atomic_energy(output: Dict[str, torch.Tensor], model) -> torch.Tensor:
    """Atomic energies (N,) of a model output minus each atom's per-fidelity
    element reference (sevenn's ``ModalWiseRescale`` shift)."""
    rescale = model._modules[RESCALE]
    ae = output[KEY.ATOMIC_ENERGY].reshape(-1)
    types = output[KEY.ATOM_TYPE].reshape(-1)
    shift = rescale.shift
    if getattr(rescale, 'use_modal_wise_shift', False):
        return ae - shift[atom_fidelities(output), types]
    return ae - shift[types]


def gap_reference(config: Dict[str, Any]) -> Optional[str]:
    """The head whose gaps are reported: ``train.best_fidelity`` if it is a
    fidelity of the model, else the last fidelity."""
    names = fidelity_names(config)
    if len(names) < 2:
        return None
    best = config.get('best_fidelity')
    return best if best in names else names[-1]


@dataclass
class Gaps:
    """Per-structure gaps of head ``reference`` to each other head:
    ``energy[g]`` in eV/atom and ``force[g]`` in eV/Å (NaN: no forces)."""

    reference: str
    energy: Dict[str, np.ndarray]
    force: Dict[str, np.ndarray]


def _predict_at(model, graphs: Sequence[Any], fidelity: str, batch_size: int):
    """(net atomic energies per structure, forces per structure) at one head."""
    e_out, f_out = [], []
    for g in graphs:
        g[KEY.DATA_MODALITY] = fidelity
    device = model_device(model)
    for batch in DataLoader(list(graphs), batch_size=batch_size, shuffle=False):
        out = model(batch.to(device))
        net = net_atomic_energy(out, model).detach().double().cpu()
        n = out[KEY.NUM_ATOMS].reshape(-1).tolist()
        forces = out[KEY.PRED_FORCE].detach().double().cpu()
        for e, f in zip(net.split(n), forces.split(n)):
            e_out.append(float(e.sum()) / len(e))
            f_out.append(f.numpy())
    return np.array(e_out), f_out


def head_gaps(
    model,
    config: Dict[str, Any],
    graphs: Sequence[Any],
    reference: Optional[str] = None,
    others: Optional[Sequence[str]] = None,
    batch_size: int = 8,
) -> Optional[Gaps]:
    """Gaps of ``graphs`` between head ``reference`` (default
    :func:`gap_reference`) and each other head. The graphs' own fidelity
    tags are restored afterwards. None for a single-fidelity model."""
    names = fidelity_names(config)
    reference = reference or gap_reference(config)
    if reference is None or not len(graphs):
        return None
    others = [g for g in (others or names) if g != reference]
    saved = [
        g[KEY.DATA_MODALITY] if KEY.DATA_MODALITY in g else None for g in graphs
    ]
    was_training = model.training
    model.eval()
    model.set_is_batch_data(True)
    try:
        e_ref, f_ref = _predict_at(model, graphs, reference, batch_size)
        energy, force = {}, {}
        for other in others:
            e, f = _predict_at(model, graphs, other, batch_size)
            energy[other] = e_ref - e
            force[other] = np.array(
                [
                    np.abs(a - b).mean() if a.size else np.nan
                    for a, b in zip(f_ref, f)
                ]
            )
    finally:
        model.train(was_training)
        for g, s in zip(graphs, saved):
            if s is not None:
                g[KEY.DATA_MODALITY] = s
    return Gaps(reference, energy, force)


@dataclass
class GapRange:
    """Range of the gaps on the reference head's own training structures."""

    reference: str
    ranges: Dict[
        str, Dict[str, float]
    ]  # other -> energy_min/max/mean/sd, force_max/mean

    @classmethod
    def from_gaps(cls, gaps: Gaps) -> GapRange:
        ranges = {}
        for other, e in gaps.energy.items():
            f = gaps.force[other]
            f = f[np.isfinite(f)]
            ranges[other] = {
                'n': int(len(e)),
                'energy_min': float(e.min()),
                'energy_max': float(e.max()),
                'energy_mean': float(e.mean()),
                'energy_sd': float(e.std()),
                'force_max': float(f.max()) if f.size else float('nan'),
                'force_mean': float(f.mean()) if f.size else float('nan'),
                'force_sd': float(f.std()) if f.size else float('nan'),
            }
        return cls(gaps.reference, ranges)

    def to_dict(self) -> Dict[str, Any]:
        return {'reference': self.reference, 'ranges': self.ranges}

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> Optional[GapRange]:
        if not d:
            return None
        return cls(str(d['reference']), {k: dict(v) for k, v in d['ranges'].items()})

    def outside(
        self, other: str, energy: float, force: float = float('nan')
    ) -> bool:
        """Whether a structure's gap to ``other`` lies outside the training
        range: energy gap below the minimum or above the maximum seen, or
        force gap above the maximum seen."""
        r = self.ranges.get(other)
        if r is None:
            return False
        if energy < r['energy_min'] or energy > r['energy_max']:
            return True
        return bool(np.isfinite(force) and np.isfinite(r['force_max'])) and (
            force > r['force_max']
        )

    def score(self, other: str, energy: float, force: float = float('nan')) -> float:
        """How far a structure's gap lies from the training ones, in training
        standard deviations: the larger of |energy gap - mean| / sd and
        (force gap - mean) / sd (sds floored at 1 meV/atom and 1 meV/Å)."""
        r = self.ranges[other]
        z = abs(energy - r['energy_mean']) / max(r['energy_sd'], 1e-3)
        if np.isfinite(force) and np.isfinite(r.get('force_mean', np.nan)):
            sd = r.get('force_sd', np.nan)
            sd = sd if np.isfinite(sd) else r['force_mean']
            z = max(z, (force - r['force_mean']) / max(sd, 1e-3))
        return float(z)

    def describe(self, other: str) -> str:
        r = self.ranges[other]
        return (
            f'energy gap {1000 * r["energy_min"]:.1f} .. {1000 * r["energy_max"]:.1f} '
            f'meV/atom, force gap <= {1000 * r["force_max"]:.0f} meV/Å '
            f'(on {r["n"]} {self.reference} training structures)'
        )


def summarize_gaps(
    gaps: Gaps, mask: Optional[np.ndarray] = None
) -> Dict[str, float]:
    """Monitor columns of a set (meV/atom, meV/Å): per other head the mean
    and sd of the energy gap and the mean force gap."""
    out: Dict[str, float] = {}
    for other, e in gaps.energy.items():
        f = gaps.force[other]
        if mask is not None:
            e, f = e[mask], f[mask]
        f = f[np.isfinite(f)]
        out[f'gap_{other}_energy_mean'] = (
            1000 * float(e.mean()) if e.size else np.nan
        )
        out[f'gap_{other}_energy_sd'] = 1000 * float(e.std()) if e.size else np.nan
        out[f'gap_{other}_force_mean'] = 1000 * float(f.mean()) if f.size else np.nan
    return out


def gap_columns(config: Dict[str, Any]) -> List[str]:
    ref = gap_reference(config)
    if ref is None:
        return []
    return [
        f'gap_{o}_{q}'
        for o in fidelity_names(config)
        if o != ref
        for q in ('energy_mean', 'energy_sd', 'force_mean')
    ]
