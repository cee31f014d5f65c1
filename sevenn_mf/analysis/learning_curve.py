"""Learning curves: HF test error against the number of HF structures, for
several training methods and seeds, run one after the other and resumable.

Spec (YAML; paths relative to it)::

    input: ingan_methods.yaml       # a training YAML for sevenn_mf.analysis.methods
    methods: [hf-only, transfer, delta, mf-onehot, mf-indexed]
    hf_sizes: [10, 40, 80]          # int: a count; float in (0, 1]: a fraction
    seeds: [1, 2, 3]
    epochs: 20                      # optional: overrides train.epoch
    test:
        files: [../shared/data/ingan/hf_test_dev_r2scan.extxyz]
        fidelity: r2scan            # optional: default the HF fidelity
    lf_test:                        # optional: the LF head on LF labels
        files: [../shared/data/ingan/hf_test_dev_pbe.extxyz]
        fidelity: pbe
    mixing:                         # optional (InGaN): mixing energies
        end_members: [../shared/data/ingan/hf_train_r2scan.extxyz]
        terminals: [GaN, InN]
        choice: lowest              # or mean (sevenn_mf.analysis.hull)

For each seed, the HF pool (every HF database of ``input``, in order) is
permuted by ``numpy.random.default_rng(seed)``; the size-n subset is the first
n of that permutation (so subsets of one seed are nested), written to
``subsets/`` and used as the HF databases (their validation split applies to
the subset, so n counts every HF structure the run sees). The seed is also
the run's ``random_seed``. Runs are independent folders
``runs/<method>/n<n>_s<seed>/``; stages that do not depend on the HF subset
(the LF model of transfer and delta) are shared under ``shared/``.

Each row of ``results.csv`` has the HF test errors (MAE, RMSE and the signed
mean error ``*_bias``), the same model's LF-head errors on ``lf_test``
(``lf_*``: the MF model at the LF fidelity, the fine-tuned transfer model at
its pretraining fidelity, the LF part of a delta model; none for hf-only),
and, per run, the epochs trained and the best epoch of its last stage (the
evidence that it converged).

``results.csv`` gets one row per finished run, rewritten atomically (a
temporary file renamed over it); a run already in it is skipped, and an
interrupted one continues from its checkpoints. ``summary.csv`` (mean,
sample standard deviation, min, max over seeds) and ``learning_curve.png``
(mean line, min-max band, std error bars) are rebuilt from ``results.csv`` at
the end of every run.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import yaml

from .methods import METHODS, MethodError, read_method_input, run_method

RESULTS = 'results.csv'
SUMMARY = 'summary.csv'
PLOT = 'learning_curve.png'
COLUMNS = [
    'method',
    'n_hf',
    'seed',
    'n_hf_pool',
    'energy_mae',
    'energy_rmse',
    'energy_bias',
    'force_mae',
    'force_rmse',
    'stress_mae',
    'mixing_mae',
    'mixing_rmse',
    'mixing_r2',
    'lf_energy_mae',
    'lf_energy_bias',
    'lf_force_mae',
    'epochs',
    'best_epoch',
    'train_seconds',
    'stage_seconds',
    'eval_seconds',
    'run_dir',
]
METRICS = [
    'energy_mae',
    'energy_rmse',
    'energy_bias',
    'force_mae',
    'force_rmse',
    'mixing_mae',
    'mixing_r2',
    'lf_energy_mae',
    'lf_energy_bias',
    'lf_force_mae',
    'epochs',
    'best_epoch',
]
UNITS = {
    'energy_mae': 'meV/atom',
    'energy_rmse': 'meV/atom',
    'energy_bias': 'meV/atom',
    'lf_energy_mae': 'meV/atom',
    'lf_energy_bias': 'meV/atom',
    'lf_force_mae': 'meV/Å',
    'epochs': '',
    'best_epoch': '',
    'force_mae': 'meV/Å',
    'force_rmse': 'meV/Å',
    'mixing_mae': 'meV/atom',
    'mixing_r2': '',
}


class SpecError(ValueError):
    pass


def _abs(base: str, files) -> List[str]:
    if isinstance(files, str):
        files = [files]
    return [
        os.path.abspath(os.path.join(base, os.path.expanduser(f))) for f in files
    ]


def read_spec(path: str) -> Dict[str, Any]:
    path = os.path.abspath(path)
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    base = os.path.dirname(path)
    allowed = {
        'input',
        'methods',
        'hf_sizes',
        'seeds',
        'epochs',
        'test',
        'lf_test',
        'mixing',
    }
    bad = sorted(set(spec) - allowed)
    if bad:
        raise SpecError(f'{path}: unknown key(s) {bad}; allowed: {sorted(allowed)}')
    for k in ('input', 'methods', 'hf_sizes', 'seeds', 'test'):
        if k not in spec:
            raise SpecError(f'{path}: {k} is required')
    spec['input'] = _abs(base, spec['input'])[0]
    for m in spec['methods']:
        if m not in METHODS:
            raise SpecError(f'{path}: unknown method {m!r} ({", ".join(METHODS)})')
    for n in spec['hf_sizes']:
        ok = (isinstance(n, int) and not isinstance(n, bool) and n >= 1) or (
            isinstance(n, float) and 0 < n <= 1
        )
        if not ok:
            raise SpecError(
                f'{path}: hf_sizes entries are counts (int >= 1) or '
                f'fractions (0 < float <= 1), got {n!r}'
            )
    test = dict(spec['test'])
    test['files'] = _abs(base, test.get('files') or [])
    if not test['files']:
        raise SpecError(f'{path}: test.files is empty')
    spec['test'] = test
    if spec.get('lf_test'):
        lf = dict(spec['lf_test'])
        lf['files'] = _abs(base, lf.get('files') or [])
        if not lf['files'] or not lf.get('fidelity'):
            raise SpecError(f'{path}: lf_test needs files and fidelity')
        spec['lf_test'] = lf
    if spec.get('mixing'):
        mixing = dict(spec['mixing'])
        mixing['end_members'] = _abs(base, mixing.get('end_members') or [])
        mixing.setdefault('terminals', ['GaN', 'InN'])
        mixing.setdefault('choice', 'lowest')
        spec['mixing'] = mixing
    return spec


# ---- results file -----------------------------------------------------------------
def read_results(out_dir: str) -> List[Dict[str, str]]:
    path = os.path.join(out_dir, RESULTS)
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _write_csv(
    path: str, columns: Sequence[str], rows: Sequence[Dict[str, Any]]
) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow(r)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_result(out_dir: str, row: Dict[str, Any]) -> None:
    """Add one row to results.csv atomically (old file or new file, never
    half), under a lock: several processes may run parts of one curve."""
    import fcntl

    with open(os.path.join(out_dir, '.results.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_results(out_dir) + [{k: _fmt(row.get(k, '')) for k in COLUMNS}]
        _write_csv(os.path.join(out_dir, RESULTS), COLUMNS, rows)


def merge_results(out_dir: str, sources: Sequence[str]) -> List[Dict[str, str]]:
    """One curve from several working folders, e.g. one per seed run side
    by side: ``out_dir`` gets their rows in one
    results.csv (``run_dir`` rewritten relative to it), summary.csv and
    learning_curve.png. The same (method, n, seed) in two sources is an
    error, not a silent choice between two trainings."""
    out_dir = os.path.abspath(out_dir)
    seen: Dict[tuple, str] = {}
    rows: List[Dict[str, str]] = []
    for src in sources:
        folder = os.path.abspath(src)
        got = read_results(folder)
        if not got:
            raise SpecError(f'{os.path.join(src, RESULTS)}: no results to merge')
        for r in got:
            key = _key(r['method'], r['n_hf'], r['seed'])
            if key in seen:
                raise SpecError(
                    f'run {r["method"]} n={r["n_hf"]} seed={r["seed"]} is in '
                    f'both {seen[key]} and {src}: merge one of them'
                )
            seen[key] = src
            r = dict(r)
            if r.get('run_dir'):
                r['run_dir'] = os.path.relpath(
                    os.path.join(folder, r['run_dir']), out_dir
                )
            rows.append(r)
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, RESULTS), COLUMNS, rows)
    write_summary(out_dir)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f'{v:.6g}'
    return str(v)


def _key(method: str, n: int, seed: int):
    return (str(method), int(n), int(seed))


# ---- HF subsets -------------------------------------------------------------------
def _read_atoms(spec) -> List[Any]:
    import ase.io

    kwargs = {
        k: v
        for k, v in spec.reader.items()
        if k not in ('energy_key', 'force_key', 'stress_key')
    }
    index = kwargs.pop('index', ':')
    out = []
    for f in spec.files:
        out += list(ase.io.read(f, index=index, **kwargs))
    return out


def hf_pool(mi) -> List[tuple]:
    """[(database name, atoms)] of every HF structure, in database/file order."""
    from ..data.databases import parse_databases

    pool = []
    for spec in parse_databases(mi.hf_databases, mi.base_dir):
        pool += [(spec.name, a) for a in _read_atoms(spec)]
    return pool


def subset_size(size, pool_size: int) -> int:
    if isinstance(size, float):
        n = int(round(size * pool_size))
    else:
        n = int(size)
    if n > pool_size:
        raise SpecError(f'HF size {size} is larger than the HF pool ({pool_size})')
    return max(n, 1)


def draw_subset(pool_size: int, n: int, seed: int) -> List[int]:
    """Indices of the size-n HF subset of ``seed`` (sorted; nested in n)."""
    perm = np.random.default_rng(seed).permutation(pool_size)
    return sorted(int(i) for i in perm[:n])


def write_subset(
    mi, pool, indices: Sequence[int], out_dir: str
) -> Dict[str, List[str]]:
    """One extxyz per HF database holding its chosen structures."""
    from ..data.databases import write_extxyz

    os.makedirs(out_dir, exist_ok=True)
    by_db: Dict[str, List[Any]] = {db['name']: [] for db in mi.hf_databases}
    for i in indices:
        name, atoms = pool[i]
        by_db[name].append(atoms)
    files = {}
    for name, frames in by_db.items():
        path = os.path.join(out_dir, f'{name}.extxyz')
        if frames:
            write_extxyz(path, frames)  # rewritten only if its content changes
            files[name] = [path]
        else:
            files[name] = []
    return files


def _subset_input(mi, files: Dict[str, List[str]]):
    """The method input with HF databases reading the subset (empty ones dropped)."""
    new = mi.with_hf_files({k: v or ['<none>'] for k, v in files.items()})
    dbs = [
        db for db in new.raw['data']['databases'] if db.get('files') != ['<none>']
    ]
    new.raw['data']['databases'] = dbs
    for db in dbs:
        if db.get('fidelity') == mi.hf_fidelity:
            db['reader'] = {
                k: v for k, v in (db.get('reader') or {}).items() if k != 'index'
            }
            if not db['reader']:
                db.pop('reader')
    return new


# ---- evaluation -------------------------------------------------------------------
def _bias(p) -> float:
    """Mean signed energy error (meV/atom) of predictions ``p``."""
    ref, pred = np.asarray(p.e_ref, float), np.asarray(p.e_pred, float)
    ok = np.isfinite(ref)
    return float(1000 * (pred[ok] - ref[ok]).mean()) if ok.any() else float('nan')


def lf_parts(run_dir: str, lf_fidelity: str):
    """The (checkpoint, fidelity) parts of a method run's LF head: the MF or
    fine-tuned model at ``lf_fidelity``, the LF part of a delta model; None
    for hf-only (no LF head)."""
    from .predict import read_parts

    parts, meta = read_parts(run_dir)
    method = meta.get('method')
    if method == 'hf-only':
        return None
    if method == 'delta':  # the LF stage's own model, not a scaled copy of it
        d = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
        lf = next(st for st in meta['stages'] if st['name'] == 'lf')
        return [(os.path.normpath(os.path.join(d, lf['checkpoint'])), parts[0][1])]
    return [(parts[0][0], lf_fidelity)]


def convergence(run_dir: str):
    """(epochs trained, best epoch) of a run's last stage."""
    from ..checkpoint import Checkpoint
    from ..metrics import FidelityMetrics
    from .predict import read_parts

    parts, _ = read_parts(run_dir)
    ckpt = parts[-1][0]
    metrics = os.path.join(os.path.dirname(ckpt), 'metrics.csv')
    epochs = max(int(r['epoch']) for r in FidelityMetrics.read_csv(metrics))
    return epochs, Checkpoint(ckpt).epoch


