"""Parity plots (energy, force, stress) of a model at each of its fidelities,
each on labelled structures of that fidelity (``evaluate.parity_plot``)."""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Sequence

from ..evaluate import error_summary, parity_plot


def parse_data_args(items: Sequence[str]) -> Dict[str, List[str]]:
    """``['pbe=a.extxyz,b.extxyz', 'r2scan=c.extxyz']`` -> {fidelity: files}."""
    out: Dict[str, List[str]] = {}
    for item in items:
        if '=' not in item:
            raise ValueError(f'--data expects FIDELITY=FILE[,FILE...], got {item!r}')
        fid, files = item.split('=', 1)
        out.setdefault(fid, []).extend(f for f in files.split(',') if f)
    return out


def parity_report(
    source: str, data: Dict[str, List[str]], out_dir: str
) -> Dict[str, Dict]:
    """For each fidelity: parity_<fidelity>.png and a row in summary.csv.
    ``source``: checkpoint or method run (``model.json``; its HF fidelity only)."""
    from .predict import MethodModel

    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for fid, files in data.items():
        model = MethodModel.load(source, fid)
        _, p = model.predict_files(files)
        errors = error_summary(p)
        png = parity_plot(
            p,
            os.path.join(out_dir, f'parity_{fid}.png'),
            title=f'{model.describe()} at {fid}: '
            + ', '.join(os.path.basename(f) for f in files),
        )
        results[fid] = {'n_structures': len(p.e_ref), 'errors': errors, 'plot': png}
    with open(os.path.join(out_dir, 'summary.csv'), 'w', newline='') as fh:
        w = csv.writer(fh)
        keys = list(next(iter(results.values()))['errors']) if results else []
        w.writerow(['fidelity', 'n_structures'] + keys)
        for fid, r in results.items():
            w.writerow(
                [fid, r['n_structures']] + [f'{r["errors"][k]:.6g}' for k in keys]
            )
    return results
