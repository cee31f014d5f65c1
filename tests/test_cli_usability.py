"""The command line and the calculator as a user meets them (issue 12, part 7):
help for every argument, refused option combinations, a model's fidelity never
ignored, warnings as one plain line (and into the log), a missing optional
package named, the metrics' units explained, every command in the README."""

import argparse
import configparser
import csv
import math
import re
import sys

import pytest
import yaml
from conftest import QUICKSTART_DATA, REPO
from helpers import perturbed_model, small_config

from sevenn_mf.checkpoint import save_checkpoint
from sevenn_mf.cli import build_parser, main
from sevenn_mf.model import FidelityError, resolve_fidelity


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_argument_of_every_subcommand_has_help():
    subs = _subparsers(build_parser())
    assert {'train', 'deploy', 'hull', 'mixing', 'parity', 'deploy-sum'} <= set(subs)
    missing = [
        f'{name} {a.option_strings or a.dest}'
        for name, sp in subs.items()
        for a in sp._actions
        if not (a.help and a.help.strip() and a.help != argparse.SUPPRESS)
    ]
    assert missing == []
    text = subs['train'].format_help()
    assert 'default: the current directory' in ' '.join(text.split())


def test_readme_command_reference_lists_every_subcommand():
    readme = (REPO / 'README.md').read_text()
    section = readme.split('## Command reference', 1)[1].split('\n## ', 1)[0]
    rows = {m.group(1) for m in re.finditer(r'^\| `([a-z-]+)` \|', section, re.M)}
    assert rows == set(_subparsers(build_parser()))
    for name in rows:  # each row has an example of that command
        assert re.search(rf'`sevenn_mf {name} [^`]+`', section), name
    assert '√3' in readme and '√6' in readme  # the two RMSE conventions


def test_pymatgen_is_a_dependency():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    requires = cfg['options']['install_requires'].split()
    assert 'pymatgen' in requires
    extras = (
        cfg['options.extras_require']
        if cfg.has_section('options.extras_require')
        else {}
    )
    assert all('pymatgen' not in v for v in dict(extras).values())


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpts')
    two = d / 'two.pth'
    save_checkpoint(
        two, perturbed_model(small_config('onehot')), small_config('onehot')
    )
    one_cfg = small_config('onehot', fidelities=['pbe'])
    one = d / 'one.pth'
    save_checkpoint(one, perturbed_model(one_cfg), one_cfg)
    return {'two': two, 'one': one, 'dir': d}


def _refused(capsys, argv, *expected):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'sevenn_mf {argv[0]}: error: ')
    for s in expected:
        assert s in lines[0], (s, lines[0])
    return lines[0]


def test_deploy_and_export_refuse_ignored_options(checkpoints, capsys, tmp_path):
    two = str(checkpoints['two'])
    # refused before the checkpoint is even read: a missing one is not named
    _refused(
        capsys,
        ['deploy', 'nope.pth', '--fidelity', 'pbe', '--all-fidelities'],
        '--fidelity and --all-fidelities exclude each other',
    )
    out = tmp_path / 'x.pth'
    _refused(
        capsys,
        ['deploy', two, '--fidelity', 'pbe', '-o', str(out)],
        str(out),
        'ending in .pt',
    )
    assert list(tmp_path.iterdir()) == []  # neither x.pth nor x.pth.pt
    _refused(
        capsys,
        [
            'deploy',
            two,
            '--parallel',
            '--fidelity',
            'pbe',
            '-o',
            str(tmp_path / 'p.pt'),
        ],
        'names a folder',
    )
    _refused(
        capsys,
        [
            'export',
            two,
            '--native',
            '--fidelity',
            'pbe',
            '-o',
            str(tmp_path / 'n.pth'),
        ],
        '--native exports every fidelity',
    )
    _refused(
        capsys,
        ['deploy-sum', '--part', f'{two}@pbe', '-o', str(tmp_path / 'sum.pth')],
        'ending in .pt',
    )
    assert list(tmp_path.iterdir()) == []
    from sevenn_mf.deploy import deploy

    with pytest.raises(ValueError, match='not both'):
        deploy(two, fidelity='pbe', all_fidelities=True, output=str(tmp_path))
    # the path asked for is the path written
    pt = tmp_path / 'model.pt'
    assert main(['deploy', two, '--fidelity', 'r2scan', '-o', str(pt)]) == 0
    assert capsys.readouterr().out.strip() == str(pt) and pt.is_file()


