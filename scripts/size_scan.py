#!/usr/bin/env python3
"""Is the model big enough? Train the low-fidelity (LF) stage of a methods YAML
(its LF databases alone, the way transfer and delta train it) at several model
sizes, each until its validation loss stops improving (the YAML's
train.early_stopping), and print the LF validation errors against the number
of parameters. A size is big enough when the next larger one no longer lowers
the LF validation error (the LF head fits its own data).

    OMP_NUM_THREADS=1 python scripts/size_scan.py input_templates/ethanol_methods.yaml \\
        -w runs/size_ethanol --sizes 16,1,2 32,1,3 32,2,3 64,2,3

Sizes are channel,lmax,layers. Validation splits only: no test file is read.
Resumable (finished sizes are reused, see sevenn_mf.analysis.methods.run_stage).
"""

from __future__ import annotations

import argparse
import copy
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('input', help='methods YAML (sevenn_mf.analysis.methods)')
    p.add_argument('-w', '--working-dir', required=True)
    p.add_argument('--sizes', nargs='+', required=True, help='channel,lmax,layers')
    p.add_argument('--seed', type=int, default=1)
    args = p.parse_args()

    from sevenn_mf.analysis.methods import lf_stage, read_method_input, run_stage
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.metrics import FidelityMetrics

    mi = read_method_input(args.input)
    rows = []
    for size in args.sizes:
        ch, lmax, layers = (int(x) for x in size.split(','))
        m = copy.deepcopy(mi)
        m.raw['model'].update(channel=ch, lmax=lmax, num_convolution_layer=layers)
        m.raw['train']['random_seed'] = args.seed
        _, raw = lf_stage(m, None)
        d = os.path.join(args.working_dir, f'c{ch}_l{lmax}_n{layers}_s{args.seed}')
        t0 = time.time()
        res = run_stage('lf', raw, m.base_dir, d, resume=True, screen=False)
        cp = Checkpoint(res.checkpoint)
        n_param = sum(p.numel() for p in cp.build_model().parameters())
        metrics = FidelityMetrics.read_csv(os.path.join(d, 'metrics.csv'))
        best = [r for r in metrics if int(r['epoch']) == cp.epoch]
        fid = mi.lf_fidelities[0]
        val = next(r for r in best if r['set'] == f'{fid}_validset')
        epochs = max(int(r['epoch']) for r in metrics)
        rows.append(
            (
                size,
                n_param,
                epochs,
                cp.epoch,
                float(val['energy_mae']),
                float(val['force_mae']),
                res.seconds or time.time() - t0,
            )
        )
        print(
            f'{size:>10} params {n_param:>8} epochs {epochs:>4} best {cp.epoch:>4} '
            f'LF valid energy MAE {float(val["energy_mae"]):8.2f} meV/atom, force MAE '
            f'{float(val["force_mae"]):8.1f} meV/Å, {res.seconds:.0f} s',
            flush=True,
        )
    print(
        '\n| size (channel, lmax, layers) | parameters | epochs (best) | LF validation '
        'energy MAE (meV/atom) | LF validation force MAE (meV/Å) | wall (s) |'
    )
    print('|---|---|---|---|---|---|')
    for size, n, ep, best, e, f, s in rows:
        print(f'| {size} | {n:,} | {ep} ({best}) | {e:.2f} | {f:.1f} | {s:.0f} |')


if __name__ == '__main__':
    main()
