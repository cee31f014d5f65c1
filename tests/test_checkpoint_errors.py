"""Unreadable checkpoints: one loader path, one line naming the file.

Every class of bad file (empty, truncated at any point, text, a foreign
pickle, TorchScript, a bare state dict, an unknown dict, a config lacking
keys, weights that do not fit the config, a stale export) goes through
:func:`sevenn_mf.checkpoint.read_checkpoint_file`: the library raises a
:class:`CheckpointError` saying what the file is, and every command that reads
checkpoints (info, fidelities, evaluate, export, deploy, convert, deploy-sum,
train --resume, fine-tuning from train.pretrained) and the calculator report it
in one line, with nothing written. Writing a checkpoint onto its own input is
refused the same way.
"""

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import sevenn._keys as KEY
import torch
import yaml
from ase.io import read, write
from conftest import QUICKSTART_DATA
from helpers import perturbed_model, small_config
from sevenn.util import pretrained_name_to_path

from sevenn_mf import SevenNetMFCalculator
from sevenn_mf.checkpoint import (
    Checkpoint,
    CheckpointError,
    read_checkpoint_file,
    read_training_state,
    save_checkpoint,
)
from sevenn_mf.cli import main
from sevenn_mf.deploy import export

# case -> what the message must say
CASES = {
    'empty': 'empty file',
    'truncated_10': 'truncated',
    'truncated_100': 'truncated',
    'truncated_5000': 'truncated',
    'truncated_half': 'truncated',
    'truncated_end': 'truncated',
    'truncated_7net0': 'truncated',  # was OSError: [Errno 22]
    'truncated_legacy': 'truncated',
    'zero_tail': 'truncated',
    'text': 'a text file',
    'yaml_config': 'a text file',
    'pickle': 'Python pickle',
    'torch_list': 'holds a list',
    'state_dict': 'bare state dict',
    'module': 'pickled Linear',
    'torchscript': 'TorchScript',
    'zip': 'not a PyTorch file',
    'unknown_dict': 'unknown format',
    'no_config': 'without config',
    'empty_weights': 'model_state_dict is empty',
    'missing_keys': 'lacks required key(s) cutoff, shift',
    'no_version': 'lacks required key(s) version',
    'bad_version': 'not a version number',
    'weights_mismatch': 'cannot take its weights',
    'stale_export': 'export it again',
}


@pytest.fixture(scope='module')
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp('good')
    cfg = small_config('onehot', channel=4, lmax=1)
    path = d / 'mf.pth'
    save_checkpoint(path, perturbed_model(cfg, seed=3), cfg)
    return path