def evaluate_run(
    run_dir: str,
    test_files: Sequence[str],
    fidelity: Optional[str],
    mixing: Optional[Dict[str, Any]] = None,
    lf_test: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    from ..evaluate import error_summary, parity_plot
    from .hull import mixing_report
    from .predict import MethodModel

    model = MethodModel.load(run_dir, fidelity)
    frames, p = model.predict_files(test_files)
    err = error_summary(p)
    parity_plot(
        p,
        os.path.join(run_dir, 'parity_test.png'),
        title=f'{os.path.relpath(run_dir, os.path.dirname(os.path.dirname(run_dir)))}'
        f' on {", ".join(os.path.basename(f) for f in test_files)}',
    )
    row = {
        'energy_mae': err['energy MAE (meV/atom)'],
        'energy_rmse': err['energy RMSE (meV/atom)'],
        'energy_bias': _bias(p),
        'force_mae': err['force MAE (meV/Å)'],
        'force_rmse': err['force RMSE (meV/Å)'],
        'stress_mae': err['stress MAE (GPa)'],
    }
    row['epochs'], row['best_epoch'] = convergence(run_dir)
    if lf_test:
        parts = lf_parts(run_dir, lf_test['fidelity'])
        if parts is not None:
            _, lp = MethodModel(parts).predict_files(lf_test['files'])
            lerr = error_summary(lp)
            row.update(
                {
                    'lf_energy_mae': lerr['energy MAE (meV/atom)'],
                    'lf_energy_bias': _bias(lp),
                    'lf_force_mae': lerr['force MAE (meV/Å)'],
                }
            )
    if mixing:
        m = mixing_report(
            model,
            test_files,
            mixing['end_members'],
            mixing.get('terminals', ('GaN', 'InN')),
            mixing.get('choice', 'lowest'),
            output=os.path.join(run_dir, 'mixing_test.csv'),
        )
        row.update(
            {
                'mixing_mae': m['mixing_mae_meV_atom'],
                'mixing_rmse': m['mixing_rmse_meV_atom'],
                'mixing_r2': m['mixing_r2'],
            }
        )
    return row


# ---- the curve --------------------------------------------------------------------
def run_learning_curve(
    spec_path: str,
    out_dir: str,
    screen: bool = False,
    log: Callable[[str], None] = print,
    only: Optional[Dict[str, Any]] = None,
    methods: Optional[Sequence[str]] = None,
    hf_sizes: Optional[Sequence[Any]] = None,
    seeds: Optional[Sequence[int]] = None,
    epochs: Optional[int] = None,
) -> List[Dict[str, str]]:
    """Run (or continue) a learning curve; ``methods`` / ``hf_sizes`` /
    ``seeds`` replace the spec's lists (e.g. a reduced grid first, the rest
    later into the same folder), ``epochs`` its epochs; ``only`` = {'method', 'n_hf', 'seed'} runs a
    single point."""
    spec = read_spec(spec_path)
    for key, value in (
        ('methods', methods),
        ('hf_sizes', hf_sizes),
        ('seeds', seeds),
    ):
        if value:
            spec[key] = list(value)
    if epochs is not None:
        spec['epochs'] = int(epochs)
    for m in spec['methods']:
        if m not in METHODS:
            raise SpecError(f'unknown method {m!r} ({", ".join(METHODS)})')
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'spec.yaml'), 'w') as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    mi = read_method_input(spec['input'])
    if spec.get('epochs') is not None:
        mi.raw['train']['epoch'] = int(spec['epochs'])
    if not mi.hf_fidelity:
        raise MethodError(
            f'{spec["input"]}: set train.hf_fidelity (or best_fidelity)'
        )
    test_fid = spec['test'].get('fidelity') or mi.hf_fidelity
    _check_no_test_in_training(mi, spec)
    pool = hf_pool(mi)
    sizes = [subset_size(s, len(pool)) for s in spec['hf_sizes']]
    done = {_key(r['method'], r['n_hf'], r['seed']) for r in read_results(out_dir)}
    plan = [(m, n, s) for s in spec['seeds'] for n in sizes for m in spec['methods']]
    if only:
        plan = [
            (m, n, s)
            for m, n, s in plan
            if all(
                v is None or v == x
                for v, x in zip(
                    (only.get('method'), only.get('n_hf'), only.get('seed')),
                    (m, n, s),
                )
            )
        ]
    log(
        f'learning curve: {len(plan)} runs ({len(spec["methods"])} methods x '
        f'{len(sizes)} sizes {sizes} x {len(spec["seeds"])} seeds), HF pool '
        f'{len(pool)}, {sum(_key(*p) in done for p in plan)} already done'
    )
    for i, (method, n, seed) in enumerate(plan, 1):
        if _key(method, n, seed) in done:
            log(
                f'[{i}/{len(plan)}] {method} n={n} seed={seed}: done before, skipped'
            )
            continue
        log(f'[{i}/{len(plan)}] {method} n={n} seed={seed}')
        idx = draw_subset(len(pool), n, seed)
        files = write_subset(
            mi, pool, idx, os.path.join(out_dir, 'subsets', f's{seed}_n{n}')
        )
        run_mi = _subset_input(mi, files)
        run_mi.raw['train']['random_seed'] = int(seed)
        run_dir = os.path.join(out_dir, 'runs', method, f'n{n}_s{seed}')
        t0 = time.time()
        result = run_method(
            run_mi,
            method,
            run_dir,
            resume=True,
            screen=screen,
            shared_dir=os.path.join(out_dir, 'shared'),
            graph_cache=os.path.join(out_dir, 'graph_cache'),
            log=log,
        )
        t1 = time.time()
        row = evaluate_run(
            run_dir,
            spec['test']['files'],
            test_fid,
            spec.get('mixing'),
            spec.get('lf_test'),
        )
        row.update(
            {
                'method': method,
                'n_hf': n,
                'seed': seed,
                'n_hf_pool': len(pool),
                'train_seconds': result.seconds_now,
                'stage_seconds': result.seconds_total,
                'eval_seconds': time.time() - t1,
                'run_dir': os.path.relpath(run_dir, out_dir),
            }
        )
        append_result(out_dir, row)
        done.add(_key(method, n, seed))
        log(
            f'    energy MAE {row["energy_mae"]:.2f} meV/atom, force MAE '
            f'{row["force_mae"]:.1f} meV/Å'
            + (
                f', mixing MAE {row["mixing_mae"]:.2f} meV/atom R2 {row["mixing_r2"]:.3f}'
                if 'mixing_mae' in row
                else ''
            )
            + f' ({t1 - t0:.0f} s)'
        )
        write_summary(out_dir)
    rows = read_results(out_dir)
    write_summary(out_dir)
    return rows


