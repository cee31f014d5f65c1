#!/usr/bin/env python3
"""Validation curves of training runs side by side, from their metrics.csv:
one panel per column asked for, one line per run.

    python scripts/plot_validation_curves.py -o docs/figures/ema_validation.png \\
        --run "PBE-only, raw weights" .dev/lf/lf_c76f49720751 \\
        --run "PBE-only, weight average" runs/t10_ema/s1/shared/lf_1ace3d16b64b \\
        --panel validset:energy_mae --panel r2scan_validset:gap_pbe_energy_mean

A panel is SET:COLUMN of metrics.csv (a run without that set or column is
left out of the panel).
"""

from __future__ import annotations

import argparse
import csv
import os


def read_series(run_dir: str, set_name: str, column: str):
    path = os.path.join(run_dir, 'metrics.csv')
    xs, ys = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get('set') != set_name or not row.get(column):
                continue
            xs.append(int(row['epoch']))
            ys.append(float(row[column]))
    return xs, ys


LABELS = {
    'energy_mae': 'energy MAE (meV/atom)',
    'force_mae': 'force MAE (meV/Å)',
    'gap_pbe_energy_mean': "heads' mean gap (meV/atom)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('-o', '--output', required=True)
    p.add_argument(
        '--run', nargs=2, action='append', metavar=('LABEL', 'DIR'), required=True
    )
    p.add_argument('--panel', action='append', required=True, metavar='SET:COLUMN')
    p.add_argument('--log', action='store_true', help='logarithmic y axes')
    args = p.parse_args()

    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(args.panel), figsize=(5 * len(args.panel), 3.6), squeeze=False
    )
    for ax, panel in zip(axes[0], args.panel):
        set_name, column = panel.split(':', 1)
        for label, run_dir in args.run:
            xs, ys = read_series(run_dir, set_name, column)
            if xs:
                ax.plot(xs, ys, marker='.', ms=3, lw=1, label=label)
        ax.set_xlabel('epoch')
        ax.set_ylabel(LABELS.get(column, column))
        ax.set_title(set_name, fontsize=10)
        ax.grid(alpha=0.3)
        if args.log:
            ax.set_yscale('log')
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