def _stored(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def bad(good, tmp_path_factory):
    """{case: path} of one file per class of bad checkpoint."""
    d = tmp_path_factory.mktemp('bad')
    data = good.read_bytes()
    stored = _stored(good)
    files = {}

    def raw(case, content):
        files[case] = d / f'{case}.pth'
        files[case].write_bytes(content)

    def saved(case, obj, **kw):
        files[case] = d / f'{case}.pth'
        torch.save(obj, files[case], **kw)

    raw('empty', b'')
    for n in (10, 100, 5000):
        raw(f'truncated_{n}', data[:n])
    raw('truncated_half', data[: len(data) // 2])
    raw('truncated_end', data[:-100])
    with open(pretrained_name_to_path('7net-0'), 'rb') as f:
        raw('truncated_7net0', f.read(5000))
    legacy = d / 'legacy.pth'
    torch.save({'x': torch.zeros(100)}, legacy, _use_new_zipfile_serialization=False)
    raw('truncated_legacy', legacy.read_bytes()[:200])
    # preallocated, half filled
    raw('zero_tail', data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    raw('text', b'checkpoint\n')
    raw('yaml_config', yaml.safe_dump({'model': {'cutoff': 5.0}}).encode())
    raw('pickle', pickle.dumps({'model_state_dict': {}, 'config': {}}))
    saved('torch_list', [1, 2, 3])
    saved('state_dict', stored['model_state_dict'])
    saved('module', torch.nn.Linear(2, 2))
    files['torchscript'] = d / 'deployed.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), files['torchscript'])
    files['zip'] = d / 'zip.pth'
    with zipfile.ZipFile(files['zip'], 'w') as z:
        z.writestr('notes.txt', 'not a model')
    saved('unknown_dict', {'weights': stored['model_state_dict'], 'epoch': 3})
    saved('no_config', {'model_state_dict': stored['model_state_dict']})
    saved('empty_weights', dict(stored, model_state_dict={}))
    cfg = {k: v for k, v in stored['config'].items() if k not in ('cutoff', 'shift')}
    saved('missing_keys', dict(stored, config=cfg))
    cfg = {k: v for k, v in stored['config'].items() if k != 'version'}
    saved('no_version', dict(stored, config=cfg))
    saved('bad_version', dict(stored, config=dict(stored['config'], version='new')))
    cfg = dict(stored['config'], **{KEY.LMAX: 2})
    saved('weights_mismatch', dict(stored, config=cfg))
    # what export wrote before the version fix: converted weights, old version
    plain = d / 'plain.pth'
    export(good, 'pbe', plain)
    old = _stored(plain)
    saved('stale_export', dict(old, config=dict(old['config'], version='0.9.4')))
    assert set(files) == set(CASES)
    return files


def _check_message(msg, path, what):
    assert str(path) in msg, msg
    assert what in msg, msg
    assert '\n' not in msg.strip(), msg


# ---- the library -------------------------------------------------------------------
@pytest.mark.parametrize('case', CASES)
def test_library_names_file_and_problem(case, bad):
    with pytest.raises(CheckpointError) as err:
        Checkpoint(bad[case]).build_model()
    _check_message(str(err.value), bad[case], CASES[case])


@pytest.mark.parametrize('case', ['empty', 'truncated_half', 'torchscript', 'text'])
def test_calculator(case, bad):
    with pytest.raises(CheckpointError) as err:
        SevenNetMFCalculator(bad[case], fidelity='pbe')
    _check_message(str(err.value), bad[case], CASES[case])


def test_good_files_pass(good):
    assert read_checkpoint_file(good)['config']['version']
    assert Checkpoint('7net-0').kind == 'plain'
    assert Checkpoint('7net-mf-0').fidelities == ['R2SCAN', 'PBE']


def test_resume_needs_training_state(good, tmp_path):
    # a checkpoint written by save_checkpoint (export, convert) holds no
    # optimizer state: nothing to resume
    with pytest.raises(CheckpointError, match='not a training checkpoint'):
        read_training_state(good)
    stored = _stored(good)
    stored.update(
        optimizer_state_dict={'state': {}}, scheduler_state_dict={}, epoch=2
    )
    torch.save(stored, tmp_path / 'last.pth')
    assert read_training_state(tmp_path / 'last.pth')['epoch'] == 2


# ---- the command line ----------------------------------------------------------------
def _commands(path, out):
    test_file = QUICKSTART_DATA / 'r2scan_test_x0.5.extxyz'
    return {
        'info': ['info', path],
        'fidelities': ['fidelities', path],
        'evaluate': ['evaluate', path, test_file, '--fidelity', 'pbe', '-o', out],
        'export': ['export', path, '--fidelity', 'pbe', '-o', out / 'x.pth'],
        'export-native': ['export', path, '--native', '-o', out / 'x.pth'],
        'deploy': ['deploy', path, '--fidelity', 'pbe', '-o', out / 'x.pt'],
        'deploy-parallel': [
            'deploy',
            path,
            '--fidelity',
            'pbe',
            '--parallel',
            '-o',
            out / 'par',
        ],
        'convert': ['convert', path, '-o', out / 'x.pth', '--add', 'hse'],
        'deploy-sum': ['deploy-sum', '--part', f'{path}@pbe', '-o', out / 'x.pt'],
    }


COMMANDS = list(_commands(Path('p'), Path('o')))


def _run(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.err


def _assert_one_line_error(rc, err, path, what):
    assert rc != 0
    assert 'Traceback' not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    _check_message(lines[0], path, what)


@pytest.mark.parametrize('command', COMMANDS)
@pytest.mark.parametrize('case', CASES)
def test_cli_one_line_nothing_written(case, command, bad, tmp_path, capsys):
    out = tmp_path / 'out'
    before = bad[case].read_bytes()
    args = _commands(bad[case], out)[command]
    if case == 'weights_mismatch' and command == 'fidelities':
        # reads the config only: the weights are never built
        assert _run(args, capsys)[0] == 0
        return
    rc, err = _run(args, capsys)
    _assert_one_line_error(rc, err, bad[case], CASES[case])
    assert not out.exists()
    assert bad[case].read_bytes() == before


# ---- train: --resume and train.pretrained ---------------------------------------------
def _train_yaml(tmp_path, **train_extra):
    frames = read(QUICKSTART_DATA / 'pbe.extxyz', ':8')
    write(tmp_path / 'pbe.extxyz', frames)
    raw = {
        'model': {
            'chemical_species': 'auto',
            'cutoff': 4.0,
            'channel': 4,
            'lmax': 1,
            'num_convolution_layer': 1,
            'weight_nn_hidden_neurons': [8],
            'fidelity_layer_mode': 'onehot',
        },
        'train': dict(
            {
                'epoch': 1,
                'random_seed': 1,
                'device': 'cpu',
                'optimizer': 'adam',
                'optim_param': {'lr': 0.01},
                'scheduler': 'linearlr',
                'scheduler_param': {
                    'start_factor': 1.0,
                    'end_factor': 0.1,
                    'total_iters': 1,
                },
            },
            **train_extra,
        ),
        'data': {
            'batch_size': 4,
            'databases': [{'name': 'lf', 'fidelity': 'pbe', 'files': 'pbe.extxyz'}],
        },
    }
    path = tmp_path / 'input.yaml'
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize('case', ['empty', 'truncated_half', 'torchscript'])
def test_train_resume_broken_last(case, bad, tmp_path, capsys):
    yml = _train_yaml(tmp_path)
    wd = tmp_path / 'run'
    wd.mkdir()
    last = wd / 'checkpoint_last.pth'
    last.write_bytes(bad[case].read_bytes())
    rc, err = _run(['train', yml, '-w', wd, '--resume', '-q'], capsys)
    _assert_one_line_error(rc, err, last, CASES[case])
    # refused before any work: the run's folder is as it was
    assert sorted(os.listdir(wd)) == ['checkpoint_last.pth']
    assert last.read_bytes() == bad[case].read_bytes()


def test_train_resume_from_non_training_checkpoint(good, tmp_path, capsys):
    yml = _train_yaml(tmp_path)
    wd = tmp_path / 'run'
    wd.mkdir()
    (wd / 'checkpoint_last.pth').write_bytes(good.read_bytes())
    rc, err = _run(['train', yml, '-w', wd, '--resume', '-q'], capsys)
    _assert_one_line_error(
        rc, err, wd / 'checkpoint_last.pth', 'not a training checkpoint'
    )


@pytest.mark.parametrize('case', ['truncated_5000', 'pickle', 'missing_keys'])
def test_train_pretrained_broken(case, bad, tmp_path, capsys):
    yml = _train_yaml(tmp_path, pretrained=str(bad[case]))
    wd = tmp_path / 'run'
    rc, err = _run(['train', yml, '-w', wd, '-q'], capsys)
    _assert_one_line_error(rc, err, bad[case], CASES[case])
    assert not (wd / 'checkpoint_last.pth').exists()


# ---- output onto its own input --------------------------------------------------------
def _spellings(good, tmp_path, name):
    """A copy of the good checkpoint (it may be overwritten if a check fails)
    and four spellings of its path."""
    path = tmp_path / 'src' / name
    path.parent.mkdir()
    path.write_bytes(good.read_bytes())
    link = tmp_path / f'link_{name}'
    link.symlink_to(path)
    spellings = [
        path,
        tmp_path / 'src' / '..' / 'src' / name,
        os.path.relpath(path),
        link,
    ]
    return path, spellings


# command -> (source file name, arguments); deploy --parallel writes a folder
SELF_WRITES = {
    'export': ('model.pth', ['export', '{src}', '--fidelity', 'pbe', '-o', '{out}']),
    'export-native': ('model.pth', ['export', '{src}', '--native', '-o', '{out}']),
    'convert': ('model.pth', ['convert', '{src}', '-o', '{out}', '--add', 'hse']),
    'deploy': ('model.pt', ['deploy', '{src}', '--fidelity', 'pbe', '-o', '{out}']),
    'deploy-parallel': (
        'model',
        ['deploy', '{src}', '--fidelity', 'pbe', '--parallel', '-o', '{out}'],
    ),
    'deploy-sum': ('model.pt', ['deploy-sum', '--part', '{src}@pbe', '-o', '{out}']),
}


@pytest.mark.parametrize('command', SELF_WRITES)
def test_output_onto_input_refused(command, good, tmp_path, capsys):
    name, template = SELF_WRITES[command]
    path, spellings = _spellings(good, tmp_path, name)
    before = path.read_bytes()
    for i, out in enumerate(spellings):
        src = spellings[(i + 1) % len(spellings)]  # input and output spelt apart
        args = [a.format(src=src, out=out) for a in template]
        rc, err = _run(args, capsys)
        _assert_one_line_error(rc, err, out, 'the output is the input')
        assert path.read_bytes() == before
        assert os.listdir(path.parent) == [name]  # no temporary files


def test_library_refuses_output_onto_input(good, tmp_path):
    path, spellings = _spellings(good, tmp_path, 'model.pth')
    with pytest.raises(CheckpointError, match='the output is the input'):
        export(path, 'pbe', spellings[1])
