"""Cut the bundled quickstart dataset out of the shared InGaN data.

A small, real (GPAW PBE / r2SCAN) slice: PBE over all compositions, r2SCAN at
the end members only, as in the paper's InGaN experiment. Deterministic.

    python scripts/make_quickstart_data.py [--shared ../shared] [-o input_templates/quickstart_data]
"""

import argparse
import os

import numpy as np
from ase.io import read, write


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--shared', default=os.path.join(here, '..', '..', 'shared'))
    p.add_argument(
        '-o',
        '--out',
        default=os.path.join(here, '..', 'input_templates', 'quickstart_data'),
    )
    p.add_argument('--n-pbe', type=int, default=48)
    p.add_argument('--n-r2scan', type=int, default=16)
    p.add_argument('--n-test', type=int, default=8)
    args = p.parse_args()
    src = os.path.join(args.shared, 'data', 'ingan')
    rng = np.random.default_rng(7)
    os.makedirs(args.out, exist_ok=True)
    for fname, n, out in (
        ('lf_train_pbe.extxyz', args.n_pbe, 'pbe.extxyz'),
        ('hf_train_r2scan.extxyz', args.n_r2scan, 'r2scan.extxyz'),
        ('hf_test_dev_r2scan.extxyz', args.n_test, 'r2scan_test_x0.5.extxyz'),
    ):
        frames = read(os.path.join(src, fname), index=':')
        pick = sorted(
            rng.choice(len(frames), size=min(n, len(frames)), replace=False)
        )
        write(
            os.path.join(args.out, out), [frames[i] for i in pick], format='extxyz'
        )
        print(f'{out}: {len(pick)} structures from {fname}')


if __name__ == '__main__':
    main()
