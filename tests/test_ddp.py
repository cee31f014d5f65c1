"""Data-parallel training on CPU (gloo, 2 processes under torchrun) equals
single-process training with the same global batch.

Why it is exact up to float rounding: rank r takes positions r, r+2, ... of
the epoch's order, so with per-rank batch b the two ranks' k-th batches are
together the single process's k-th batch of 2b. sevenn's loss is a mean per
batch and DDP averages gradients over ranks, which is the mean over the
global batch when both ranks' batches hold the same number of structures and
atoms (all structures here have 8 atoms and full labels). With an odd number
of training structures the last step runs on one rank only; DDP's join (with
``divide_by_initial_world_size=False``) then gives that rank's gradient alone,
again what the single process computes for its last, one-structure batch.

sevenn's ``TotalLoss`` in lc.csv is a mean of per-batch losses, so it is
compared only where both ranks run the same number of equal batches (the
even case); metrics.csv holds per-structure means and is compared always.

Tolerance: relative 1e-4 on every logged loss/error after each of 3 epochs
and on the final parameters (observed differences are ~1e-7, float32
summation order in the gradient all-reduce).
"""

import csv
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from emt_data import write_emt

REL = 1e-4
EPOCHS = 3


def _raw(tmp_path, batch, n_low, coupling=None, ema=None):
    write_emt(tmp_path / 'low.extxyz', n_low, seed=1)
    write_emt(tmp_path / 'high.extxyz', 8, seed=2, fidelity='high')
    write_emt(tmp_path / 'low_valid.extxyz', 6, seed=3)
    write_emt(tmp_path / 'high_valid.extxyz', 4, seed=4, fidelity='high')
    return {
        'model': {
            'chemical_species': 'auto',
            'cutoff': 4.0,
            'channel': 8,
            'lmax': 1,
            'num_convolution_layer': 2,
            'is_parity': False,
            'weight_nn_hidden_neurons': [16, 16],
        },
        'train': {
            'random_seed': 5,
            'epoch': EPOCHS,
            'per_epoch': 100,
            'optimizer': 'adam',
            'optim_param': {'lr': 0.01},
            'scheduler': 'linearlr',
            'scheduler_param': {
                'start_factor': 1.0,
                'end_factor': 0.1,
                'total_iters': EPOCHS,
            },
            'loss': 'mse',
            'force_loss_weight': 0.1,
            'stress_loss_weight': 1e-3,
            'device': 'cpu',
            'best_fidelity': 'high',
            'coupling': coupling or {},
            'ema_decay': ema or 0.0,
        },
        'data': {
            'batch_size': batch,
            'databases': [
                {
                    'name': 'emt',
                    'fidelity': 'low',
                    'files': 'low.extxyz',
                    'validation': {'files': 'low_valid.extxyz'},
                },
                {
                    'name': 'emt_x1.1',
                    'fidelity': 'high',
                    'files': 'high.extxyz',
                    'weight': {'energy': 2.0},
                    'validation': {'files': 'high_valid.extxyz'},
                },
            ],
        },
    }


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(k, None)
    # own session: on a timeout the ranks (torchrun's children) go too
    p = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail('timed out:\n' + out.decode()[-4000:])
    assert p.returncode == 0, out.decode()[-4000:]
    return out.decode()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# 24 (even shards) / 25 (uneven: join) structures; with the parameter-space
