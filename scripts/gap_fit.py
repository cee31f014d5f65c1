#!/usr/bin/env python3
"""How well a model's heads' gap fits the labelled gap where both labels exist.

On the HF training structures that also have LF labels (the paired file of
Delta-learning), the labels' gap E(HF) - E(LF) per atom is known. For each
checkpoint this prints, per composition (x = In / (In + Ga), or one group
for other systems), the labels' and the model's gap: their slope against the
volume per atom, their correlation, and the RMSE of the model's gap. Only
training files are read, so a recipe may be chosen by it.

Why the slope: on InGaN the r2SCAN - PBE gap rises with the volume per atom
(more steeply in GaN than in InN), and that is what makes it bow in the alloy,
where Ga-N bonds are stretched and In-N bonds compressed. A model whose gap
is flatter than the labels' where it has both labels will bow too little
where it has none (docs/benchmarks.md, "Round 11").

    OMP_NUM_THREADS=1 python scripts/gap_fit.py RUN/mf/checkpoint_best.pth ...
    # Delta-learning's model B predicts the gap itself:
    python scripts/gap_fit.py RUN/delta/checkpoint_best.pth --gap-fidelity delta
"""

from __future__ import annotations

import argparse
import warnings
from typing import Dict, List, Sequence

import numpy as np


def fit_rows(
    group: Sequence[float],
    volume: Sequence[float],
    true_gap: Sequence[float],
    model_gap: Sequence[float],
) -> List[Dict[str, float]]:
    """Per group: slopes of the labels' and the model's gap against the
    volume (gap units per volume unit), their correlation, the model gap's
    RMSE, and the count."""
    group, volume = np.asarray(group), np.asarray(volume, dtype=float)
    t, g = np.asarray(true_gap, dtype=float), np.asarray(model_gap, dtype=float)
    rows = []
    for k in sorted(set(group.tolist())):
        m = group == k
        row = {'group': k, 'n': int(m.sum())}
        if m.sum() >= 3 and np.ptp(volume[m]) > 0:
            row['true_slope'] = float(np.polyfit(volume[m], t[m], 1)[0])
            row['model_slope'] = float(np.polyfit(volume[m], g[m], 1)[0])
        if m.sum() >= 3 and t[m].std() > 0 and g[m].std() > 0:
            row['corr'] = float(np.corrcoef(t[m], g[m])[0, 1])
        row['rmse'] = float(np.sqrt(np.mean((g[m] - t[m]) ** 2)))
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('checkpoints', nargs='+')
    p.add_argument(
        '--hf-file', default='../shared/data/ingan/hf_train_r2scan.extxyz'
    )
    p.add_argument('--paired', default='../shared/data/ingan/hf_train_pbe.extxyz')
    p.add_argument('--hf', default='r2scan')
    p.add_argument('--lf', default='pbe')
    p.add_argument(
        '--gap-fidelity',
        help='a fidelity whose prediction is the gap itself (delta model B)',
    )
    args = p.parse_args()

    from gap_bowing import x_in  # scripts/ is on sys.path when run as a script

    from sevenn_mf.analysis.delta import pair_frames
    from sevenn_mf.analysis.restarts import head_energies
    from sevenn_mf.data.databases import read_frames

    pairs = pair_frames(read_frames(args.hf_file), read_frames(args.paired))
    hf = [h for h, _ in pairs]
    group = [x_in(h.atoms) for h in hf]
    volume = [h.atoms.get_volume() / len(h.atoms) for h in hf]
    true_gap = [(h.energy - lf.energy) / len(h.atoms) for h, lf in pairs]
    print(
        "| checkpoint | x | n | labels' slope | model's slope (meV/atom per "
        'Å³/atom) | corr | gap RMSE (meV/atom) |'
    )
    print('|---|---|---|---|---|---|---|')
    heads = [args.gap_fidelity] if args.gap_fidelity else [args.hf, args.lf]
    for ck in args.checkpoints:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            e = head_energies(ck, heads, hf)
        gap = e[0] - (e[1] if len(e) > 1 else 0.0)
        for r in fit_rows(group, volume, true_gap, gap):
            print(
                f'| {ck} | {r["group"]:g} | {r["n"]} | '
                f'{1e3 * r.get("true_slope", np.nan):.1f} | '
                f'{1e3 * r.get("model_slope", np.nan):.1f} | '
                f'{r.get("corr", np.nan):.2f} | {1e3 * r["rmse"]:.1f} |'
            )


if __name__ == '__main__':
    main()
