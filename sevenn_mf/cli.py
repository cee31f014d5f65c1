"""``sevenn_mf`` command line: each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional


def _train(args) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.input)
    if args.epochs is not None:
        import sevenn._keys as KEY

        config[KEY.EPOCH] = args.epochs
    best = train(config, args.working_dir, resume=args.resume, screen=not args.quiet)
    print(f'checkpoint: {best}')
    return 0


def _info(args) -> int:
    from .checkpoint import Checkpoint

    print(Checkpoint(args.checkpoint).info())
    return 0


def _fidelities(args) -> int:
    from .checkpoint import list_fidelities

    names = list_fidelities(args.checkpoint)
    print('\n'.join(names) if names else '(single-fidelity model)')
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate

    summary = evaluate(args.checkpoint, args.files, fidelity=args.fidelity,
                       out_dir=args.output, batch_size=args.batch_size)
    print(summary.to_text())
    return 0


def _deploy(args) -> int:
    from .deploy import deploy

    for path in deploy(args.checkpoint, fidelity=args.fidelity, output=args.output,
                       parallel=args.parallel, all_fidelities=args.all_fidelities):
        print(path)
    return 0


def _export(args) -> int:
    from .deploy import export

    print(export(args.checkpoint, fidelity=args.fidelity, output=args.output,
                 native=args.native))
    return 0


def _convert(args) -> int:
    from .convert import convert_cli

    print(convert_cli(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='sevenn_mf',
        description='Multi-fidelity training for SevenNet. A CHECKPOINT is a '
        'sevenn_mf or sevenn checkpoint file or a pretrained name (7net-0, 7net-mf-0).')
    sub = p.add_subparsers(dest='command', required=True)

    t = sub.add_parser('train', help='train from a YAML input')
    t.add_argument('input', help='YAML with model/train/data sections')
    t.add_argument('-w', '--working-dir', default='.', help='output folder')
    t.add_argument('--resume', action='store_true',
                   help='continue a killed run from checkpoint_last.pth')
    t.add_argument('--epochs', type=int, help='override train.epoch')
    t.add_argument('-q', '--quiet', action='store_true', help='log to file only')
    t.set_defaults(func=_train)

    i = sub.add_parser('info', help='fidelities, species, cutoff, parameters')
    i.add_argument('checkpoint')
    i.set_defaults(func=_info)

    f = sub.add_parser('fidelities', help='list the fidelity names of a checkpoint')
    f.add_argument('checkpoint')
    f.set_defaults(func=_fidelities)

    e = sub.add_parser('evaluate', help='errors against labelled structures')
    e.add_argument('checkpoint')
    e.add_argument('files', nargs='+', help='structure files (anything ase.io reads)')
    e.add_argument('--fidelity', help='fidelity to evaluate (required if several)')
    e.add_argument('-o', '--output', default='evaluation', help='output folder')
    e.add_argument('--batch-size', type=int, default=8)
    e.set_defaults(func=_evaluate)

    d = sub.add_parser('deploy', help='TorchScript for LAMMPS pair_style e3gnn')
    d.add_argument('checkpoint')
    d.add_argument('--fidelity')
    d.add_argument('--all-fidelities', action='store_true',
                   help='one file (or folder) per fidelity')
    d.add_argument('--parallel', action='store_true', help='for e3gnn/parallel')
    d.add_argument('-o', '--output', help='output file (folder with --parallel)')
    d.set_defaults(func=_deploy)

    x = sub.add_parser('export', help='a plain sevenn checkpoint of one fidelity')
    x.add_argument('checkpoint')
    x.add_argument('--fidelity')
    x.add_argument('--native', action='store_true',
                   help="sevenn's native multi-modal format (onehot models)")
    x.add_argument('-o', '--output', required=True)
    x.set_defaults(func=_export)

    c = sub.add_parser('convert', help='add / rename / drop fidelities, change mode')
    c.add_argument('source')
    c.add_argument('-o', '--output', required=True)
    c.add_argument('--source-fidelity', help='name for the fidelity of a '
                   'single-fidelity source (e.g. pbe)')
    c.add_argument('--add', action='append', default=[], metavar='NEW[=FROM]',
                   help='add fidelity NEW initialised from FROM (repeatable)')
    c.add_argument('--rename', action='append', default=[], metavar='OLD=NEW')
    c.add_argument('--drop', action='append', default=[], metavar='NAME')
    c.add_argument('--mode', choices=['onehot', 'indexed'])
    c.set_defaults(func=_convert)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings('ignore', message='.*TP accelerator.*')
    warnings.filterwarnings('ignore', message='.*Weights only load failed.*')
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        if os.environ.get('SEVENN_MF_DEBUG'):
            raise
        print(f'sevenn_mf {args.command}: error: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