# coupling (identical on every rank, so still exact) and the gap monitor
@pytest.mark.parametrize(
    'n_low,coupling,ema',
    [
        (16, None, None),
        (17, None, None),
        (16, {'anchor': 'low', 'parameter': 0.5, 'energy': 0, 'force': 0}, None),
        (17, None, 0.8),  # the weight average, with rank 0's extra steps
    ],
    ids=['even', 'uneven', 'coupled', 'uneven-ema'],
)
def test_two_gloo_ranks_match_one_process(tmp_path, n_low, coupling, ema):
    global_batch = 8
    (tmp_path / 'one.yaml').write_text(
        yaml.safe_dump(_raw(tmp_path, global_batch, n_low, coupling, ema))
    )
    (tmp_path / 'two.yaml').write_text(
        yaml.safe_dump(_raw(tmp_path, global_batch // 2, n_low, coupling, ema))
    )
    cli = ['-m', 'sevenn_mf.cli', 'train']
    _run([sys.executable] + cli + ['one.yaml', '-w', 'one', '-q'], tmp_path)
    _run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nnodes',
            '1',
            '--nproc_per_node',
            '2',
            '--rdzv_backend',
            'c10d',
            '--rdzv_endpoint',
            f'127.0.0.1:{_free_port()}',
        ]
        + cli
        + ['two.yaml', '-w', 'two', '-q'],
        tmp_path,
    )

    one, two = tmp_path / 'one', tmp_path / 'two'
    log = (two / 'log.sevenn_mf').read_text()
    assert 'distributed data parallel: 2 processes (gloo)' in log
    assert log.count('Epoch 1/') == 1  # rank 0 writes the log, rank 1 nothing

    # per-set errors from our all-reduced accumulators (metrics.csv) ...
    m1, m2 = _rows(one / 'metrics.csv'), _rows(two / 'metrics.csv')
    assert [(r['epoch'], r['set']) for r in m1] == [
        (r['epoch'], r['set']) for r in m2
    ]
    assert {r['set'] for r in m1} >= {
        'trainset',
        'validset',
        'low_validset',
        'high_validset',
    }
    gap_cols = [k for k in m1[0] if k.startswith('gap_')]
    assert gap_cols == [
        'gap_low_energy_mean',
        'gap_low_energy_sd',
        'gap_low_force_mean',
    ]
    for a, b in zip(m1, m2):
        for k in ('energy_rmse', 'force_rmse', 'stress_rmse', 'energy_mae'):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=REL), (a['set'], k)
        for k in gap_cols:  # the monitor gathers every rank's shard
            assert (a[k] == '') == (b[k] == ''), (a['set'], k)
            if a[k]:
                assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-3, abs=1e-3)
    # ... and sevenn's own (ErrorRecorder, all-reduced with ddp_reduce): the loss
    l1, l2 = _rows(next(one.glob('lc*.csv'))), _rows(next(two.glob('lc*.csv')))
    assert len(l1) == len(l2) == EPOCHS
    loss_cols = [k for k in l1[0] if 'TotalLoss' in k]
    assert 'trainset_TotalLoss' in ''.join(loss_cols)
    if (n_low + 8) % global_batch == 0:
        for a, b in zip(l1, l2):
            for k in loss_cols:
                assert float(b[k]) == pytest.approx(float(a[k]), rel=REL), k
    # the training changed the model, identically
    cp1 = torch.load(one / 'checkpoint_last.pth', weights_only=False)
    cp2 = torch.load(two / 'checkpoint_last.pth', weights_only=False)
    assert cp1['epoch'] == cp2['epoch'] == EPOCHS
    for k, v in cp1['model_state_dict'].items():
        assert torch.allclose(cp2['model_state_dict'][k], v, rtol=REL, atol=1e-6), k
    train_rmse = [float(r['force_rmse']) for r in m2 if r['set'] == 'trainset']
    assert train_rmse[-1] < train_rmse[0]  # it learned
    assert os.path.isfile(two / 'checkpoint_best.pth')
    if coupling:
        assert 'coupled heads high -> anchor low: parameter L2 high 0.5' in log
    if ema:
        assert 'weight average (ema_decay 0.8)' in log
        e1, e2 = cp1['sevenn_mf']['ema'], cp2['sevenn_mf']['ema']
        assert e1['updates'] == e2['updates'] > 0
        for k, v in e1['raw'].items():  # the raw weights, beside the average
            assert torch.allclose(e2['raw'][k], v, rtol=REL, atol=1e-6), k


def test_function_space_coupling_runs_under_ddp(tmp_path):
    """Copies in the batch under DDP: shards hold different numbers of
    low-fidelity structures, so this is not the single-process run exactly;
    it must run, and the penalties must be computed on every rank."""
    # every batch carries copies, so every epoch has both penalties on rank 0
    coupling = {'anchor': 'low', 'energy': 1.0, 'force': 0.5, 'fraction': 1.0}
    raw = _raw(tmp_path, 4, 17, coupling)
    # fidelity layers in the convolutions too: with the one-hot output block
    # alone the heads differ by a constant per atom, and there is no force gap
    raw['model'].update(
        use_modal_self_inter_intro=True,
        use_modal_self_inter_outro=True,
        use_modal_output_block=True,
    )
    (tmp_path / 'two.yaml').write_text(yaml.safe_dump(raw))
    _run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nnodes',
            '1',
            '--nproc_per_node',
            '2',
            '--rdzv_backend',
            'c10d',
            '--rdzv_endpoint',
            f'127.0.0.1:{_free_port()}',
            '-m',
            'sevenn_mf.cli',
            'train',
            'two.yaml',
            '-w',
            'two',
            '-q',
        ],
        tmp_path,
    )
    log = (tmp_path / 'two' / 'log.sevenn_mf').read_text()
    lines = [ln for ln in log.splitlines() if ln.startswith('coupling penalties')]
    assert len(lines) == EPOCHS
    for ln in lines:
        values = dict(part.split() for part in ln.split(': ', 1)[1].split(', '))
        assert sorted(values) == ['energy', 'force'], ln
        assert float(values['force']) > 0 and float(values['energy']) >= 0, ln
    rows = _rows(tmp_path / 'two' / 'metrics.csv')
    assert all(
        float(r['force_rmse']) == float(r['force_rmse']) for r in rows
    )  # finite