def test_a_fidelity_is_never_ignored(checkpoints, capsys, tmp_path):
    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.checkpoint import Checkpoint

    # single-fidelity sevenn_mf model: its own name or none
    one = Checkpoint(checkpoints['one'])
    assert resolve_fidelity(one.config, 'pbe') == 'pbe'
    assert resolve_fidelity(one.config, None) == 'pbe'
    with pytest.raises(FidelityError, match="unknown fidelity 'r2scan'.*only 'pbe'"):
        SevenNetMFCalculator(one, fidelity='r2scan')
    # a plain sevenn model (7net-0): none; an exported one also its own name
    plain = tmp_path / 'plain.pth'
    assert (
        main(
            [
                'export',
                str(checkpoints['two']),
                '--fidelity',
                'r2scan',
                '-o',
                str(plain),
            ]
        )
        == 0
    )
    capsys.readouterr()
    exported = Checkpoint(plain)
    assert exported.fidelities == []
    assert resolve_fidelity(exported.config, 'r2scan') is None
    assert resolve_fidelity(exported.config, None) is None
    with pytest.raises(
        FidelityError, match="'pbe' given.*exported from fidelity 'r2scan'"
    ):
        resolve_fidelity(exported.config, 'pbe')
    seven = Checkpoint('7net-0')
    assert resolve_fidelity(seven.config, None) is None
    with pytest.raises(
        FidelityError, match="'r2scan' given, but this is a single-fidelity"
    ):
        SevenNetMFCalculator(seven, fidelity='r2scan')
    test_file = str(QUICKSTART_DATA / 'r2scan_test_x0.5.extxyz')
    for argv in (
        [
            'evaluate',
            '7net-0',
            test_file,
            '--fidelity',
            'r2scan',
            '-o',
            str(tmp_path / 'e'),
        ],
        ['deploy', '7net-0', '--fidelity', 'r2scan', '-o', str(tmp_path / 'd.pt')],
        ['export', '7net-0', '--fidelity', 'r2scan', '-o', str(tmp_path / 'x.pth')],
    ):
        _refused(capsys, argv, "'r2scan' given", 'single-fidelity')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['plain.pth']


def test_missing_optional_package_is_one_line(checkpoints, capsys, monkeypatch):
    # as if not installed, also when other tests imported it already
    for name in [
        m for m in sys.modules if m == 'pymatgen' or m.startswith('pymatgen.')
    ]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, 'pymatgen', None)
    line = _refused(
        capsys,
        [
            'hull',
            str(checkpoints['two']),
            '--fidelity',
            'r2scan',
            '--structures',
            str(QUICKSTART_DATA / 'r2scan_test_x0.5.extxyz'),
            '--terminals',
            'GaN',
            'InN',
        ],
        "needs the Python package 'pymatgen'",
        'pip install pymatgen',
    )
    assert 'Traceback' not in line


def test_warning_is_one_plain_line(tmp_path, capsys):
    """sevenn's deprecation warning while the YAML is read: one line, no source
    line, no category (and the run stops on its bad epoch, with no log open,
    so the warning is on stderr even under -q)."""
    write_small_data(tmp_path)
    raw = small_raw()
    raw['model']['avg_num_neigh'] = True
    raw['train']['epoch'] = 0
    path = tmp_path / 'input.yaml'
    path.write_text(yaml.safe_dump(raw))
    for quiet in ([], ['-q']):
        assert main(['train', str(path), '-w', str(tmp_path / 'wd')] + quiet) == 2
        err = capsys.readouterr().err.splitlines()
        warn = [ln for ln in err if ln.startswith('sevenn_mf: warning: ')]
        assert len(warn) == 1 and "'avg_num_neigh' is deprecated" in warn[0], err
        assert not any('UserWarning' in ln or '.py:' in ln for ln in err), err
        assert any('train.epoch' in ln for ln in err)


