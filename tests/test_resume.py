"""--resume continues the same run only (sevenn_mf.resume), with coupled heads
and early stopping too (sevenn_mf.train)."""

import csv

import pytest
import torch
from emt_data import write_emt

from sevenn_mf.config import config_from_dict
from sevenn_mf.resume import ResumeMismatch
from sevenn_mf.train import train

COUPLING = {'anchor': 'low', 'energy': 1.0, 'force': 0.5, 'parameter': 0.1}


def _raw(tmp_path, epochs=4, **train_extra):
    if not (tmp_path / 'low.extxyz').exists():
        write_emt(tmp_path / 'low.extxyz', 16, seed=1)
        write_emt(tmp_path / 'high.extxyz', 6, seed=2, fidelity='high')
    return {
        'model': {
            'chemical_species': 'auto',
            'cutoff': 4.0,
            'channel': 8,
            'lmax': 1,
            'num_convolution_layer': 2,
            'is_parity': False,
            'weight_nn_hidden_neurons': [16, 16],
            'fidelity_layer_mode': 'indexed',
        },
        'train': dict(
            {
                'random_seed': 2,
                'epoch': epochs,
                'per_epoch': 100,
                'optimizer': 'adam',
                'optim_param': {'lr': 0.01},
                'scheduler': 'linearlr',
                'scheduler_param': {
                    'start_factor': 1.0,
                    'end_factor': 0.1,
                    'total_iters': 4,
                },
                'loss': 'huber',
                'loss_param': {'delta': 0.01},
                'force_loss_weight': 1.0,
                'device': 'cpu',
                'best_fidelity': 'high',
                'coupling': COUPLING,
            },
            **train_extra,
        ),
        'data': {
            'batch_size': 4,
            'databases': [
                {
                    'name': 'emt',
                    'fidelity': 'low',
                    'files': 'low.extxyz',
                    'validation': {'ratio': 0.25, 'seed': 1},
                },
                {
                    'name': 'emt_x1.1',
                    'fidelity': 'high',
                    'files': 'high.extxyz',
                    'weight': {'energy': 3.0},
                    'validation': {'ratio': 0.34, 'seed': 1},
                },
            ],
        },
    }


def _config(tmp_path, raw):
    return config_from_dict(raw, str(tmp_path))


def _rows(wd):
    with open(wd / 'metrics.csv') as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('scale', ['fixed', 'fitted'])
def test_coupled_run_resumed_with_more_epochs_equals_one_run(tmp_path, scale):
    extra = {'coupling': dict(COUPLING, scale=scale)}
    if scale == 'fitted':  # needs a trained start
        base = _raw(tmp_path, 2)
        train(_config(tmp_path, base), str(tmp_path / 'base'), screen=False)
        extra['pretrained'] = str(tmp_path / 'base' / 'checkpoint_best.pth')
    for wd, n in (('one', 4), ('two', 2)):
        train(
            _config(tmp_path, _raw(tmp_path, n, **extra)),
            str(tmp_path / wd),
            screen=False,
        )
    # more epochs is a change resume allows
    train(
        _config(tmp_path, _raw(tmp_path, 4, **extra)),
        str(tmp_path / 'two'),
        resume=True,
        screen=False,
    )
    if scale == 'fitted':
        s = torch.load(tmp_path / 'two' / 'checkpoint_last.pth', weights_only=False)[
            'model_state_dict'
        ]['rescale_atomic_energy.scale']
        assert s.shape[0] == 2 and (s[1] != s[0]).all()
        for wd in ('one', 'two'):
            log = (tmp_path / wd / 'log.sevenn_mf').read_text()
            assert 'energy scale fit (high): x' in log
    a, b = _rows(tmp_path / 'one'), _rows(tmp_path / 'two')
    assert [(r['epoch'], r['set']) for r in a] == [(r['epoch'], r['set']) for r in b]
    for x, y in zip(a, b):
        for k in ('energy_mae', 'force_mae', 'gap_low_energy_sd'):
            if x[k]:
                assert float(y[k]) == pytest.approx(float(x[k]), rel=1e-5), (x, k)


