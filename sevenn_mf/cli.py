"""``sevenn_mf`` command line: each subcommand is a thin call into the library.

Errors reach the user as one line, ``sevenn_mf <command>: error: ...``, and
Python warnings as one line each, ``sevenn_mf: warning: ...`` (also into the
training log while one is open; with ``train -q`` only there).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

_OUTPUTS = 'log.sevenn_mf, metrics.csv, lc.csv, checkpoint_*.pth'


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _train(args) -> int:
    from .analysis.methods import read_method_input, run_method, yaml_has_method
    from .config import ConfigError, check_config, load_config
    from .train import train

    where = os.path.abspath(args.working_dir)
    if args.method or yaml_has_method(args.input):  # baselines / MF (issue 6)
        mi = read_method_input(args.input)
        print(f'outputs in {where} (one folder per stage, model.json)')
        result = run_method(
            mi,
            args.method,
            args.working_dir,
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
    try:  # train() checks again; here the error can name the file
        check_config(config, training=True)
    except ConfigError as exc:
        raise ConfigError(f'{os.path.abspath(args.input)}: {exc}') from None
    print(f'outputs in {where} ({_OUTPUTS})')
    best = train(config, args.working_dir, resume=args.resume, screen=not args.quiet)
    if not os.path.isfile(best):
        raise FileNotFoundError(f'training wrote no checkpoint in {where}')
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


def _check_deploy_output(args) -> None:
    """The combination of deploy's options, before any model is loaded."""
    if args.all_fidelities and args.fidelity:
        raise ValueError(
            '--fidelity and --all-fidelities exclude each other: give one '
            'fidelity, or --all-fidelities for one file (folder) per fidelity'
        )
    out = args.output
    if not out:
        return
    folder = args.parallel or args.all_fidelities
    if folder and out.endswith('.pt'):
        what = '--parallel' if args.parallel else '--all-fidelities'
        raise ValueError(f'-o {out}: with {what}, -o names a folder, not a .pt file')
    if not folder and not out.endswith('.pt'):
        raise ValueError(
            f'-o {out}: a pair_style e3gnn model is a TorchScript file: give a '
            'name ending in .pt (the file is written exactly as named)'
        )


