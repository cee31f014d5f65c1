"""ASE calculator with an explicit, validated fidelity."""

from __future__ import annotations

from typing import Optional

import numpy as np
from sevenn.calculator import SevenNetCalculator

from .checkpoint import Checkpoint, PathLike
from .gap import GapRange
from .model import resolve_fidelity


class SevenNetMFCalculator(SevenNetCalculator):
    """Energy, forces and stress of a (multi-fidelity) SevenNet model.

    ``checkpoint`` is a sevenn_mf checkpoint, a sevenn checkpoint (native
    multi-modal or plain) or a pretrained name (``7net-0``, ``7net-mf-0``).
    A multi-fidelity model needs ``fidelity``; a missing or unknown one is an
    error that lists the valid names, never a silent default.

    With ``gap=True`` (default for multi-fidelity models) each calculation
    also evaluates the other fidelity heads and puts the structure's
    fidelity gap to each (:mod:`sevenn_mf.gap`) into
    ``results['fidelity_gap']``: ``{other: {'energy': eV/atom, 'force':
    eV/Å, 'outside': bool or None}}``, ``outside`` saying whether the gap is
    outside the range the model had on its high-fidelity training structures
    (stored in sevenn_mf checkpoints; None where unknown), and
    ``results['fidelity_gap_outside']``. The first structure outside the
    range gives a warning; ``n_outside`` counts them. It costs one more
    evaluation per other head: pass ``gap=False`` for plain MD speed.
    """

    def __init__(
        self,
        checkpoint: PathLike,
        fidelity: Optional[str] = None,
        device: str = 'cpu',
        gap: bool = True,
        **kwargs,
    ) -> None:
        cp = (
            checkpoint
            if isinstance(checkpoint, Checkpoint)
            else Checkpoint(checkpoint)
        )
        self.checkpoint = cp
        self.fidelity = resolve_fidelity(cp.config, fidelity)
        model = cp.build_model()
        super().__init__(
            model,
            file_type='model_instance',
            device=device,
            modal=self.fidelity,
            sevennet_config=cp.config,
            **kwargs,
        )
        self.gap = bool(gap) and len(cp.fidelities) > 1 and self.fidelity is not None
        self.gap_range = GapRange.from_dict(cp.gap_range) if self.gap else None
        self.n_outside = 0

    @property
    def fidelities(self):
        return self.checkpoint.fidelities

    def _check_species(self, atoms) -> None:
        unknown = sorted(set(atoms.get_atomic_numbers()) - set(self.type_map))
        if unknown:
            from ase.data import chemical_symbols

            raise ValueError(
                f'element(s) {", ".join(chemical_symbols[z] for z in unknown)} '
                f'not in the model (species: {", ".join(self.checkpoint.species)})'
            )

    def set_atoms(self, atoms) -> None:
        self._check_species(atoms)

    def calculate(self, atoms=None, properties=None, system_changes=None):
        from ase.calculators.calculator import all_changes

        if atoms is not None:
            self._check_species(atoms)
        super().calculate(atoms, properties, system_changes or all_changes)
        # ASE expects plain float64 arrays
        for k in ('forces', 'stress', 'energies'):
            if k in self.results:
                self.results[k] = np.asarray(self.results[k], dtype=np.float64)
        if self.gap:
            self._fidelity_gaps(atoms or self.atoms, properties)

    def _fidelity_gaps(self, atoms, properties) -> None:
        from ase.calculators.calculator import all_changes

        main = self.results
        model = self.model
        rescale = model._modules['rescale_atomic_energy']
        modal = self.checkpoint.config['_modal_map']
        idx = [self.type_map[int(z)] for z in atoms.get_atomic_numbers()]
        n = len(idx)
        gaps = {}
        try:
            for other in self.fidelities:
                if other == self.fidelity:
                    continue
                self.modal = other
                SevenNetCalculator.calculate(self, atoms, properties, all_changes)
                res = self.results
                refs = 0.0
                if getattr(rescale, 'use_modal_wise_shift', False):
                    shift = rescale.shift.detach().double()
                    d = shift[modal[self.fidelity]] - shift[modal[other]]
                    refs = float(d[idx].sum())
                energy = (float(main['energy']) - float(res['energy']) - refs) / n
                force = float(
                    np.abs(
                        np.asarray(main['forces']) - np.asarray(res['forces'])
                    ).mean()
                )
                gaps[other] = {
                    'energy': energy,
                    'force': force,
                    'outside': self._outside(other, energy, force),
                }
        finally:
            self.modal = self.fidelity
            self.results = main
        outside = any(g['outside'] for g in gaps.values())
        self.results['fidelity_gap'] = gaps
        self.results['fidelity_gap_outside'] = outside
        if outside:
            self.n_outside += 1
            if self.n_outside == 1:
                import warnings

                other = next(o for o, g in gaps.items() if g['outside'])
                key, sign = self._stored_pair(other)
                warnings.warn(
                    f'structure outside the fidelity-gap range of the training data: '
                    f'{self.gap_range.reference} - {key} gap '
                    f'{1000 * sign * gaps[other]["energy"]:.1f} meV/atom, '
                    f'{1000 * gaps[other]["force"]:.0f} meV/Å; training range: '
                    f'{self.gap_range.describe(key)}. The {self.fidelity} prediction '
                    'extrapolates here (further cases are counted in n_outside).',
                    stacklevel=3,
                )

    def _stored_pair(self, other: str):
        """(key, sign): the stored range holds reference - key gaps, and
        this head's gap to ``other`` times sign is such a gap; None when the
        checkpoint has no range for this pair."""
        r = self.gap_range
        if r is None:
            return None
        if r.reference == self.fidelity and other in r.ranges:
            return other, 1.0
        if r.reference == other and self.fidelity in r.ranges:
            return self.fidelity, -1.0
        return None

    def _outside(self, other: str, energy: float, force: float):
        """The structure's gap against the stored training range (None when
        the checkpoint has none for this pair)."""
        pair = self._stored_pair(other)
        if pair is None:
            return None
        key, sign = pair
        return self.gap_range.outside(key, sign * energy, force)