@pytest.mark.parametrize(
    'change,named',
    [
        (lambda r: r['model'].update(channel=16), 'channel'),
        (lambda r: r['train']['coupling'].update(energy=5.0), 'coupling'),
        (lambda r: r['train'].update(optim_param={'lr': 0.1}), 'optim_param'),
        (lambda r: r['data'].update(batch_size=2), 'batch_size'),
        (
            lambda r: write_emt(
                r['_dir'] / 'high.extxyz', 6, seed=9, fidelity='high'
            ),
            'databases',
        ),
    ],
    ids=['architecture', 'coupling', 'lr', 'batch', 'data file'],
)
def test_resume_refuses_a_changed_run(tmp_path, change, named):
    wd = tmp_path / 'run'
    train(_config(tmp_path, _raw(tmp_path, 1)), str(wd), screen=False)
    before = (wd / 'checkpoint_last.pth').read_bytes()
    raw = _raw(tmp_path, 2)
    raw['_dir'] = tmp_path
    change(raw)
    raw.pop('_dir')
    with pytest.raises(ResumeMismatch, match=named) as err:
        train(_config(tmp_path, raw), str(wd), resume=True, screen=False)
    assert 'only train.epoch' in str(err.value).lower()
    assert (wd / 'checkpoint_last.pth').read_bytes() == before  # untouched


def test_early_stopping_ends_the_run_and_resume_keeps_it_ended(tmp_path):
    raw = _raw(tmp_path, 40, early_stopping={'patience': 2, 'min_delta': 0.99})
    wd = tmp_path / 'run'
    train(_config(tmp_path, raw), str(wd), screen=False)
    epochs = sorted({int(r['epoch']) for r in _rows(wd)})
    # min_delta 0.99 (a 100-fold drop, which this model never makes): epoch 1
    # sets the best, epochs 2 and 3 do not beat it so, the run stops after 3
    assert epochs == [1, 2, 3]
    log = (wd / 'log.sevenn_mf').read_text()
    assert 'early stopping' in log and 'stopped early after epoch 3' in log
    train(_config(tmp_path, raw), str(wd), resume=True, screen=False)
    assert sorted({int(r['epoch']) for r in _rows(wd)}) == [1, 2, 3]
    assert 'stopped early before' in (wd / 'log.sevenn_mf').read_text()


def test_early_stopping_options_are_checked_before_training(tmp_path):
    for bad, msg in (
        ({'patience': 0}, 'patience'),
        ({'patience': 3, 'min_delta': -1}, 'min_delta'),
        ({'patience': 3, 'paitence': 3}, 'early_stopping'),
    ):
        raw = _raw(tmp_path, 2, early_stopping=bad)
        with pytest.raises(ValueError, match=msg):
            train(_config(tmp_path, raw), str(tmp_path / 'x'), screen=False)
        assert not (tmp_path / 'x' / 'checkpoint_last.pth').exists()


def test_loading_a_checkpoint_leaves_the_next_runs_config_alone(tmp_path):
    """sevenn 0.13's checkpoint loader pops keys from its global default
    model config; a run's fingerprint must not depend on whether the process
    loaded a checkpoint before (else a run started after one, e.g. the second
    run of a learning curve, cannot be resumed in a new process)."""
    import sevenn._const as C
    from sevenn.checkpoint import SevenNetCheckpoint

    from sevenn_mf.resume import fingerprint

    before = fingerprint(_config(tmp_path, _raw(tmp_path, epochs=1)))
    table = dict(C.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG)
    train(_config(tmp_path, _raw(tmp_path, epochs=1)), str(tmp_path / 'a'))
    cp = SevenNetCheckpoint(str(tmp_path / 'a' / 'checkpoint_last.pth'))
    assert cp.config  # sevenn's own config routine ran
    assert dict(C.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG) == table
    assert fingerprint(_config(tmp_path, _raw(tmp_path, epochs=1))) == before


def test_resume_removes_what_a_killed_save_left(tmp_path):
    """atomic_torch_save killed mid-write leaves a hidden temporary beside the
    whole checkpoint; remove_stale_saves (called on resume) deletes exactly
    those, not checkpoints or other hidden files."""
    import torch

    from sevenn_mf.checkpoint import atomic_torch_save, remove_stale_saves

    atomic_torch_save({'epoch': 3}, tmp_path / 'checkpoint_last.pth')
    stale = tmp_path / '.checkpoint_last.pthq1w2e3r4.tmp'
    stale.write_bytes(b'half a checkpoint')
    other = tmp_path / '.results.lock'
    other.write_text('')
    assert remove_stale_saves(tmp_path) == [str(stale)]
    assert not stale.exists() and other.exists()
    assert torch.load(tmp_path / 'checkpoint_last.pth')['epoch'] == 3