def _deploy(args) -> int:
    from .deploy import deploy

    _check_deploy_output(args)
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

    if args.native and args.fidelity:
        raise ValueError(
            '--native exports every fidelity (sevenn multi-modal format): drop '
            '--fidelity, or drop --native for a plain model of one fidelity'
        )

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

    if args.merge:
        from .analysis.learning_curve import merge_results

        rows = merge_results(args.working_dir, args.merge)
        print(
            f'{len(rows)} runs from {len(args.merge)} folders in '
            f'{os.path.join(args.working_dir, "results.csv")}; '
            f'plot: {os.path.join(args.working_dir, "learning_curve.png")}'
        )
    if args.table:
        from .analysis.learning_curve import markdown_table

        print(markdown_table(args.working_dir))
    if args.table or args.merge:
        return 0
    if not args.spec:
        raise ValueError('give a learning-curve spec YAML (or --merge DIR ...)')
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
    if args.model and args.part:
        raise ValueError('give a method run or --part, not both')
    if not args.output.endswith('.pt'):
        raise ValueError(
            f'-o {args.output}: a pair_style e3gnn model is a TorchScript file: '
            'give a name ending in .pt'
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
        'spec',
        nargs='?',
        help='learning-curve YAML (see sevenn_mf.analysis.learning_curve)',
    )
    lc.add_argument(
        '-w',
        '--working-dir',
        default='learning_curve',
        help='output folder (default: ./learning_curve); a rerun into the same '
        'folder continues it',
    )
    lc.add_argument(
        '-v', '--verbose', action='store_true', help='training logs on screen'
    )
    lc.add_argument(
        '--methods', nargs='+', metavar='METHOD', help="replace the spec's methods"
    )
    lc.add_argument(
        '--sizes',
        nargs='+',
        metavar='N',
        help="replace the spec's hf_sizes (int: count, with a dot: fraction)",
    )
    lc.add_argument(
        '--seeds',
        nargs='+',
        type=int,
        metavar='SEED',
        help="replace the spec's seeds",
    )
    lc.add_argument(
        '--epochs', type=_positive_int, help="replace the spec's epochs (>= 1)"
    )
    lc.add_argument(
        '--table',
        action='store_true',
        help='print the results so far as a Markdown table; run nothing',
    )
    lc.add_argument(
        '--merge',
        nargs='+',
        metavar='DIR',
        help='merge the results.csv of these working folders (e.g. one per seed, '
        'run side by side) into -w, with its summary and plot; run nothing',
    )
    lc.set_defaults(func=_learning_curve)

    model_help = (
        'checkpoint (with --fidelity) or a sevenn_mf train --method run '
        '(folder or model.json)'
    )
    fidelity_help = (
        "fidelity to predict (a checkpoint's own name; a method run predicts "
        'its HF fidelity only)'
    )
    h = sub.add_parser('hull', help='energies above the convex hull (pymatgen)')
    h.add_argument('model', help=model_help)
    h.add_argument('--fidelity', help=fidelity_help)
    h.add_argument(
        '--structures',
        nargs='+',
        required=True,
        metavar='FILE',
        help='structure files whose energy above the hull is reported',
    )
    h.add_argument(
        '--phases',
        nargs='*',
        metavar='FILE',
        help='structure files of competing phases',
    )
    h.add_argument(
        '--terminals',
        nargs='+',
        metavar='FORMULA',
        help='end members of a compound phase diagram (e.g. GaN InN) '
        'when there are no elemental entries',
    )
    h.add_argument('-o', '--output', help='per-structure CSV (default: none)')
    h.set_defaults(func=_hull)

    m = sub.add_parser('mixing', help='mixing energies vs end members (e.g. InGaN)')
    m.add_argument('model', help=model_help)
    m.add_argument('--fidelity', help=fidelity_help)
    m.add_argument(
        '--structures',
        nargs='+',
        required=True,
        metavar='FILE',
        help='structure files whose mixing energy is reported',
    )
    m.add_argument(
        '--end-members',
        nargs='+',
        required=True,
        metavar='FILE',
        help='files holding end-member structures (e.g. x = 0 and 1)',
    )
    m.add_argument(
        '--terminals',
        nargs='+',
        default=['GaN', 'InN'],
        metavar='FORMULA',
        help='end-member formulas (default: GaN InN)',
    )
    m.add_argument(
        '--choice',
        choices=['lowest', 'mean'],
        default='lowest',
        help='end-member energy: lowest-reference-energy structure, or mean',
    )
    m.add_argument('-o', '--output', help='per-structure CSV (default: none)')
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
        help='labelled structures of a fidelity; repeat for each fidelity',
    )
    pp.add_argument(
        '-o',
        '--output',
        default='parity',
        help='output folder (default: ./parity): parity_<fidelity>.png, summary.csv',
    )
    pp.set_defaults(func=_parity)

    ds = sub.add_parser(
        'deploy-sum',
        help='one pair_style e3gnn file = sum of '
        'models (a delta run: LF model + delta model)',
    )
    ds.add_argument(
        'model', nargs='?', help='a --method delta run (folder or model.json)'
    )
    ds.add_argument(
        '--part',
        action='append',
        default=[],
        metavar='CKPT@FIDELITY',
        help='a model of the sum, instead of a run (repeatable; @FIDELITY '
        'for a multi-fidelity checkpoint)',
    )
    ds.add_argument(
        '-o', '--output', required=True, help='TorchScript file to write (.pt)'
    )
    ds.set_defaults(func=_deploy_sum)


_CHECKPOINT_HELP = 'checkpoint file or pretrained name (7net-0, 7net-mf-0, ...)'
_MODEL_HELP = (
    'checkpoint (with --fidelity), a sevenn_mf train --method run (folder or '
    'model.json, Delta sums too) or a pretrained name (7net-0)'
)


def _md_check(args) -> int:
    from ase.io import read

    from .analysis.md_check import MDSettings, md_check, summary_table
    from .analysis.predict import MethodModel

    s = MDSettings(
        temperature=args.temperature,
        steps=args.steps,
        timestep=args.timestep,
        friction=args.friction,
        seeds=tuple(args.seeds),
        nve_steps=args.nve_steps,
        min_distance=args.min_distance,
        max_force=args.max_force,
        max_drift=args.max_drift,
        gap_every=args.gap_every,
        write_every=args.write_every,
    )
    s.check()
    structures, labels = [], []
    for f in args.structures:
        frames = read(f, args.index)
        frames = frames if isinstance(frames, list) else [frames]
        stem = os.path.splitext(os.path.basename(f))[0]
        structures += frames
        labels += [f'{stem}_{i}' for i in range(len(frames))]
    if not structures:
        raise ValueError('md-check: no structures in ' + ', '.join(args.structures))
    model = MethodModel.load(args.model, args.fidelity)
    if args.lammps:
        return _md_check_lammps(args, model, structures, labels, s)

    def factory():
        calc = model.calculator()
        if hasattr(calc, 'gap'):
            calc.gap = calc.gap and not args.no_gap
        return calc

    trajs = md_check(factory, structures, s, args.output, labels=labels)
    print(summary_table(trajs, s))
    print(f'outputs: {os.path.abspath(args.output)} (summary.csv, md_check.png)')
    return 0


