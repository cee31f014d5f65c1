#!/usr/bin/env python
"""Scale benchmarks (docs/benchmarks.md, section "Scale"). Each prints a
markdown table; every ratio is measured within one run, on the same data and
the same architecture, with the variants interleaved so that load from other
jobs on the machine hits them alike.

  python scripts/bench_scale.py throughput --n 256 --reps 5
      training structures/s: sevenn_mf onehot / indexed vs sevenn's native
      multi-modal training (use_modality, sevenn's builder, loader and Trainer)
  python scripts/bench_scale.py preprocess --n 4000 --reps 3
      graph preprocessing structures/s: sevenn_mf (in-memory pipeline and LMDB
      store) vs sevenn_graph_build (build_sevennet_graph_dataset)
  python scripts/bench_scale.py memory --sizes 10000 100000
      peak resident memory of a process training one epoch from the LMDB
      store (data.storage: lmdb) per database size; also of the store build

Synthetic data: rattled and strained fcc cells of 4 or 8 atoms of Cu/Ni/Al,
labelled with ASE's EMT (energy, forces, stress). Fidelity "low" is EMT,
"high" is EMT x 1.1 - 0.5 eV/atom. Generated once into
$SEVENN_MF_BENCH_CACHE (default ~/.cache/sevenn_mf/bench), outside the repo.
Run with OMP_NUM_THREADS=1 on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool

import numpy as np

CACHE = os.environ.get(
    'SEVENN_MF_BENCH_CACHE', os.path.expanduser('~/.cache/sevenn_mf/bench')
)
LATTICE = {'Cu': 3.61, 'Ni': 3.52, 'Al': 4.05}
SEEDS = {'low': 101, 'high': 202}


# ---- data -------------------------------------------------------------------------
def _structure(args):
    i, fidelity = args
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng([SEEDS[fidelity], i])
    atoms = bulk('Cu', 'fcc', a=1.0, cubic=True)
    if rng.random() < 0.5:
        atoms = atoms.repeat((2, 1, 1))
    symbols = rng.choice(list(LATTICE), size=len(atoms))
    a = float(np.mean([LATTICE[s] for s in symbols]))
    atoms.set_cell(atoms.cell.array * a, scale_atoms=True)
    atoms.set_chemical_symbols(symbols)
    strain = np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.positions += rng.normal(0, 0.1, atoms.positions.shape)
    atoms.calc = EMT()
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    if fidelity == 'high':
        e, f, s = 1.1 * e - 0.5 * len(atoms), 1.1 * f, 1.1 * s
    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
    return atoms


def dataset_file(n: int, fidelity: str, workers: int = 2) -> str:
    """``n`` structures (the first n of an endless deterministic sequence),
    generated once; a smaller set is copied from a larger one."""
    from ase.io import iread, write

    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f'emt_{fidelity}_{n}.extxyz')
    if os.path.isfile(path):
        return path
    larger = sorted(
        (int(f.split('_')[-1].split('.')[0]), f)
        for f in os.listdir(CACHE)
        if f.startswith(f'emt_{fidelity}_') and f.endswith('.extxyz')
    )
    larger = [f for m, f in larger if m > n]
    tmp = path + '.part'
    if os.path.exists(tmp):
        os.unlink(tmp)
    t0 = time.time()
    if larger:
        src = iread(os.path.join(CACHE, larger[0]), index=f':{n}')
        chunk = []
        for atoms in src:
            chunk.append(atoms)
            if len(chunk) == 2000:
                write(tmp, chunk, format='extxyz', append=True)
                chunk = []
        if chunk:
            write(tmp, chunk, format='extxyz', append=True)
    else:
        print(
            f'[data] generating {n} {fidelity} EMT structures into {path} '
            f'({workers} processes)',
            file=sys.stderr,
            flush=True,
        )
        with Pool(workers) as pool:
            done = 0
            for start in range(0, n, 2000):
                idx = [(i, fidelity) for i in range(start, min(n, start + 2000))]
                write(
                    tmp,
                    pool.map(_structure, idx, chunksize=50),
                    format='extxyz',
                    append=True,
                )
                done += len(idx)
                print(
                    f'[data]   {done}/{n} ({time.time() - t0:.0f} s)',
                    file=sys.stderr,
                    flush=True,
                )
    os.replace(tmp, path)
    return path


def split_sizes(n: int, hf: float):
    n_high = max(1, int(round(n * hf)))
    return n - n_high, n_high


# ---- common -----------------------------------------------------------------------
def model_section(args):
    return {
        'chemical_species': 'auto',
        'cutoff': args.cutoff,
        'channel': args.channel,
        'lmax': args.lmax,
        'num_convolution_layer': args.layers,
        'is_parity': False,
        'weight_nn_hidden_neurons': [32, 32],
    }


def mf_raw(args, low, high, mode='onehot', epochs=1, **data_extra):
    return {
        'model': dict(model_section(args), fidelity_layer_mode=mode),
        'train': {
            'random_seed': 1,
            'epoch': epochs,
            'per_epoch': 1000,
            'optimizer': 'adam',
            'optim_param': {'lr': 0.005},
            'scheduler': 'exponentiallr',
            'scheduler_param': {'gamma': 0.99},
            'loss': 'huber',
            'loss_param': {'delta': 0.01},
            'force_loss_weight': 1.0,
            'stress_loss_weight': 0.01,
            'device': 'cpu',
        },
        'data': dict(
            {
                'batch_size': args.batch,
                'databases': [
                    {'name': 'emt_low', 'fidelity': 'low', 'files': [low]},
                    {
                        'name': 'emt_high',
                        'fidelity': 'high',
                        'files': [high],
                        'weight': {'energy': 2.0, 'force': 2.0, 'stress': 2.0},
                    },
                ],
            },
            **data_extra,
        ),
    }


def md_table(head, rows):
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    out += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
    return '\n'.join(out)


def machine_line():
    load = os.getloadavg()
    return (
        f'{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}, '
        f'load average at the end {load[0]:.2f} (other jobs share the machine)'
    )


# ---- (a) training throughput ------------------------------------------------------
def bench_throughput(args):
    import torch

    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    import sevenn._keys as KEY
    from sevenn.error_recorder import ErrorRecorder
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.scripts.train import loader_from_config
    from sevenn.train.trainer import Trainer

    from sevenn_mf.config import config_from_dict
    from sevenn_mf.data.dataset import make_loaders, prepare_data
    from sevenn_mf.model import build_model
    from sevenn_mf.train import make_trainer

    n_low, n_high = split_sizes(args.n, args.hf)
    low, high = dataset_file(n_low, 'low'), dataset_file(n_high, 'high')
    work = tempfile.mkdtemp(prefix='bench_tp_')
    runs = {}
    graphs = None
    for mode in ('onehot', 'indexed'):
        cfg = config_from_dict(mf_raw(args, low, high, mode), base_dir=work)
        data = prepare_data(cfg, work, log=lambda *_: None)
        cfg = data.config
        torch.manual_seed(1)
        trainer = make_trainer(build_model(cfg), cfg)
        trainer.setup_run(cfg, os.path.join(work, mode), 1, None)
        loader = make_loaders(data, cfg)['trainset']
        rec = ErrorRecorder.from_config(cfg, trainer.loss_functions)
        runs[f'sevenn_mf {mode}'] = (trainer, loader, rec, trainer.model)
        graphs = data.train_graphs()
        stats_cfg = cfg

    # sevenn native multi-modal: its own config keys, builder, loader, Trainer;
    # the same graphs and statistics (shift/scale/denominator) as above
    native = {k: v for k, v in stats_cfg.items()}
    native.pop('fidelity_layer_mode')
    native['fidelities'] = []
    native[KEY.USE_MODALITY] = True
    native[KEY.IS_DDP] = False
    torch.manual_seed(1)
    nmodel = build_E3_equivariant_model(native)
    ntrainer = Trainer.from_config(nmodel, native)
    nloader = loader_from_config(native, graphs, is_train=True)
    nrec = ErrorRecorder.from_config(native, ntrainer.loss_functions)
    runs['sevenn native (use_modality)'] = (ntrainer, nloader, nrec, nmodel)

    n_train = len(graphs)
    times = {k: [] for k in runs}
    for rep in range(args.reps + 1):  # rep 0: warm-up
        for name, (trainer, loader, rec, _) in runs.items():
            t0 = time.perf_counter()
            trainer.run_one_epoch(loader, True, rec)
            dt = time.perf_counter() - t0
            rec.epoch_forward()
            if hasattr(trainer, 'metrics'):
                trainer.metrics.reset()
            if rep:
                times[name].append(dt)
    base = statistics.median(times['sevenn native (use_modality)'])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        params = sum(p.numel() for p in runs[name][3].parameters())
        rows.append(
            [
                name,
                f'{params:,}',
                f'{n_train / med:.1f}',
                f'{n_train / max(ts):.1f}-{n_train / min(ts):.1f}',
                f'{base / med:.3f}',
            ]
        )
    print(
        f'\n### Training throughput ({n_train} structures: {n_low} low + {n_high} high; '
        f'batch {args.batch}; cutoff {args.cutoff}, channel '
        f'{args.channel}, lmax {args.lmax}, {args.layers} layers; median of '
        f'{args.reps} epochs after 1 warm-up, interleaved)\n'
    )
    print(
        md_table(
            [
                'training',
                'parameters',
                'structures/s (median)',
                'range',
                'ratio vs native',
            ],
            rows,
        )
    )
    print(f'\n{machine_line()}')
    shutil.rmtree(work, ignore_errors=True)


# ---- (b) graph preprocessing ------------------------------------------------------
def bench_preprocess(args):
    import logging

    logging.disable(logging.WARNING)
    from sevenn.logger import Logger
    from sevenn.scripts.graph_build import build_sevennet_graph_dataset

    from sevenn_mf.data.databases import DatabaseSpec, read_frames, validate_frames
    from sevenn_mf.data.graphs import build_graphs
    from sevenn_mf.data.store import build_store

    Logger(screen=False)
    path = dataset_file(args.n, 'low')
    work = tempfile.mkdtemp(prefix='bench_pp_')

    def sevenn_build(k, cores=1):
        build_sevennet_graph_dataset(
            [path],
            args.cutoff,
            cores,
            os.path.join(work, f's{cores}_{k}'),
            'graph.pt',
        )

    def mf_memory(k):
        frames = read_frames(path)
        validate_frames(frames)
        build_graphs(
            frames, args.cutoff, 'low', cache_dir=os.path.join(work, f'm{k}')
        )

    def mf_store(k, workers=1):
        spec = DatabaseSpec('bench', 'low', [path])
        build_store(
            spec,
            args.cutoff,
            os.path.join(work, f'l{workers}_{k}.lmdb'),
            num_workers=workers,
            log=lambda *_: None,
        )

    variants = {
        'sevenn_graph_build (build_sevennet_graph_dataset, 1 core)': sevenn_build,
        'sevenn_mf in memory (read + validate + graphs + cache)': mf_memory,
        'sevenn_mf LMDB store, 1 process': mf_store,
    }
    if args.workers > 1:
        variants[f'sevenn_graph_build, {args.workers} cores'] = lambda k: (
            sevenn_build(k, args.workers)
        )
        variants[f'sevenn_mf LMDB store, {args.workers} processes'] = lambda k: (
            mf_store(k, args.workers)
        )
    times = {k: [] for k in variants}
    for rep in range(args.reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(rep)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(variants))])
    rows = [
        [
            name,
            f'{args.n / statistics.median(ts):.0f}',
            f'{base / statistics.median(ts):.2f}',
        ]
        for name, ts in times.items()
    ]
    print(
        f'\n### Graph preprocessing ({args.n} EMT structures of 4-8 atoms, extxyz, '
        f'cutoff {args.cutoff}; median of {args.reps}, interleaved)\n'
    )
    print(
        md_table(['pipeline', 'structures/s', 'ratio vs sevenn_graph_build'], rows)
    )
    print(
        '\nsevenn_graph_build also computes its dataset statistics; sevenn_mf '
        'validates every frame (labels, element set, 0.5 Å closest distance) and '
        'hashes the source file for its cache key.'
    )
    print(f'\n{machine_line()}')
    shutil.rmtree(work, ignore_errors=True)


# ---- (c) peak memory --------------------------------------------------------------
class _Peak:
    """Peak VmRSS and RssAnon of this process, sampled every 0.2 s."""

    def __init__(self):
        self.rss = self.anon = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    self.rss = max(self.rss, int(line.split()[1]) * 1024)
                elif line.startswith('RssAnon:'):
                    self.anon = max(self.anon, int(line.split()[1]) * 1024)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.2)

    def stop(self):
        self._stop.set()
        self._t.join()
        self._sample()
        return {
            'peak_rss': max(
                self.rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            ),
            'peak_anon': self.anon,
        }


def _memory_child(args):
    """One phase in a fresh process: 'build' the stores, or 'train' an epoch."""
    import torch

    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    from sevenn_mf.config import config_from_dict
    from sevenn_mf.data.dataset import prepare_data
    from sevenn_mf.train import train

    n_low, n_high = split_sizes(args.n, args.hf)
    low, high = dataset_file(n_low, 'low'), dataset_file(n_high, 'high')
    raw = mf_raw(
        args,
        low,
        high,
        epochs=1,
        storage=args.storage,
        graph_store_dir=os.path.join(CACHE, 'stores'),
        preprocess_workers=args.workers,
    )
    peak = _Peak()
    t0 = time.time()
    config = config_from_dict(raw, base_dir=CACHE)
    if args.phase == 'build':
        data = prepare_data(config, args.workdir, log=lambda *_: None)
        n = sum(len(db.train) for db in data.databases)
    else:
        train(config, args.workdir, screen=False)
        n = args.n
    out = peak.stop()
    out.update(phase=args.phase, n=n, seconds=time.time() - t0)
    print('RESULT ' + json.dumps(out), flush=True)


def bench_memory(args):
    results = []
    for n in args.sizes:
        n_low, n_high = split_sizes(n, args.hf)
        dataset_file(n_low, 'low', args.workers)
        dataset_file(n_high, 'high', args.workers)
        for phase in ('build', 'train'):
            wd = tempfile.mkdtemp(prefix=f'bench_mem_{n}_')
            cmd = [
                sys.executable,
                __file__,
                '_memory_child',
                '--n',
                str(n),
                '--phase',
                phase,
                '--workdir',
                wd,
                '--storage',
                args.storage,
                '--workers',
                str(args.workers),
                '--hf',
                str(args.hf),
                '--batch',
                str(args.batch),
                '--cutoff',
                str(args.cutoff),
                '--channel',
                str(args.channel),
                '--lmax',
                str(args.lmax),
                '--layers',
                str(args.layers),
            ]
            p = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            line = [x for x in p.stdout.splitlines() if x.startswith('RESULT ')]
            if p.returncode or not line:
                print(p.stdout[-3000:], file=sys.stderr)
                raise SystemExit(f'memory benchmark child failed (n={n}, {phase})')
            r = json.loads(line[-1][len('RESULT ') :])
            print(f'[memory] n={n} {phase}: {r}', file=sys.stderr, flush=True)
            results.append(r)
            shutil.rmtree(wd, ignore_errors=True)
    gb = 1024**3
    rows = [
        [
            r['n'],
            r['phase'],
            f'{r["peak_rss"] / gb:.3f}',
            f'{r["peak_anon"] / gb:.3f}',
            f'{r["seconds"]:.0f}',
        ]
        for r in results
    ]
    print(
        f'\n### Peak resident memory, data.storage: {args.storage} (one epoch; '
        f'{100 * args.hf:.0f}% high-fidelity; batch {args.batch}; cutoff {args.cutoff}, '
        f'channel {args.channel}, lmax {args.lmax}, {args.layers} layers)\n'
    )
    print(
        md_table(
            [
                'structures',
                'phase',
                'peak RSS (GiB)',
                'peak anonymous RSS (GiB)',
                'wall s',
            ],
            rows,
        )
    )
    train_rows = [r for r in results if r['phase'] == 'train']
    if len(train_rows) >= 2:
        a, b = train_rows[0], train_rows[-1]
        print(
            f'\ntraining peak RSS ratio {b["n"]} / {a["n"]} structures: '
            f'{b["peak_rss"] / a["peak_rss"]:.3f} '
            f'(anonymous: {b["peak_anon"] / a["peak_anon"]:.3f})'
        )
    if args.storage == 'lmdb':
        print(
            '\n"build" streams the extxyz files into the LMDB stores (skipped when '
            'the stores exist: delete $SEVENN_MF_BENCH_CACHE/stores to re-measure '
            'it); "train" is a fresh process running `sevenn_mf train` for one '
            'epoch from them. RSS includes mapped store pages; anonymous RSS '
            'excludes them.'
        )
    else:
        print(
            '\n"build" reads, validates and graphs everything in memory (and writes '
            'the graph cache); "train" is a fresh process running `sevenn_mf train` '
            'for one epoch (the same preparation, then the epoch).'
        )
    print(f'\n{machine_line()}')


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        'what',
        choices=['throughput', 'preprocess', 'memory', 'data', '_memory_child'],
    )
    p.add_argument('--n', type=int, default=256, help='structures')
    p.add_argument('--sizes', type=int, nargs='+', default=[10000, 100000])
    p.add_argument('--hf', type=float, default=0.05, help='high-fidelity fraction')
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--cutoff', type=float, default=4.5)
    p.add_argument('--channel', type=int, default=32)
    p.add_argument('--lmax', type=int, default=2)
    p.add_argument('--layers', type=int, default=3)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--storage', default='lmdb', choices=['lmdb', 'memory'])
    p.add_argument('--phase', default='train')
    p.add_argument('--workdir')
    args = p.parse_args(argv)
    if args.what == 'throughput':
        bench_throughput(args)
    elif args.what == 'preprocess':
        bench_preprocess(args)
    elif args.what == 'memory':
        bench_memory(args)
    elif args.what == 'data':
        for n in args.sizes:
            lo, hi = split_sizes(n, args.hf)
            print(
                dataset_file(lo, 'low', args.workers),
                dataset_file(hi, 'high', args.workers),
            )
    else:
        _memory_child(args)


if __name__ == '__main__':
    main()