def _check_no_test_in_training(mi, spec) -> None:
    from ..data.databases import parse_databases

    test = {
        os.path.realpath(f)
        for f in spec['test']['files'] + (spec.get('lf_test') or {}).get('files', [])
    }
    train_files = set()
    for s in parse_databases(mi.databases, mi.base_dir):
        train_files.update(os.path.realpath(f) for f in s.files)
        train_files.update(
            os.path.realpath(f) for f in (s.validation or {}).get('files', [])
        )
    train_files.update(os.path.realpath(f) for f in mi.paired_files())
    both = sorted(test & train_files)
    if both:
        raise SpecError(f'{both[0]} is both a test file and a training file')


# ---- summary and plot -------------------------------------------------------------
def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float('nan')


def summarize(rows: Sequence[Dict[str, str]]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[Dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r['method'], int(r['n_hf'])), []).append(r)
    out = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (method, n), rs in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][0], kv[0][1])
    ):
        row: Dict[str, Any] = {'method': method, 'n_hf': n, 'n_seeds': len(rs)}
        for m in METRICS + ['train_seconds', 'stage_seconds']:
            v = np.array([_float(r.get(m)) for r in rs])
            v = v[np.isfinite(v)]
            if v.size:
                row.update(
                    {
                        f'{m}_mean': v.mean(),
                        # sample sd: three seeds are a sample of the seeds
                        f'{m}_std': v.std(ddof=1) if v.size > 1 else 0.0,
                        f'{m}_min': v.min(),
                        f'{m}_max': v.max(),
                    }
                )
        out.append(row)
    return out


