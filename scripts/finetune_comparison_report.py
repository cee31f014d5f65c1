"""Table and figure of scripts/finetune_comparison.sh's runs.

    python3 scripts/finetune_comparison_report.py runs/finetune_cmp [--figure PNG]

Reads OUT/s<seed>/<run>/{eval/summary.csv, eval/per_structure.csv, metrics.csv,
checkpoint_best.pth} and OUT/s<seed>/times.txt; writes OUT/results.md (and prints it):
mean ± standard deviation over the seeds and each seed's value (wall time: the
first seed's, which should run on an otherwise idle machine); and a figure:
r2SCAN energy parity and per-structure force errors on the test split (first
seed) and the r2SCAN validation force error per epoch (every seed), the
quantity the best checkpoint was chosen by (with the energy).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics

RUNS = {
    'a_r2scan_only': '(a) 7net-0 fine-tuned on r2SCAN alone',
    'b_mf_from_7net0': '(b) 7net-0 -> multi-fidelity PBE + r2SCAN',
    'c_scratch': '(c) (b) trained from scratch',
}
METRICS = (
    'energy MAE (meV/atom)',
    'energy RMSE (meV/atom)',
    'force MAE (meV/Å)',
    'force RMSE (meV/Å)',
)


def _rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _summary(path):
    return {r['metric']: float(r['value']) for r in _rows(path)}


def _times(seed_dir):
    path = os.path.join(seed_dir, 'times.txt')
    if not os.path.isfile(path):
        return {}
    return {
        p[0]: int(p[2]) for p in (line.split() for line in open(path)) if len(p) == 3
    }


def _best_epoch(run_dir):
    from sevenn_mf import Checkpoint

    return Checkpoint(os.path.join(run_dir, 'checkpoint_best.pth')).epoch


def seed_dirs(out):
    dirs = sorted(
        glob.glob(os.path.join(out, 's[0-9]*')),
        key=lambda d: int(os.path.basename(d)[1:]),
    )
    return [
        d
        for d in dirs
        if all(
            os.path.isfile(os.path.join(d, r, 'eval', 'summary.csv')) for r in RUNS
        )
    ]


def _fmt(values, digits):
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def table(out):
    seeds = seed_dirs(out)
    if not seeds:
        raise SystemExit(
            f'{out}: no finished seed folder (s1, s2, ...) with all three runs'
        )
    names = [os.path.basename(s)[1:] for s in seeds]
    head = (
        '| run | energy MAE (meV/atom) | energy RMSE | force MAE (meV/Å) '
        f'| force RMSE | best epoch | train wall time (s), seed {names[0]} |'
    )
    lines = [head, '|---|---|---|---|---|---|---|']
    zs = os.path.join(out, 'zero_shot_7net0', 'eval', 'summary.csv')
    if os.path.isfile(zs):
        m = _summary(zs)
        lines.append(
            f"| 7net-0 as it is (no training; its energy zero is VASP's) | – | – "
            f'| {m["force MAE (meV/Å)"]:.0f} | {m["force RMSE (meV/Å)"]:.0f} '
            '| – | 0 |'
        )
    per_seed = [
        '| run | seed | energy MAE | force MAE | best epoch | wall time (s) |',
        '|---|---|---|---|---|---|',
    ]
    seed_times = {s: _times(s) for s in seeds}
    for run, label in RUNS.items():
        vals = {k: [] for k in METRICS}
        epochs, times = [], []
        for s, n in zip(seeds, names):
            m = _summary(os.path.join(s, run, 'eval', 'summary.csv'))
            for k in METRICS:
                vals[k].append(m[k])
            epochs.append(_best_epoch(os.path.join(s, run)))
            times.append(seed_times[s].get(run))
            per_seed.append(
                f'| {label} | {n} | {m[METRICS[0]]:.1f} | {m[METRICS[2]]:.0f} '
                f'| {epochs[-1]} | {times[-1]} |'
            )
        lines.append(
            f'| {label} | {_fmt(vals[METRICS[0]], 1)} | {_fmt(vals[METRICS[1]], 1)}'
            f' | {_fmt(vals[METRICS[2]], 0)} | {_fmt(vals[METRICS[3]], 0)}'
            f' | {", ".join(str(e) for e in epochs)}'
            f' | {times[0] if times[0] is not None else "?"} |'
        )
    pbe = _pbe_kept(out, seeds)
    return (
        f'r2SCAN errors on hf_test_dev_r2scan.extxyz (x = 0.5, 20 cells; no r2SCAN '
        f'training cell has x = 0.5); mean ± sd over seeds {", ".join(names)}\n\n'
        + '\n'.join(lines)
        + '\n'
        + pbe
        + '\nPer seed:\n\n'
        + '\n'.join(per_seed)
        + '\n'
    )


def _pbe_kept(out, seeds):
    """(b)'s replayed PBE fidelity vs 7net-0 on the test cells at PBE."""
    zs = os.path.join(out, 'zero_shot_7net0', 'eval_pbe', 'summary.csv')
    runs = [
        os.path.join(s, 'b_mf_from_7net0', 'eval_pbe', 'summary.csv') for s in seeds
    ]
    if not os.path.isfile(zs) or not all(os.path.isfile(r) for r in runs):
        return ''
    f0 = _summary(zs)['force MAE (meV/Å)']
    fb = [_summary(r)['force MAE (meV/Å)'] for r in runs]
    eb = [_summary(r)['energy MAE (meV/atom)'] for r in runs]
    return (
        '\nThe PBE fidelity of (b) (replayed at 25 % of each epoch) on the same '
        f'cells at PBE (hf_test_dev_pbe.extxyz): force MAE {_fmt(fb, 0)} meV/Å '
        f'(7net-0 as it is: {f0:.0f}), energy MAE {_fmt(eb, 1)} meV/atom.\n'
    )


