"""``sevenn_mf`` command line: each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional


def _train(args) -> int:
    from .analysis.methods import train_cli, yaml_has_method
    from .config import load_config
    from .train import train

    if args.method or yaml_has_method(args.input):  # baselines / MF (issue 6)
        result = train_cli(
            args.input,
            args.working_dir,
            method=args.method,
            resume=args.resume,
            screen=not args.quiet,
            epochs=args.epochs,
        )
        for ckpt, fid in result.parts:
            print(f'checkpoint: {ckpt} (fidelity {fid})')
        print(f'model: {os.path.join(result.directory, "model.json")}')
        return 0
    config = load_config(args.input)
    from ._sevenn import KEY

    if args.epochs is not None:
        config[KEY.EPOCH] = args.epochs
    if args.distributed:  # also on by itself under torchrun with WORLD_SIZE > 1
        config[KEY.IS_DDP] = True
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

    summary = evaluate(
        args.checkpoint,
        args.files,
        fidelity=args.fidelity,
        out_dir=args.output,
        batch_size=args.batch_size,
    )
    print(summary.to_text())
    return 0


def _deploy(args) -> int:
    from .deploy import deploy

    for path in deploy(
        args.checkpoint,
        fidelity=args.fidelity,
        output=args.output,
        parallel=args.parallel,
        all_fidelities=args.all_fidelities,
    ):
        print(path)
    return 0


def _export(args) -> int:
    from .deploy import export

    print(
        export(
            args.checkpoint,
            fidelity=args.fidelity,
            output=args.output,
            native=args.native,
        )
    )
    return 0


def _convert(args) -> int:
    from .convert import convert_cli

    print(convert_cli(args))
    return 0


def _learning_curve(args) -> int:
    from .analysis.learning_curve import run_learning_curve

    if args.table:
        from .analysis.learning_curve import markdown_table

        print(markdown_table(args.working_dir))
        return 0
    sizes = [float(x) if '.' in x else int(x) for x in args.sizes or []]
    rows = run_learning_curve(
        args.spec,
        args.working_dir,
        screen=args.verbose,
        methods=args.methods,
        hf_sizes=sizes,
        seeds=args.seeds,
        epochs=args.epochs,
    )
    print(
        f'{len(rows)} runs in {os.path.join(args.working_dir, "results.csv")}; '
        f'plot: {os.path.join(args.working_dir, "learning_curve.png")}'
    )
    return 0


def _print_summary(summary) -> None:
    import json

    print(json.dumps(summary, indent=1, default=str))


def _hull(args) -> int:
    from .analysis.hull import hull_report
    from .analysis.predict import MethodModel

    model = MethodModel.load(args.model, args.fidelity)
    _print_summary(
        hull_report(
            model,
            args.structures,
            args.phases or [],
            terminals=args.terminals,
            output=args.output,
        )
    )
    return 0


def _mixing(args) -> int:
    from .analysis.hull import mixing_report
    from .analysis.predict import MethodModel

    model = MethodModel.load(args.model, args.fidelity)
    _print_summary(
        mixing_report(
            model,
            args.structures,
            args.end_members,
            end_members=args.terminals,
            choice=args.choice,
            output=args.output,
        )
    )
    return 0


def _parity(args) -> int:
    from .analysis.parity import parity_report, parse_data_args

    for fid, r in parity_report(
        args.model, parse_data_args(args.data), args.output
    ).items():
        e = r['errors']
        print(
            f'{fid}: {r["n_structures"]} structures, energy MAE '
            f'{e["energy MAE (meV/atom)"]:.3f} meV/atom, force MAE '
            f'{e["force MAE (meV/Å)"]:.3f} meV/Å, stress MAE '
            f'{e["stress MAE (GPa)"]:.4f} GPa -> {r["plot"]}'
        )
    return 0


def _deploy_sum(args) -> int:
    from .analysis.delta import deploy_sum
    from .analysis.predict import read_parts

    if args.model:
        parts, _ = read_parts(args.model)
    else:
        parts = []
        for p in args.part:
            ckpt, _, fid = p.partition('@')
            parts.append((ckpt, fid or None))
    if not parts:
        raise ValueError(
            'give a method run (folder or model.json) or --part CKPT@FIDELITY'
        )
    print(deploy_sum(parts, args.output))
    return 0


def _add_analysis_parsers(sub) -> None:
    """Subcommands of the paper's experiments (issue 6)."""
    lc = sub.add_parser(
        'learning-curve',
        help='methods x HF-set sizes x seeds '
        '(resumable): results.csv, summary.csv, learning_curve.png',
    )
    lc.add_argument(
        'spec', help='learning-curve YAML (see sevenn_mf.analysis.learning_curve)'
    )
    lc.add_argument('-w', '--working-dir', default='learning_curve')
    lc.add_argument(
        '-v', '--verbose', action='store_true', help='training logs on screen'
    )
    lc.add_argument('--methods', nargs='+', help="replace the spec's methods")
    lc.add_argument(
        '--sizes',
        nargs='+',
        help="replace the spec's hf_sizes (int: count, with a dot: fraction)",
    )
    lc.add_argument('--seeds', nargs='+', type=int, help="replace the spec's seeds")
    lc.add_argument('--epochs', type=int, help="replace the spec's epochs")
    lc.add_argument(
        '--table',
        action='store_true',
        help='print the results so far as a Markdown table; run nothing',
    )
    lc.set_defaults(func=_learning_curve)

    model_help = (
        'checkpoint (with --fidelity) or a sevenn_mf train --method run '
        '(folder or model.json)'
    )
    h = sub.add_parser('hull', help='energies above the convex hull (pymatgen)')
    h.add_argument('model', help=model_help)
    h.add_argument('--fidelity')
    h.add_argument('--structures', nargs='+', required=True)
    h.add_argument('--phases', nargs='*', help='competing phases')
    h.add_argument(
        '--terminals',
        nargs='+',
        metavar='FORMULA',
        help='end members of a compound phase diagram (e.g. GaN InN) '
        'when there are no elemental entries',
    )
    h.add_argument('-o', '--output', help='per-structure CSV')
    h.set_defaults(func=_hull)

    m = sub.add_parser('mixing', help='mixing energies vs end members (e.g. InGaN)')
    m.add_argument('model', help=model_help)
    m.add_argument('--fidelity')
    m.add_argument('--structures', nargs='+', required=True)
    m.add_argument(
        '--end-members',
        nargs='+',
        required=True,
        help='files holding end-member structures (e.g. x = 0 and 1)',
    )
    m.add_argument(
        '--terminals', nargs='+', default=['GaN', 'InN'], metavar='FORMULA'
    )
    m.add_argument(
        '--choice',
        choices=['lowest', 'mean'],
        default='lowest',
        help='end-member energy: lowest-reference-energy structure, or mean',
    )
    m.add_argument('-o', '--output', help='per-structure CSV')
    m.set_defaults(func=_mixing)

    pp = sub.add_parser(
        'parity', help='parity plots (energy, force, stress) per fidelity'
    )
    pp.add_argument('model', help=model_help)
    pp.add_argument(
        '--data',
        action='append',
        required=True,
        metavar='FIDELITY=FILE[,FILE]',
        help='repeat for each fidelity',
    )
    pp.add_argument('-o', '--output', default='parity')
    pp.set_defaults(func=_parity)

    ds = sub.add_parser(
        'deploy-sum',
        help='one pair_style e3gnn file = sum of '
        'models (a delta run: LF model + delta model)',
    )
    ds.add_argument(
        'model', nargs='?', help='a --method delta run (folder or model.json)'
    )
    ds.add_argument('--part', action='append', default=[], metavar='CKPT@FIDELITY')
    ds.add_argument('-o', '--output', required=True)
    ds.set_defaults(func=_deploy_sum)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='sevenn_mf',
        description='Multi-fidelity training for SevenNet. A CHECKPOINT is a '
        'sevenn_mf or sevenn checkpoint file or a pretrained name (7net-0, 7net-mf-0).',
    )
    sub = p.add_subparsers(dest='command', required=True)

    t = sub.add_parser('train', help='train from a YAML input')
    t.add_argument('input', help='YAML with model/train/data sections')
    t.add_argument('-w', '--working-dir', default='.', help='output folder')
    t.add_argument(
        '--resume',
        action='store_true',
        help='continue a killed run from checkpoint_last.pth',
    )
    t.add_argument('--epochs', type=int, help='override train.epoch')
    t.add_argument('-q', '--quiet', action='store_true', help='log to file only')
    t.add_argument(
        '--method',
        choices=['hf-only', 'transfer', 'delta', 'mf', 'mf-onehot', 'mf-indexed'],
        help='baseline or multi-fidelity training from the same YAML '
        '(default: train.method; see sevenn_mf.analysis.methods)',
    )
    t.add_argument(
        '--distributed',
        action='store_true',
        help='data-parallel training under torchrun (gloo on CPU, nccl on '
        'GPU); automatic when torchrun starts more than one process',
    )
    t.set_defaults(func=_train)

    i = sub.add_parser('info', help='fidelities, species, cutoff, parameters')
    i.add_argument('checkpoint')
    i.set_defaults(func=_info)

    f = sub.add_parser('fidelities', help='list the fidelity names of a checkpoint')
    f.add_argument('checkpoint')
    f.set_defaults(func=_fidelities)

    e = sub.add_parser('evaluate', help='errors against labelled structures')
    e.add_argument('checkpoint')
    e.add_argument(
        'files', nargs='+', help='structure files (anything ase.io reads)'
    )
    e.add_argument('--fidelity', help='fidelity to evaluate (required if several)')
    e.add_argument('-o', '--output', default='evaluation', help='output folder')
    e.add_argument('--batch-size', type=int, default=8)
    e.set_defaults(func=_evaluate)

    d = sub.add_parser('deploy', help='TorchScript for LAMMPS pair_style e3gnn')
    d.add_argument('checkpoint')
    d.add_argument('--fidelity')
    d.add_argument(
        '--all-fidelities',
        action='store_true',
        help='one file (or folder) per fidelity',
    )
    d.add_argument('--parallel', action='store_true', help='for e3gnn/parallel')
    d.add_argument('-o', '--output', help='output file (folder with --parallel)')
    d.set_defaults(func=_deploy)

    x = sub.add_parser('export', help='a plain sevenn checkpoint of one fidelity')
    x.add_argument('checkpoint')
    x.add_argument('--fidelity')
    x.add_argument(
        '--native',
        action='store_true',
        help="sevenn's native multi-modal format (onehot models)",
    )
    x.add_argument('-o', '--output', required=True)
    x.set_defaults(func=_export)

    c = sub.add_parser(
        'convert',
        help='add / rename / drop fidelities, change mode',
        description='Convert a checkpoint into a sevenn_mf model: kept fidelities '
        'compute exactly what they computed before, added ones start as copies.',
        epilog='examples:\n'
        '  sevenn_mf convert 7net-0 -o ft.pth --source-fidelity pbe --add r2scan=pbe\n'
        '  sevenn_mf convert 7net-mf-0 -o mf.pth --add hse=PBE --rename R2SCAN=r2scan '
        '--drop PBE --mode indexed',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        'source',
        help='checkpoint file (sevenn_mf, sevenn native '
        'multi-modal or plain sevenn) or pretrained name (7net-0, '
        '7net-mf-0, ...)',
    )
    c.add_argument('-o', '--output', required=True, help='checkpoint to write')
    c.add_argument(
        '--source-fidelity',
        help='name for the fidelity of a '
        'single-fidelity source (e.g. pbe); for a multi-fidelity source, '
        'the FROM of an --add without one',
    )
    c.add_argument(
        '--add',
        action='append',
        default=[],
        metavar='NEW[=FROM]',
        help='add fidelity NEW initialised from FROM (repeatable)',
    )
    c.add_argument(
        '--rename',
        action='append',
        default=[],
        metavar='OLD=NEW',
        help='rename a fidelity (repeatable)',
    )
    c.add_argument(
        '--drop',
        action='append',
        default=[],
        metavar='NAME',
        help='drop a fidelity (repeatable)',
    )
    c.add_argument(
        '--mode',
        choices=['onehot', 'indexed'],
        help="fidelity layer mode of the result (default: the source's; "
        'onehot for a single-fidelity source)',
    )
    c.set_defaults(func=_convert)

    _add_analysis_parsers(sub)
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
