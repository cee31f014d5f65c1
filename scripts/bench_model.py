"""Cost of the fidelity layers: forward + backward (forces, training step) of a
SevenNet-0-sized model, sevenn_mf `onehot` and `indexed` against the plain
sevenn model of the same architecture, measured interleaved in one run.

    OMP_NUM_THREADS=2 python scripts/bench_model.py [--reps 15]

Workloads: one 64-atom InGaN cell (one fidelity), and a batch of eight 8-atom
cells with alternating fidelities. Targets (issue #2): indexed <= 1.10x,
onehot <= 1.03x the plain model.
"""

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))


def _graphs(cutoff, fidelities):
    from ase.io import read
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import atoms_to_graph

    frames = read(
        os.path.join(HERE, '..', 'input_templates', 'quickstart_data', 'pbe.extxyz'),
        ':',
    )
    big = frames[0].repeat((2, 2, 2))

    def graph(a, fid):
        a = a.copy()
        a.info['y_energy'] = 0.0
        a.arrays['y_force'] = np.zeros((len(a), 3))
        g = AtomGraphData.from_numpy_dict(atoms_to_graph(a, cutoff))
        if fid is not None:
            g['data_modality'] = fid
        return g

    single = [graph(big, fidelities[0] if fidelities else None)]
    mixed = [
        graph(frames[i], fidelities[i % 2] if fidelities else None) for i in range(8)
    ]
    return single, mixed


def _step_time(model, batch):
    t0 = time.perf_counter()
    out = model(batch.clone())
    loss = (
        out['inferred_total_energy'].square().sum()
        + out['inferred_force'].square().sum()
    )
    loss.backward()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--reps', type=int, default=15)
    args = p.parse_args()
    import sevenn._keys as KEY
    from _bench_models import multi_fidelity_config, sevennet0_config
    from sevenn.model_build import build_E3_equivariant_model
    from torch_geometric.loader import DataLoader

    import sevenn_mf  # noqa: F401  (hooks)
    from sevenn_mf.model import build_model

    base = sevennet0_config()  # SevenNet-0 architecture (random weights)
    fids = ['pbe', 'r2scan']
    torch.manual_seed(0)
    models = {'plain': build_E3_equivariant_model(copy.deepcopy(base))}
    for mode in ('onehot', 'indexed'):
        cfg = multi_fidelity_config(base, mode, fids)
        models[mode] = build_model(cfg)
    for m in models.values():
        m.set_is_batch_data(True)
        m.train()
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}

    results = {}
    for label in ('64-atom cell', 'mixed batch 8x8 atoms'):
        batches = {}
        for name in models:
            single, mixed = _graphs(
                base[KEY.CUTOFF], None if name == 'plain' else fids
            )
            gs = single if label.startswith('64') else mixed
            batches[name] = next(iter(DataLoader(gs, batch_size=len(gs))))
        times = {k: [] for k in models}
        for name in models:  # warm-up
            _step_time(models[name], batches[name])
        for r in range(args.reps):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                times[name].append(_step_time(models[name], batches[name]))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[label] = med
        print(
            f'\n{label}: forward+backward (forces) per step, median of {args.reps}'
        )
        for k in models:
            print(
                f'  {k:<8} {med[k] * 1000:8.1f} ms   ratio to plain '
                f'{med[k] / med["plain"]:.3f}   ({n_params[k]:,} parameters)'
            )
    print(f'\ntorch threads: {torch.get_num_threads()}')
    return results


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