def _md_check_lammps(args, model, structures, labels, s) -> int:
    import tempfile

    from .analysis.delta import deploy_sum
    from .analysis.md_check import (
        lammps_trajectory,
        plot,
        summary_table,
        write_summary,
    )

    lmp = args.lammps
    if lmp == 'auto':
        import shutil

        lmp = os.environ.get('SEVENN_MF_LMP') or shutil.which('lmp')
        if not lmp:
            raise FileNotFoundError(
                'md-check --lammps: no lmp binary found (build one with '
                'bash scripts/build_lammps.sh --serial, then pass its path or set '
                'SEVENN_MF_LMP)'
            )
    os.makedirs(args.output, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        parts = [(cp.path, fid) for cp, fid, _ in model.parts]
        pt = deploy_sum(parts, os.path.join(tmp, 'model.pt'))
        trajs = [
            lammps_trajectory(pt, a, s, seed, label, args.output, lmp)
            for a, label in zip(structures, labels)
            for seed in s.seeds
        ]
    write_summary(trajs, s, args.output)
    plot(trajs, s, os.path.join(args.output, 'md_check.png'))
    print(summary_table(trajs, s))
    return 0


def _select(args) -> int:
    from .analysis.selection import (
        random_pick,
        read_candidates,
        report,
        score_candidates,
        select,
        write_chosen,
    )

    cands = read_candidates(args.files)
    if args.random:  # scored too, so that the two choices can be compared
        chosen = random_pick(cands, args.k, seed=args.seed)
        ranges = score_candidates(args.model, args.fidelity, chosen)
    else:
        ranges = score_candidates(args.model, args.fidelity, cands)
        chosen = select(
            cands,
            args.k,
            seed=args.seed,
            min_separation=args.min_separation,
            diversity=args.diversity,
        )
    print(report(chosen, ranges))
    print(write_chosen(chosen, args.output))
    return 0


def _compare(args) -> int:
    from .analysis.compare import compare, table

    labels = args.labels or [
        os.path.basename(os.path.normpath(m)) for m in args.models
    ]
    if len(labels) != len(args.models):
        raise ValueError('compare: give one --labels entry per model')
    rows = compare(
        list(zip(labels, args.models)), args.fidelity, args.files, args.output
    )
    print(table(rows))
    print(
        f'table and plot: {os.path.join(os.path.abspath(args.output), "compare.*")}'
    )
    return 0


def _add_stability_parsers(sub) -> None:
    """MD stability, choosing what to label next, side-by-side comparison."""
    md = sub.add_parser(
        'md-check',
        help='does a model stay stable in MD? (Langevin NVT + NVE, several seeds)',
        description='Langevin NVT from each structure with each seed, then NVE; '
        'each trajectory is stable or fails (collapse, force, temperature, atom '
        'left, non-finite, energy drift) at a time; for a multi-fidelity model '
        'the fidelity gap along it. Default: a short check (500 + 100 steps of '
        '0.5 fs, 2 seeds); raise --steps/--seeds for the long version.',
    )
    md.add_argument('model', help=_MODEL_HELP)
    md.add_argument('--fidelity', help='the head to run (multi-fidelity models)')
    md.add_argument(
        '--structures',
        nargs='+',
        required=True,
        help='starting structures (anything ase.io reads)',
    )
    md.add_argument(
        '--index',
        default=':',
        help="which frames of each file (ase index, default ':')",
    )
    md.add_argument('-T', '--temperature', type=float, required=True, help='K')
    md.add_argument('--steps', type=_positive_int, default=500, help='NVT steps')
    md.add_argument(
        '--nve-steps',
        type=int,
        default=100,
        help='NVE steps after NVT, for the energy drift (0: none)',
    )
    md.add_argument('--timestep', type=float, default=0.5, help='fs')
    md.add_argument(
        '--friction', type=float, default=0.01, help='Langevin friction (1/fs)'
    )
    md.add_argument(
        '--seeds',
        nargs='+',
        type=int,
        default=[1, 2],
        help='one trajectory per structure and seed',
    )
    md.add_argument(
        '--min-distance',
        type=float,
        default=0.6,
        help='collapse below this interatomic distance (Å)',
    )
    md.add_argument(
        '--max-force',
        type=float,
        default=25.0,
        help='failure above this force (eV/Å)',
    )
    md.add_argument(
        '--max-drift',
        type=float,
        default=0.02,
        help='NVE energy drift limit (eV/atom over the segment)',
    )
    md.add_argument(
        '--gap-every',
        type=_positive_int,
        default=10,
        help='fidelity gap every N steps',
    )
    md.add_argument(
        '--no-gap',
        action='store_true',
        help='do not evaluate the other fidelity heads',
    )
    md.add_argument(
        '--write-every',
        type=_positive_int,
        default=10,
        help='frames written every N steps (for select)',
    )
    md.add_argument(
        '--lammps',
        nargs='?',
        const='auto',
        metavar='LMP',
        help='run in LAMMPS (pair_style e3gnn) instead of ASE; LMP: '
        'the binary (default: $SEVENN_MF_LMP or lmp on PATH)',
    )
    md.add_argument('-o', '--output', default='md_check', help='output folder')
    md.set_defaults(func=_md_check)

    se = sub.add_parser(
        'select',
        help='choose K structures to label at high fidelity, by the fidelity gap',
        description='Ranks candidate structures (md-check trajectories or any '
        "files) by how far the high-fidelity head's gap to the other heads lies "
        'from its range on the high-fidelity training structures, and picks the K '
        'highest with a diversity rule; writes them, unlabelled, as extxyz.',
    )
    se.add_argument('model', help='multi-fidelity checkpoint (sevenn_mf)')
    se.add_argument('files', nargs='+', help='candidate structures')
    se.add_argument('--fidelity', help='the high-fidelity head')
    se.add_argument('-k', type=_positive_int, default=10, help='how many to choose')
    se.add_argument(
        '--seed', type=int, default=0, help='breaks ties; --random draws'
    )
    se.add_argument(
        '--min-separation',
        type=int,
        default=10,
        help='frames of one file at least this far apart',
    )
    se.add_argument(
        '--diversity',
        type=float,
        default=0.3,
        help='minimum descriptor distance between chosen ones, as a '
        'fraction of the median distance between candidates',
    )
    se.add_argument(
        '--random',
        action='store_true',
        help='K at random instead (the control of active learning)',
    )
    se.add_argument('-o', '--output', required=True, help='extxyz to write')
    se.set_defaults(func=_select)

    cm = sub.add_parser(
        'compare',
        help='several models on the same labelled structures: table and plot',
    )
    cm.add_argument('models', nargs='+', help=_MODEL_HELP)
    cm.add_argument('--files', nargs='+', required=True, help='labelled structures')
    cm.add_argument(
        '--fidelity',
        help='the head to compare (multi-fidelity '
        'checkpoints; method runs predict their high fidelity)',
    )
    cm.add_argument('--labels', nargs='+', help='names in the table (one per model)')
    cm.add_argument('-o', '--output', default='compare', help='output folder')
    cm.set_defaults(func=_compare)


def build_parser() -> argparse.ArgumentParser:
    from .analysis.methods import METHODS

    p = argparse.ArgumentParser(
        prog='sevenn_mf',
        description='Multi-fidelity training for SevenNet. A CHECKPOINT is a '
        'sevenn_mf or sevenn checkpoint file or a pretrained name (7net-0, 7net-mf-0).',
    )
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    t = sub.add_parser('train', help='train from a YAML input')
    t.add_argument('input', help='YAML with model/train/data sections')
    t.add_argument(
        '-w',
        '--working-dir',
        default='.',
        help='output folder (default: the current directory): log.sevenn_mf, '
        'metrics.csv, lc.csv, checkpoints',
    )
    t.add_argument(
        '--resume',
        action='store_true',
        help='continue a killed run from checkpoint_last.pth',
    )
    t.add_argument(
        '--epochs', type=_positive_int, help='override train.epoch (>= 1)'
    )
    t.add_argument(
        '-q',
        '--quiet',
        action='store_true',
        help='log to file only (warnings too, while the log is open)',
    )
    t.add_argument(
        '--method',
        choices=list(METHODS),
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
    i.add_argument('checkpoint', help=_CHECKPOINT_HELP)
    i.set_defaults(func=_info)

    f = sub.add_parser('fidelities', help='list the fidelity names of a checkpoint')
    f.add_argument('checkpoint', help=_CHECKPOINT_HELP)
    f.set_defaults(func=_fidelities)

    e = sub.add_parser('evaluate', help='errors against labelled structures')
    e.add_argument('checkpoint', help=_CHECKPOINT_HELP)
    e.add_argument(
        'files', nargs='+', help='structure files (anything ase.io reads)'
    )
    e.add_argument('--fidelity', help='fidelity to evaluate (required if several)')
    e.add_argument(
        '-o',
        '--output',
        default='evaluation',
        help='output folder (default: ./evaluation): per_structure.csv, '
        'summary.csv, parity.png',
    )
    e.add_argument(
        '--batch-size',
        type=_positive_int,
        default=8,
        help='structures per forward pass (default: 8)',
    )
    e.set_defaults(func=_evaluate)

    d = sub.add_parser('deploy', help='TorchScript for LAMMPS pair_style e3gnn')
    d.add_argument('checkpoint', help=_CHECKPOINT_HELP)
    d.add_argument('--fidelity', help='fidelity to deploy (required if several)')
    d.add_argument(
        '--all-fidelities',
        action='store_true',
        help='one file (or folder) per fidelity; not with --fidelity',
    )
    d.add_argument('--parallel', action='store_true', help='for e3gnn/parallel')
    d.add_argument(
        '-o',
        '--output',
        help='file to write, ending in .pt (a folder with --parallel or '
        '--all-fidelities; default: deployed_serial[_FIDELITY].pt or '
        'deployed_parallel[_FIDELITY]/ in the current directory)',
    )
    d.set_defaults(func=_deploy)

    x = sub.add_parser('export', help='a plain sevenn checkpoint of one fidelity')
    x.add_argument('checkpoint', help=_CHECKPOINT_HELP)
    x.add_argument('--fidelity', help='fidelity to export (required if several)')
    x.add_argument(
        '--native',
        action='store_true',
        help="sevenn's native multi-modal format with every fidelity (onehot "
        'models); not with --fidelity',
    )
    x.add_argument('-o', '--output', required=True, help='checkpoint to write')
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
    _add_stability_parsers(sub)
    return p


# ---- warnings and errors ---------------------------------------------------------
class _PlainWarnings:
    """``warnings.showwarning`` for the command line: one line per warning,
    ``sevenn_mf: warning: ...`` (no source line), written into the training
    log while one is open and on stderr unless ``quiet`` (then only where no
    log is open, so that none is lost). A rank-deficient reference fit (a
    fixed stoichiometry) is normal: an info line in the log only."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        from ._sevenn import open_log_file
        from .data.references import UndeterminedReferences

        info = issubclass(category, UndeterminedReferences)
        text = ' '.join(str(message).split())
        text = f'sevenn_mf: {"info" if info else "warning"}: {text}'
        log = open_log_file()
        if log is not None:
            try:
                log.write(text + '\n')
            except (OSError, ValueError):  # closed under us
                log = None
        if log is None or not (self.quiet or info):
            print(text, file=sys.stderr)


_PIP_NAMES = {'yaml': 'pyyaml', 'sklearn': 'scikit-learn'}  # import -> pip name


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split('.')[0]
        return (
            f'this command needs the Python package {top!r}, which is not '
            f'installed (pip install {_PIP_NAMES.get(top, top)})'
        )
    if isinstance(exc, KeyError):
        return f'missing key {exc}'
    text = ' '.join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, OSError, ImportError)):
        return text
    return f'{type(exc).__name__}: {text} (SEVENN_MF_DEBUG=1 shows the traceback)'


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings('ignore', message='.*TP accelerator.*')
    warnings.filterwarnings('ignore', message='.*Weights only load failed.*')
    parser = build_parser()
    args = parser.parse_args(argv)
    saved = warnings.showwarning
    warnings.showwarning = _PlainWarnings(quiet=getattr(args, 'quiet', False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f'sevenn_mf {args.command}: interrupted', file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get('SEVENN_MF_DEBUG'):
            raise
        print(
            f'sevenn_mf {args.command}: error: {_error_line(exc)}', file=sys.stderr
        )
        return 2
    finally:
        warnings.showwarning = saved


if __name__ == '__main__':
    sys.exit(main())
