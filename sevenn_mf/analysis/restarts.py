"""Restarts of the multi-fidelity stage, and how one of them is kept.

``train.mf: {restarts: k}`` trains the MF stage k times from the same start
(the LF model with ``init: lf``), with ``train.random_seed`` + 1000 r for
restart r (restart 0 is the stage as it would run alone), and keeps the one
whose heads fit the HF structures best:

* with ``train.delta.paired_files`` (the HF structures' LF labels): the RMSE
  of the heads' gap E(HF head) - E(LF head) per atom against the labels' gap
  E(HF) - E(LF) per atom, over every HF structure of the stage (training and
  validation). The gap is what an MF model has to carry to where only LF data
  is; on InGaN the seeds whose heads fit it best at the end members are the
  ones whose gap bows with composition as the labels' does
  (docs/benchmarks.md, "Round 11").
* without them: the RMSE of the HF head's energy per atom over the HF
  structures.

Only training files are read.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

SEED_STEP = 1000


def restart_seed(seed: Optional[int], r: int) -> int:
    return int(seed if seed is not None else 1) + SEED_STEP * r


def head_energies(
    checkpoint: str, fidelities: Sequence[str], frames: Sequence[Any]
) -> List[np.ndarray]:
    """Per-atom energy of each head of ``checkpoint`` on ``frames`` (their
    graphs built once for all heads)."""
    from ..data.graphs import build_graphs
    from .predict import MethodModel

    models = [MethodModel([(checkpoint, f)]) for f in fidelities]
    graphs = build_graphs(list(frames), models[0].cutoff, 'predict', 1.0)
    return [np.asarray(m.predict_graphs(graphs).e_pred, dtype=float) for m in models]


def fit_criterion(
    checkpoint: str,
    hf_fidelity: str,
    hf_frames: Sequence[Any],
    lf_fidelity: Optional[str] = None,
    lf_frames: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """{'name', 'value'} of one restart (lower is better), in eV/atom.

    ``lf_frames``: the LF partners of ``hf_frames`` (same order), or None.
    Structures without an energy label (at either fidelity) are left out."""
    if lf_frames is None:
        hf_frames = [f for f in hf_frames if f.present.get('energy')]
    else:
        pairs = [
            (h, lf)
            for h, lf in zip(hf_frames, lf_frames)
            if h.present.get('energy') and lf.present.get('energy')
        ]
        hf_frames, lf_frames = [h for h, _ in pairs], [lf for _, lf in pairs]
    n = np.array([len(f.numbers) for f in hf_frames], dtype=float)
    hf_e = np.array([f.energy for f in hf_frames]) / n
    if lf_frames is None:
        (hf_pred,) = head_energies(checkpoint, [hf_fidelity], hf_frames)
        value = float(np.sqrt(np.mean((hf_pred - hf_e) ** 2)))
        return {'name': 'hf_energy_rmse', 'value': value}
    lf_e = np.array([f.energy for f in lf_frames]) / n
    hf_pred, lf_pred = head_energies(
        checkpoint, [hf_fidelity, lf_fidelity], hf_frames
    )
    gap_err = (hf_pred - lf_pred) - (hf_e - lf_e)
    return {'name': 'gap_rmse', 'value': float(np.sqrt(np.mean(gap_err**2)))}


def hf_frames_and_partners(mi, lf_fidelity: Optional[str]):
    """(HF frames of every HF database, their LF partners or None)."""
    from ..data.databases import parse_databases, read_frames
    from .delta import pair_frames

    frames: List[Any] = []
    for db, spec in zip(
        mi.hf_databases, parse_databases(mi.hf_databases, mi.base_dir)
    ):
        frames += read_frames(spec)
        val = spec.validation or {}
        if val.get('files'):
            vdb = dict(db, files=val['files'], validation=None)
            frames += read_frames(parse_databases([vdb], mi.base_dir)[0])
    files = mi.paired_files()
    if not files or lf_fidelity is None:
        return frames, None
    lf_frames: List[Any] = []
    for f in files:
        lf_frames += read_frames(f)
    pairs = pair_frames(frames, lf_frames)
    return [h for h, _ in pairs], [lf for _, lf in pairs]


def choose(scores: Sequence[Dict[str, Any]]) -> int:
    """Index of the restart with the lowest finite criterion."""
    values = [
        s['value'] if np.isfinite(s.get('value', np.nan)) else np.inf for s in scores
    ]
    if not np.isfinite(min(values)):
        raise ValueError('no restart has a finite fit criterion')
    return int(np.argmin(values))
