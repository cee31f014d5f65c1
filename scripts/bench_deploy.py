"""Deployed single-fidelity inference in LAMMPS: sevenn_mf's folded model vs a
plain SevenNet model of the same architecture, timed interleaved in one run.

    python scripts/bench_deploy.py [--steps 20] [--rounds 3] [--lmp PATH]

Both are SevenNet-0-sized (5 layers, lmax 2, 128x0e+64x1e+32x2e). The
multi-fidelity model (2 fidelities, onehot and indexed) is deployed with
``sevenn_mf deploy``; the plain one with sevenn's own ``deploy``. Target
(issues #4, #7): ratio <= 1.02.
"""

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'tests'))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--lmp')
    args = p.parse_args()

    from _bench_models import multi_fidelity_config, sevennet0_config
    from ase.io import read, write
    from lammps_utils import find_lmp
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.scripts.deploy import deploy as sevenn_deploy

    import sevenn_mf  # noqa: F401  (hooks)
    from sevenn_mf.checkpoint import save_checkpoint
    from sevenn_mf.deploy import deploy
    from sevenn_mf.model import build_model

    lmp = args.lmp or find_lmp('serial')
    if lmp is None:
        sys.exit('no LAMMPS with e3gnn: run bash scripts/build_lammps.sh')
    tmp = tempfile.mkdtemp(prefix='bench_deploy_')
    base = sevennet0_config()
    fids = ['pbe', 'r2scan']
    models = {}
    plain_cp = os.path.join(tmp, 'plain.pth')
    save_checkpoint(plain_cp, build_E3_equivariant_model(copy.deepcopy(base)), base)
    sevenn_deploy(plain_cp, fname=os.path.join(tmp, 'plain.pt'))
    models['plain sevenn'] = os.path.join(tmp, 'plain.pt')
    for mode in ('onehot', 'indexed'):
        cfg = multi_fidelity_config(base, mode, fids)
        path = os.path.join(tmp, f'{mode}.pth')
        save_checkpoint(path, build_model(cfg), cfg)
        (pt,) = deploy(
            path, fidelity='r2scan', output=os.path.join(tmp, f'{mode}.pt')
        )
        models[f'sevenn_mf {mode}'] = pt

    atoms = read(
        os.path.join(HERE, '..', 'input_templates', 'quickstart_data', 'pbe.extxyz'),
        index=0,
    ).repeat((2, 2, 2))
    data = os.path.join(tmp, 'data.lmp')
    write(
        data, atoms, format='lammps-data', specorder=['Ga', 'In', 'N'], masses=True
    )

    def run(pt):
        text = f"""units metal
atom_style atomic
boundary p p p
read_data {data}
pair_style e3gnn
pair_coeff * * {pt} Ga In N
velocity all create 300.0 1 mom yes
fix nve all nve
timestep 0.001
thermo {args.steps}
run {args.steps}
"""
        with open(os.path.join(tmp, 'in.lmp'), 'w') as f:
            f.write(text)
        env = dict(
            os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1')
        )
        t0 = time.perf_counter()
        out = subprocess.run(
            [lmp, '-in', 'in.lmp', '-log', 'log.lammps'],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        wall = time.perf_counter() - t0
        loop = float(re.search(r'Loop time of ([\d.eE+-]+)', out).group(1))
        return loop, wall

    loops = {k: [] for k in models}
    for pt in models.values():  # warm-up (file cache, JIT profiling)
        run(pt)
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            loops[name].append(run(models[name])[0])
    ref = statistics.median(loops['plain sevenn'])
    print(
        f'LAMMPS e3gnn, {len(atoms)} atoms, {args.steps} MD steps, '
        f'median of {args.rounds} (loop time)'
    )
    for name, ts in loops.items():
        med = statistics.median(ts)
        print(
            f'  {name:<20} {med / args.steps * 1000:8.1f} ms/step   ratio {med / ref:.3f}'
        )


if __name__ == '__main__':
    main()