def write_small_data(tmp_path):
    from ase.io import read, write

    write(tmp_path / 'pbe.extxyz', read(QUICKSTART_DATA / 'pbe.extxyz', ':10'))
    write(tmp_path / 'r2scan.extxyz', read(QUICKSTART_DATA / 'r2scan.extxyz', ':6'))


def small_raw():
    return {
        'model': {
            'chemical_species': 'auto',
            'cutoff': 4.0,
            'channel': 4,
            'lmax': 1,
            'num_convolution_layer': 1,
            'is_parity': False,
            'weight_nn_hidden_neurons': [8],
        },
        'train': {
            'epoch': 2,
            'per_epoch': 1,
            'best_fidelity': 'r2scan',
            'scheduler': 'exponentiallr',
            'scheduler_param': {'gamma': 0.9},
        },
        'data': {
            'batch_size': 4,
            'databases': [
                {
                    'name': 'lf',
                    'fidelity': 'pbe',
                    'files': 'pbe.extxyz',
                    'validation': {'ratio': 0.3, 'seed': 1},
                },
                {
                    'name': 'hf',
                    'fidelity': 'r2scan',
                    'files': 'r2scan.extxyz',
                    'validation': {'ratio': 0.34, 'seed': 1},
                },
            ],
        },
    }


def test_quiet_training_log_warnings_info_and_units_note(
    tmp_path, capsys, monkeypatch
):
    """Under -q nothing but the output lines reaches the terminal: a warning
    raised while training goes into the log as one line, the rank-deficient
    reference fit of r2SCAN end members (x = 0 and 1 only) is an info line in
    the log, and the log explains once how sevenn's RMSE relates to
    metrics.csv, which the two CSVs confirm (sqrt(3) and sqrt(6) x 10)."""
    import warnings

    import sevenn_mf.train as train_module

    write_small_data(tmp_path)
    path = tmp_path / 'input.yaml'
    path.write_text(yaml.safe_dump(small_raw()))
    summary = train_module._data_summary

    def summary_with_warning(data):
        warnings.warn('injected while the log is open', UserWarning, stacklevel=1)
        return summary(data)

    monkeypatch.setattr(train_module, '_data_summary', summary_with_warning)
    wd = tmp_path / 'run'
    assert main(['train', str(path), '-w', str(wd), '-q']) == 0
    out = capsys.readouterr()
    assert out.err.strip() == '', out.err
    assert out.out.splitlines()[0] == (
        f'outputs in {wd} (log.sevenn_mf, metrics.csv, lc.csv, checkpoint_*.pth)'
    )
    assert out.out.splitlines()[-1] == f'checkpoint: {wd / "checkpoint_best.pth"}'
    log = (wd / 'log.sevenn_mf').read_text()
    assert 'sevenn_mf: warning: injected while the log is open' in log
    info = [ln for ln in log.splitlines() if ln.startswith('sevenn_mf: info: ')]
    assert len(info) == 1 and 'not separately determined' in info[0]
    assert log.count("note: sevenn's table above gives the RMSE") == 1

    with open(wd / 'lc.csv') as f:
        lc = list(csv.DictReader(f))
    rows = [
        r
        for r in csv.DictReader(open(wd / 'metrics.csv'))
        if r['set'] == 'validset' and r['epoch'] == '2'
    ]
    force = next(k for k in lc[-1] if k.startswith('validset_Force'))
    stress = next(k for k in lc[-1] if k.startswith('validset_Stress'))
    assert float(lc[-1][force]) == pytest.approx(
        math.sqrt(3) * float(rows[0]['force_rmse']) / 1000, rel=1e-3
    )
    assert float(lc[-1][stress]) == pytest.approx(
        10 * math.sqrt(6) * float(rows[0]['stress_rmse']), rel=1e-3
    )


def test_units_note_only_under_the_first_table():
    from sevenn_mf.metrics import UNITS_NOTE, FidelityMetrics

    m = FidelityMetrics()
    m.recorder('trainset')
    assert UNITS_NOTE in m.table(1) and UNITS_NOTE not in m.table(2)
