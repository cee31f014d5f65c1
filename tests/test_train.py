"""Multi-fidelity training through sevenn's Trainer, end to end."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sevenn._keys as KEY
import torch
import yaml
from ase.io import read, write
from conftest import QUICKSTART_DATA

from sevenn_mf.config import config_from_dict, load_config
from sevenn_mf.data.databases import DataError
from sevenn_mf.data.dataset import prepare_data
from sevenn_mf.train import train

SMALL_MODEL = {
    'chemical_species': 'auto',
    'cutoff': 4.5,
    'channel': 8,
    'lmax': 1,
    'num_convolution_layer': 2,
    'is_parity': False,
    'weight_nn_hidden_neurons': [16, 16],
}


def _data(tmp_path, n_pbe=16, n_r2=8):
    pbe = read(QUICKSTART_DATA / 'pbe.extxyz', ':')[:n_pbe]
    r2 = read(QUICKSTART_DATA / 'r2scan.extxyz', ':')[:n_r2]
    write(tmp_path / 'pbe.extxyz', pbe)
    write(tmp_path / 'r2scan.extxyz', r2)
    return tmp_path / 'pbe.extxyz', tmp_path / 'r2scan.extxyz'


def _raw(tmp_path, epochs=3, mode='onehot', **train_extra):
    _data(tmp_path)
    raw = {
        'model': dict(SMALL_MODEL, fidelity_layer_mode=mode),
        'train': dict(
            {
                'random_seed': 3,
                'epoch': epochs,
                'per_epoch': 100,
                'optimizer': 'adam',
                'optim_param': {'lr': 0.01},
                'scheduler': 'linearlr',
                'scheduler_param': {
                    'start_factor': 1.0,
                    'end_factor': 0.1,
                    'total_iters': epochs,
                },
                'loss': 'mse',
                'force_loss_weight': 0.1,
                'stress_loss_weight': 1e-4,
                'best_fidelity': 'r2scan',
                'device': 'cpu',
            },
            **train_extra,
        ),
        'data': {
            'batch_size': 4,
            'databases': [
                {
                    'name': 'lf',
                    'fidelity': 'pbe',
                    'files': 'pbe.extxyz',
                    'validation': {'ratio': 0.25, 'seed': 1},
                },
                {
                    'name': 'hf',
                    'fidelity': 'r2scan',
                    'files': 'r2scan.extxyz',
                    'weight': {'energy': 2.0, 'force': 2.0},
                    'validation': {'ratio': 0.25, 'seed': 1},
                },
            ],
        },
    }
    return raw


def _yaml(tmp_path, raw):
    path = tmp_path / 'input.yaml'
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(wd):
    with open(os.path.join(wd, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('mode', ['onehot', 'indexed'])
def test_end_to_end(tmp_path, mode):
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.evaluate import error_summary, predict

    raw = _raw(tmp_path, epochs=4, mode=mode)
    config = load_config(_yaml(tmp_path, raw))
    wd = tmp_path / 'run'
    best = train(config, str(wd), screen=False)
    assert best.endswith('checkpoint_best.pth')
    # every run logs into its own folder, also the n-th training of a process
    assert 'databases:' in (wd / 'log.sevenn_mf').read_text()

    rows = _metrics(wd)
    sets = {r['set'] for r in rows}
    assert {'trainset', 'validset', 'pbe_validset', 'r2scan_validset'} <= sets
    train_loss = [float(r['force_rmse']) for r in rows if r['set'] == 'trainset']
    assert train_loss[-1] < train_loss[0]  # it learns
    r2 = [r for r in rows if r['set'] == 'r2scan_validset']
    assert all(r['stress_mae'] == 'nan' for r in r2)  # r2SCAN has no stress labels
    assert all(np.isfinite(float(r['energy_mae'])) for r in r2)

    # the best checkpoint reproduces the logged validation error of its epoch
    cp = Checkpoint(best)
    assert cp.fidelities == ['pbe', 'r2scan'] and cp.layer_mode == mode
    logged = next(r for r in r2 if int(r['epoch']) == cp.epoch)
    data = prepare_data(config, str(tmp_path / 'again'))
    valid = [
        g for db in data.databases if db.spec.fidelity == 'r2scan' for g in db.valid
    ]
    errors = error_summary(predict(cp, valid, 'r2scan'))
    assert errors['energy MAE (meV/atom)'] == pytest.approx(
        float(logged['energy_mae']), rel=1e-3, abs=1e-3
    )
    assert errors['force MAE (meV/Å)'] == pytest.approx(
        float(logged['force_mae']), rel=1e-3, abs=1e-3
    )
    best_losses = [float(r['energy_mae']) for r in r2]
    assert len(best_losses) == 4


def test_partial_labels_give_zero_gradient_from_absent_labels(tmp_path):
    """Energy-only structures: the force and stress terms are masked, not zero-filled."""
    from sevenn.train.loss import get_loss_functions_from_config
    from torch_geometric.loader import DataLoader

    from sevenn_mf.model import build_model

    raw = _raw(tmp_path)
    frames = read(QUICKSTART_DATA / 'r2scan.extxyz', ':')[:6]
    for a in frames:  # keep energies only, like the ethanol CCSD(T) data
        e = a.get_potential_energy()
        a.calc = None
        a.info['energy'] = e
    write(tmp_path / 'e_only.extxyz', frames)
    raw['data']['databases'][1] = {
        'name': 'hf',
        'fidelity': 'r2scan',
        'files': 'e_only.extxyz',
        'validation': {'ratio': 0.2},
    }
    config = load_config(_yaml(tmp_path, raw))
    data = prepare_data(config, str(tmp_path / 'wd'))
    cfg = data.config
    graphs = data.databases[1].train
    assert all(torch.isnan(g[KEY.FORCE]).all() for g in graphs)
    assert all(torch.isfinite(g[KEY.ENERGY]) for g in graphs)

    model = build_model(cfg)
    model.set_is_batch_data(True)
    batch = next(iter(DataLoader(graphs, batch_size=6)))
    losses = get_loss_functions_from_config(cfg)
    out = model(batch.clone())
    terms = {ld.name: ld.get_loss(out, model) * w for ld, w in losses}
    params = [p for p in model.parameters() if p.requires_grad]
    g_total = torch.autograd.grad(
        sum(terms.values()).sum(), params, retain_graph=True, allow_unused=True
    )
    g_energy = torch.autograd.grad(terms['Energy'].sum(), params, allow_unused=True)
    for gt, ge in zip(g_total, g_energy):
        if gt is None:
            continue
        assert torch.equal(gt, ge)  # absent force/stress labels contribute nothing
    assert any(g is not None and g.abs().max() > 0 for g in g_energy)

    # and the whole run trains on it
    wd = tmp_path / 'run'
    train(config, str(wd), screen=False)
    assert os.path.isfile(wd / 'checkpoint_last.pth')


def test_sevenn_native_multimodal_yaml_runs(tmp_path):
    pbe, r2 = _data(tmp_path, 12, 8)
    raw = {
        'model': dict(
            SMALL_MODEL,
            use_modal_self_inter_intro=True,
            use_modal_self_inter_outro=True,
            use_modal_output_block=True,
        ),
        'train': {
            'epoch': 2,
            'use_modality': True,
            'use_weight': True,
            'scheduler': 'linearlr',
            'scheduler_param': {
                'start_factor': 1.0,
                'total_iters': 2,
                'end_factor': 0.0001,
            },
            'loss': 'huber',
            'loss_param': {'delta': 0.01},
            'device': 'cpu',
        },
        'data': {
            'batch_size': 4,
            'shift': 'elemwise_reference_energies',
            'scale': 'force_rms',
            'use_modal_wise_shift': True,
            'use_modal_wise_scale': False,
            'load_trainset_path': [
                {
                    'data_modality': 'pbe',
                    'file_list': [{'file': 'pbe.extxyz'}],
                    'data_weight': {'energy': 1.0, 'force': 0.1, 'stress': 1.0},
                },
                {
                    'data_modality': 'scan',
                    'file_list': [{'file': 'r2scan.extxyz'}],
                    'data_weight': {'energy': 1.0, 'force': 10.0, 'stress': 1.0},
                },
            ],
            'load_pbe_validset_path': [
                {'data_modality': 'pbe', 'file_list': [{'file': 'pbe.extxyz'}]}
            ],
        },
    }
    config = load_config(_yaml(tmp_path, raw))
    assert sorted(d['fidelity'] for d in config['databases']) == [
        'pbe',
        'pbe',
        'scan',
    ]
    wd = tmp_path / 'run'
    train(config, str(wd), screen=False)
    from sevenn_mf.checkpoint import Checkpoint

    assert Checkpoint(wd / 'checkpoint_last.pth').fidelities == ['pbe', 'scan']
    assert any(r['set'] == 'pbe_validset' for r in _metrics(wd))


def _run_cli(args, cwd, env_extra=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, '-m', 'sevenn_mf.cli'] + args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def test_resume_after_sigkill(tmp_path):
    epochs = 6
    raw = _raw(tmp_path, epochs=epochs)
    path = _yaml(tmp_path, raw)

    ref = _run_cli(['train', str(path), '-w', 'ref', '-q'], tmp_path)
    assert ref.wait(600) == 0, ref.stdout.read().decode()

    p = _run_cli(['train', str(path), '-w', 'killed', '-q'], tmp_path)
    last = tmp_path / 'killed' / 'checkpoint_last.pth'
    deadline = time.time() + 600
    killed_after = None
    while time.time() < deadline and p.poll() is None:
        if last.exists():
            try:
                ep = torch.load(last, weights_only=False)['epoch']
            except Exception:  # being replaced: atomic rename means retry
                ep = 0
            if ep >= 2:
                time.sleep(0.3)  # well into the next epoch
                p.send_signal(signal.SIGKILL)
                killed_after = ep
                break
        time.sleep(0.05)
    p.wait()
    assert killed_after is not None and killed_after < epochs, (
        'run ended before the kill'
    )
    # no torn checkpoint: the file is whole (a kill mid-write may leave the
    # writer's hidden temporary beside it, which the resume removes)
    assert torch.load(last, weights_only=False)['epoch'] >= killed_after

    r = _run_cli(['train', str(path), '-w', 'killed', '--resume', '-q'], tmp_path)
    assert r.wait(600) == 0, r.stdout.read().decode()
    assert not list((tmp_path / 'killed').glob('.*.tmp'))

    rows_ref = [r for r in _metrics(tmp_path / 'ref') if r['set'] == 'trainset']
    rows = [r for r in _metrics(tmp_path / 'killed') if r['set'] == 'trainset']
    assert [int(r['epoch']) for r in rows] == list(range(1, epochs + 1))
    assert [r['lr'] for r in rows] == [r['lr'] for r in rows_ref]  # same schedule
    for a, b in zip(rows, rows_ref):  # same trajectory: same data order, same state
        assert float(a['energy_rmse']) == pytest.approx(
            float(b['energy_rmse']), rel=1e-4
        )
    cp = torch.load(tmp_path / 'killed' / 'checkpoint_last.pth', weights_only=False)
    assert cp['epoch'] == epochs

    again = _run_cli(['train', str(path), '-w', 'killed', '-q'], tmp_path)
    assert again.wait(120) == 2
    assert b'--resume' in again.stdout.read()


def _bad_case(tmp_path, kind):
    raw = _raw(tmp_path)
    frames = read(tmp_path / 'r2scan.extxyz', ':')
    bad = tmp_path / 'bad.extxyz'
    if kind == 'no_fidelity':
        del raw['data']['databases'][1]['fidelity']
        return raw, 'has no fidelity'
    if kind == 'element':
        raw['model']['chemical_species'] = ['Ga', 'N']
        return raw, r'frame \d+: contains In'
    if kind == 'nan':
        frames[3].calc.results['energy'] = float('nan')
        write(bad, frames)
        return _with(raw, 'bad.extxyz'), 'bad.extxyz, frame 3'
    if kind == 'inf':
        frames[2].calc.results['forces'][1, 0] = float('inf')
        write(bad, frames)
        return _with(raw, 'bad.extxyz'), 'bad.extxyz, frame 2'
    if kind == 'close':
        a = frames[4]
        a.positions[1] = a.positions[0] + [0.2, 0.1, 0.0]
        write(bad, frames)
        return _with(
            raw, 'bad.extxyz'
        ), r'bad.extxyz, frame 4: atoms 0 and 1 are 0.22'
    if kind == 'empty':
        bad.write_text('')
        return _with(raw, 'bad.extxyz'), 'bad.extxyz'
    if kind == 'truncated':
        write(bad, frames)
        text = bad.read_text()
        bad.write_text(text[: int(len(text) * 0.6)])
        return _with(raw, 'bad.extxyz'), r'bad.extxyz, frame \d'
    raise AssertionError(kind)


def _with(raw, fname):
    raw['data']['databases'][1]['files'] = fname
    return raw


@pytest.mark.parametrize(
    'kind', ['no_fidelity', 'element', 'nan', 'inf', 'close', 'empty', 'truncated']
)
def test_bad_input_fails_before_training(tmp_path, kind):
    _data(tmp_path)
    raw, pattern = _bad_case(tmp_path, kind)
    wd = tmp_path / 'run'
    with pytest.raises((DataError, ValueError), match=pattern):
        config = config_from_dict(raw, base_dir=str(tmp_path))
        train(config, str(wd), screen=False)
    assert not list(wd.glob('checkpoint*'))  # nothing started
