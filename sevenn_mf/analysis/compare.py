"""Several models on the same labelled structures, side by side: a table of
errors (MAE, RMSE and the signed mean error of the energy) and a figure
(error bars per model, energy and force parity plots overlaid).

A model is anything :class:`~sevenn_mf.analysis.predict.MethodModel` loads:
a checkpoint with its fidelity, a ``sevenn_mf train --method`` run folder
(including Delta sums) or a pretrained name (``7net-0``).
"""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..evaluate import Predictions, error_summary


def _bias(p: Predictions) -> float:
    ref, pred = np.asarray(p.e_ref, float), np.asarray(p.e_pred, float)
    ok = np.isfinite(ref)
    return float(1000 * (pred[ok] - ref[ok]).mean()) if ok.any() else float('nan')


def compare(
    models: Sequence[Tuple[str, str]],
    fidelity: Optional[str],
    files: Sequence[str],
    out_dir: str,
    title: str = '',
) -> List[Dict[str, float]]:
    """``models``: (label, model source). Writes ``compare.csv`` and
    ``compare.png`` into ``out_dir``; returns one row per model."""
    from .predict import MethodModel

    os.makedirs(out_dir, exist_ok=True)
    rows, preds = [], []
    for label, source in models:
        model = MethodModel.load(source, fidelity)
        _, p = model.predict_files(list(files))
        err = error_summary(p)
        rows.append(
            {
                'model': label,
                'source': str(source),
                'energy_mae': err['energy MAE (meV/atom)'],
                'energy_rmse': err['energy RMSE (meV/atom)'],
                'energy_bias': _bias(p),
                'force_mae': err['force MAE (meV/Å)'],
                'force_rmse': err['force RMSE (meV/Å)'],
            }
        )
        preds.append(p)
    with open(os.path.join(out_dir, 'compare.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, preds, os.path.join(out_dir, 'compare.png'), title)
    return rows


def table(rows: Sequence[Dict[str, float]]) -> str:
    out = [
        f'{"model":<28}{"energy MAE":>12}{"bias":>9}{"force MAE":>11}'
        f'{"force RMSE":>12}',
        f'{"":<28}{"meV/atom":>12}{"meV/atom":>9}{"meV/Å":>11}{"meV/Å":>12}',
    ]
    for r in rows:
        out.append(
            f'{r["model"]:<28}{r["energy_mae"]:>12.1f}{r["energy_bias"]:>+9.1f}'
            f'{r["force_mae"]:>11.0f}{r["force_rmse"]:>12.0f}'
        )
    return '\n'.join(out)


def plot(rows, preds: Sequence[Predictions], path: str, title: str = '') -> str:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    has_f = any(np.isfinite(r['force_mae']) for r in rows)
    n = 2 + has_f
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n, 4))
    labels = [r['model'] for r in rows]
    x = np.arange(len(rows))
    ax = axes[0]
    ax.bar(x - 0.2, [r['energy_mae'] for r in rows], 0.4, label='energy (meV/atom)')
    if has_f:
        ax2 = ax.twinx()
        ax2.bar(
            x + 0.2,
            [r['force_mae'] for r in rows],
            0.4,
            color='C1',
            label='force (meV/Å)',
        )
        ax2.set_ylabel('force MAE (meV/Å)', color='C1')
    ax.set_xticks(x, labels, rotation=20, ha='right', fontsize=8)
    ax.set_ylabel('energy MAE (meV/atom)', color='C0')
    ax.set_title('errors')
    for k, (label, p) in enumerate(zip(labels, preds)):
        ref, pred = np.asarray(p.e_ref, float), np.asarray(p.e_pred, float)
        ok = np.isfinite(ref)
        axes[1].scatter(
            ref[ok], pred[ok], s=10, alpha=0.7, label=label, color=f'C{k}'
        )
        if has_f and p.f_ref:
            fr = np.concatenate(p.f_ref).ravel()
            fp = np.concatenate(p.f_pred).ravel()
            okf = np.isfinite(fr)
            axes[2].scatter(
                fr[okf], fp[okf], s=3, alpha=0.4, label=label, color=f'C{k}'
            )
    for ax, name in zip(axes[1:], ('energy (eV/atom)', 'force (eV/Å)')):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], 'k--', lw=0.7)
        ax.set_xlabel(f'reference {name}')
        ax.set_ylabel(f'predicted {name}')
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
