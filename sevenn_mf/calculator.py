"""ASE calculator with an explicit, validated fidelity."""

from __future__ import annotations

from typing import Optional

import numpy as np
from sevenn.calculator import SevenNetCalculator

from .checkpoint import Checkpoint, PathLike
from .model import resolve_fidelity


class SevenNetMFCalculator(SevenNetCalculator):
    """Energy, forces and stress of a (multi-fidelity) SevenNet model.

    ``checkpoint`` is a sevenn_mf checkpoint, a sevenn checkpoint (native
    multi-modal or plain) or a pretrained name (``7net-0``, ``7net-mf-0``).
    A multi-fidelity model needs ``fidelity``; a missing or unknown one is an
    error that lists the valid names, never a silent default.
    """

    def __init__(
        self,
        checkpoint: PathLike,
        fidelity: Optional[str] = None,
        device: str = 'cpu',
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