def _valid_curve(run_dir):
    from sevenn_mf.metrics import FidelityMetrics

    rows = [
        r
        for r in FidelityMetrics.read_csv(os.path.join(run_dir, 'metrics.csv'))
        if r['set'] == 'r2scan_validset'
    ]
    return [int(r['epoch']) for r in rows], [float(r['force_mae']) for r in rows]


def figure(out, png):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    seeds = seed_dirs(out)
    first = seeds[0]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = dict(zip(RUNS, ('tab:orange', 'tab:blue', 'tab:gray')))
    lo, hi = float('inf'), -float('inf')
    for run, label in RUNS.items():
        p = _rows(os.path.join(first, run, 'eval', 'per_structure.csv'))
        ref = [float(r['energy_ref_eV_atom']) for r in p]
        pred = [float(r['energy_pred_eV_atom']) for r in p]
        lo, hi = min(lo, *ref, *pred), max(hi, *ref, *pred)
        ax[0].scatter(ref, pred, s=18, color=colors[run], label=label)
        fmae = sorted(float(r['force_mae_meV_A']) for r in p)
        ax[1].plot(range(1, len(fmae) + 1), fmae, 'o-', ms=3, color=colors[run])
        for i, s in enumerate(seeds):
            ep, vf = _valid_curve(os.path.join(s, run))
            ax[2].plot(
                ep,
                vf,
                'o-',
                ms=3,
                lw=1,
                alpha=1.0 if i == 0 else 0.45,
                color=colors[run],
            )
    ax[0].plot([lo, hi], [lo, hi], 'k--', lw=0.8)
    seed = os.path.basename(first)[1:]
    ax[0].set(
        xlabel='r2SCAN energy (eV/atom)',
        ylabel='predicted (eV/atom)',
        title=f'test x = 0.5: energy parity (seed {seed})',
    )
    ax[0].legend(fontsize=8)
    ax[1].set(
        xlabel='test structure (sorted)',
        ylabel='force MAE (meV/Å)',
        yscale='log',
        title=f'test x = 0.5: per-structure force error (seed {seed})',
    )
    ax[2].set(
        xlabel='epoch',
        ylabel='force MAE (meV/Å)',
        yscale='log',
        title=f'r2SCAN validation (x = 0, 1), {len(seeds)} seed(s)',
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out', help="finetune_comparison.sh's output folder")
    ap.add_argument('--figure', help='PNG path (default OUT/comparison.png)')
    args = ap.parse_args(argv)
    text = table(args.out)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(text)
    print(text)
    print(
        'figure:',
        figure(args.out, args.figure or os.path.join(args.out, 'comparison.png')),
    )


if __name__ == '__main__':
    main()