def write_summary(out_dir: str) -> Optional[str]:
    rows = read_results(out_dir)
    if not rows:
        return None
    summ = summarize(rows)
    cols = ['method', 'n_hf', 'n_seeds']
    for m in METRICS + ['train_seconds', 'stage_seconds']:
        cols += [f'{m}_{s}' for s in ('mean', 'std', 'min', 'max')]
    _write_csv(
        os.path.join(out_dir, SUMMARY),
        cols,
        [{k: _fmt(v) for k, v in r.items()} for r in summ],
    )
    return plot_curve(summ, os.path.join(out_dir, PLOT))


def plot_curve(summary: Sequence[Dict[str, Any]], path: str, title: str = '') -> str:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = [
        ('energy_mae', 'HF test energy MAE (meV/atom)'),
        ('force_mae', 'HF test force MAE (meV/Å)'),
        ('mixing_mae', 'mixing energy MAE (meV/atom)'),
        ('lf_energy_mae', 'LF head energy MAE, same structures (meV/atom)'),
    ]
    panels = [p for p in panels if any(f'{p[0]}_mean' in r for r in summary)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4))
    axes = np.atleast_1d(axes)
    methods = []
    for r in summary:
        if r['method'] not in methods:
            methods.append(r['method'])
    for ax, (metric, label) in zip(axes, panels):
        for j, m in enumerate(methods):
            rs = sorted(
                (r for r in summary if r['method'] == m and f'{metric}_mean' in r),
                key=lambda r: r['n_hf'],
            )
            if not rs:
                continue
            n = np.array([r['n_hf'] for r in rs], float)
            mean = np.array([r[f'{metric}_mean'] for r in rs])
            std = np.array([r[f'{metric}_std'] for r in rs])
            lo = np.array([r[f'{metric}_min'] for r in rs])
            hi = np.array([r[f'{metric}_max'] for r in rs])
            color = f'C{j}'
            ax.errorbar(
                n, mean, yerr=std, marker='o', ms=4, capsize=3, color=color, label=m
            )
            ax.fill_between(n, lo, hi, color=color, alpha=0.15, lw=0)
        ax.set_xscale('log')
        sizes = sorted({r['n_hf'] for r in summary})
        ax.set_xticks(sizes)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
        ax.xaxis.set_minor_formatter(NullFormatter())
        readable_error_axis(ax)
        ax.set_xlabel('number of HF structures')
        ax.set_ylabel(label)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        title or 'mean ± std over seeds (bars), min-max (band)', fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the title
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def readable_error_axis(ax) -> None:
    """Errors on a log axis when they span a factor of 4 or more, else on a
    linear one: a log axis over a narrower range (e.g. 1.2-1.8) has no
    labelled tick at all."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.dataLim.intervaly  # the data's, not the padded view's
    if lo <= 0 or hi / lo < 4:
        return
    ax.set_yscale('log')
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f'{v:g}' if f'{v:g}'[0] in '235' else '')
    )


def markdown_table(out_dir: str) -> str:
    """The summary as a Markdown table (mean ± std over seeds, [min, max])."""
    summ = summarize(read_results(out_dir))
    cols = [
        m
        for m in (
            'energy_mae',
            'energy_bias',
            'force_mae',
            'lf_energy_mae',
            'lf_force_mae',
            'mixing_mae',
            'mixing_r2',
            'epochs',
        )
        if any(f'{m}_mean' in r for r in summ)
    ]
    head = (
        ['method', 'HF structures', 'seeds']
        + [
            f'{m.replace("_", " ")} ({UNITS[m]})'
            if UNITS[m]
            else m.replace('_', ' ')
            for m in cols
        ]
        + ['train s/run']
    )
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in summ:
        cells = [r['method'], str(r['n_hf']), str(r['n_seeds'])]
        for m in cols:
            if f'{m}_mean' not in r:
                cells.append('-')
                continue
            digits = {'mixing_r2': 3, 'epochs': 0}.get(m, 1)
            sign = '+' if m.endswith('bias') else ''
            cells.append(
                f'{r[f"{m}_mean"]:{sign}.{digits}f} ± {r[f"{m}_std"]:.{digits}f}'
            )
        cells.append(f'{r.get("stage_seconds_mean", float("nan")):.0f}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
