"""Predictions of any method's result: one checkpoint at one fidelity, or a
sum of such (Delta-learning).

A *model source* is a checkpoint (with ``fidelity``), a method run folder
holding ``model.json`` (written by :func:`sevenn_mf.analysis.methods.run_method`),
or that ``model.json`` itself.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..evaluate import Predictions, predict

MODEL_JSON = 'model.json'


def read_parts(
    source: str, fidelity: Optional[str] = None
) -> Tuple[List[Tuple[str, Optional[str]]], Dict[str, Any]]:
    """((checkpoint, fidelity) parts, model.json content or {})."""
    source = str(source)
    path = source
    if os.path.isdir(source):
        path = os.path.join(source, MODEL_JSON)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f'{source}: a folder without {MODEL_JSON} '
                '(not a sevenn_mf train --method run)'
            )
    if path.endswith('.json'):
        with open(path) as f:
            meta = json.load(f)
        d = os.path.dirname(os.path.abspath(path))
        parts = [
            (os.path.normpath(os.path.join(d, p['checkpoint'])), p['fidelity'])
            for p in meta['parts']
        ]
        if fidelity is not None and fidelity != meta.get('hf_fidelity'):
            raise ValueError(
                f'{source} predicts {meta.get("hf_fidelity")} only '
                f'(asked for {fidelity})'
            )
        return parts, meta
    return [(source, fidelity)], {}


class MethodModel:
    """The sum of ``parts`` (checkpoint, fidelity)."""

    def __init__(
        self,
        parts: Sequence[Tuple[str, Optional[str]]],
        meta: Optional[Dict[str, Any]] = None,
    ) -> None:
        from ..checkpoint import Checkpoint
        from ..model import resolve_fidelity

        self.meta = dict(meta or {})
        self.parts = []
        for ckpt, fid in parts:
            cp = Checkpoint(ckpt)
            self.parts.append(
                (cp, resolve_fidelity(cp.config, fid), cp.build_model())
            )
        cutoffs = {cp.cutoff for cp, _, _ in self.parts}
        if len(cutoffs) > 1:
            raise ValueError(f'the parts have different cutoffs {sorted(cutoffs)}')

    @classmethod
    def load(cls, source: str, fidelity: Optional[str] = None) -> MethodModel:
        parts, meta = read_parts(source, fidelity)
        return cls(parts, meta)

    @property
    def cutoff(self) -> float:
        return self.parts[0][0].cutoff

    @property
    def species(self) -> List[str]:
        return self.parts[0][0].species

    def describe(self) -> str:
        return ' + '.join(
            f'{os.path.basename(cp.path)}@{fid}' for cp, fid, _ in self.parts
        )

    def predict_graphs(
        self, graphs: Sequence[Any], batch_size: int = 8
    ) -> Predictions:
        total: Optional[Predictions] = None
        for cp, fid, model in self.parts:
            p = predict(cp, graphs, fid, batch_size, model=model)
            if total is None:
                total = p
                continue
            total.e_pred = [a + b for a, b in zip(total.e_pred, p.e_pred)]
            total.f_pred = [a + b for a, b in zip(total.f_pred, p.f_pred)]
            total.s_pred = [a + b for a, b in zip(total.s_pred, p.s_pred)]
        return total

    def predict_frames(
        self, frames: Sequence[Any], batch_size: int = 8
    ) -> Predictions:
        from ase.data import chemical_symbols

        from ..data.graphs import build_graphs

        known = set(self.species)
        for fr in frames:  # labels are optional here: only the species must fit
            extra = {chemical_symbols[int(z)] for z in fr.numbers} - known
            if extra:
                raise ValueError(
                    f'{fr.where}: element(s) {", ".join(sorted(extra))} '
                    f'not in the model (species: {", ".join(self.species)})'
                )
        graphs = build_graphs(
            list(frames), self.cutoff, 'predict', 1.0, desc='predict'
        )
        return self.predict_graphs(graphs, batch_size)

    def predict_files(
        self, files: Sequence[str], batch_size: int = 8
    ) -> Tuple[List[Any], Predictions]:
        frames = read_files(files)
        return frames, self.predict_frames(frames, batch_size)

    def calculator(self, device: str = 'cpu'):
        from ..calculator import SevenNetMFCalculator

        if len(self.parts) == 1:
            cp, fid, _ = self.parts[0]
            return SevenNetMFCalculator(cp, fid, device=device)
        from ase.calculators.mixing import SumCalculator

        return SumCalculator(
            [
                SevenNetMFCalculator(cp, fid, device=device)
                for cp, fid, _ in self.parts
            ]
        )


def read_files(files: Sequence[str]) -> List[Any]:
    from ..data.databases import read_frames

    if isinstance(files, str):
        files = [files]
    frames = []
    for f in files:
        frames += read_frames(f)
    return frames


def total_energies(p: Predictions) -> Tuple[np.ndarray, np.ndarray]:
    """(reference, predicted) total energies in eV (NaN reference = unlabelled)."""
    n = np.asarray(p.natoms, float)
    return np.asarray(p.e_ref, float) * n, np.asarray(p.e_pred, float) * n
