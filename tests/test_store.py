"""data.storage: lmdb — the on-disk graph store (sevenn_mf.data.store)."""

import copy
import csv
import os
import pickle

import numpy as np
import pytest
import sevenn._keys as KEY
import torch
from ase.io import read, write
from emt_data import write_emt
from torch_geometric.loader import DataLoader

from sevenn_mf.config import config_from_dict
from sevenn_mf.data.databases import DataError, read_frames
from sevenn_mf.data.dataset import prepare_data
from sevenn_mf.data.graphs import build_graphs
from sevenn_mf.data.store import GraphStore, StoreSubset
from sevenn_mf.train import train

EPOCHS = 3


def _raw(tmp_path, storage='memory', store_dir=None, extra_db=False, coupling=None):
    if not (tmp_path / 'low.extxyz').exists():
        write_emt(tmp_path / 'low.extxyz', 20, seed=1)
        write_emt(tmp_path / 'high.extxyz', 10, seed=2, fidelity='high')
        write_emt(tmp_path / 'high_valid.extxyz', 3, seed=3, fidelity='high')
        write_emt(tmp_path / 'mid.extxyz', 6, seed=4)
    dbs = [
        {
            'name': 'emt',
            'fidelity': 'low',
            'files': 'low.extxyz',
            'validation': {'ratio': 0.2, 'seed': 2},
        },
        {
            'name': 'emt_x1.1',
            'fidelity': 'high',
            'files': 'high.extxyz',
            'weight': {'energy': 3.0},
            'validation': {'files': 'high_valid.extxyz'},
        },
    ]
    if extra_db:
        dbs.append({'name': 'emt_mid', 'fidelity': 'low', 'files': 'mid.extxyz'})
    data = {'batch_size': 4, 'databases': dbs, 'storage': storage}
    if store_dir:
        data['graph_store_dir'] = str(store_dir)
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
            'random_seed': 9,
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
            'coupling': coupling or {},
        },
        'data': data,
    }


def _config(tmp_path, **kw):
    return config_from_dict(_raw(tmp_path, **kw), base_dir=str(tmp_path))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    'coupling',
    [None, {'anchor': 'low', 'energy': 1.0, 'force': 0.5, 'fraction': 0.5}],
    ids=['plain', 'coupled'],
)
def test_training_from_store_matches_memory(tmp_path, coupling):
    """Same seed, same data: the same loss trajectory and the same model,
    also with coupled heads (copies of stored graphs in the batch).
    Tolerance rel 1e-6 (observed: identical; the graphs are the same tensors
    and the statistics the same arithmetic)."""
    train(_config(tmp_path, coupling=coupling), str(tmp_path / 'mem'), screen=False)
    train(
        _config(tmp_path, storage='lmdb', coupling=coupling),
        str(tmp_path / 'lmdb'),
        screen=False,
    )
    assert list((tmp_path / 'lmdb' / 'graph_store').glob('*.lmdb'))
    assert not (tmp_path / 'lmdb' / 'graph_cache').exists()
    m1 = _rows(tmp_path / 'mem' / 'metrics.csv')
    m2 = _rows(tmp_path / 'lmdb' / 'metrics.csv')
    assert len(m1) == len(m2) >= EPOCHS * 3
    for a, b in zip(m1, m2):
        assert (a['epoch'], a['set']) == (b['epoch'], b['set'])
        for k in (
            'energy_rmse',
            'force_rmse',
            'stress_rmse',
            'energy_mae',
            'force_mae',
        ):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-6), (a['set'], k)
    c1 = torch.load(tmp_path / 'mem' / 'checkpoint_last.pth', weights_only=False)
    c2 = torch.load(tmp_path / 'lmdb' / 'checkpoint_last.pth', weights_only=False)
    for k in (
        'shift',
        'scale',
        'conv_denominator',
        '_modal_map',
        'chemical_species',
    ):
        assert c1['config'][k] == c2['config'][k], k
    for k, v in c1['model_state_dict'].items():
        assert torch.allclose(c2['model_state_dict'][k], v, rtol=1e-6, atol=1e-7), k


def test_stored_graphs_are_the_in_memory_graphs(tmp_path):
    config = _config(tmp_path, storage='lmdb')
    data = prepare_data(config, str(tmp_path / 'wd'))
    db = data.databases[0]
    assert (
        isinstance(db.train, StoreSubset)
        and len(db.train) == 16
        and len(db.valid) == 4
    )
    frames = read_frames(str(tmp_path / 'low.extxyz'))
    ref = build_graphs(frames, 4.0, 'low')
    st = db.train.store
    for i in range(len(st)):
        g = StoreSubset(st, [i], 'low')[0]
        r = ref[i]
        assert sorted(g.keys()) == sorted(r.keys())
        for k in r.keys():
            if isinstance(r[k], torch.Tensor):
                assert g[k].dtype == r[k].dtype and torch.equal(
                    torch.nan_to_num(g[k]), torch.nan_to_num(r[k])
                ), k
            else:
                assert g[k] == r[k], k
    # the split is the in-memory split (same seed, same permutation of indices)
    mem = prepare_data(_config(tmp_path), str(tmp_path / 'wd_mem'))
    idx = [int(g[KEY.INFO]['frame']) for g in mem.databases[0].valid]
    assert idx == [int(g[KEY.INFO]['frame']) for g in data.databases[0].valid]
    for k in ('shift', 'scale', 'conv_denominator', 'is_train_stress'):
        assert data.config[k] == mem.config[k], k


def test_built_once_and_appending_a_database_rebuilds_nothing(tmp_path):
    store_dir = tmp_path / 'stores'
    logs = []
    prepare_data(
        _config(tmp_path, storage='lmdb', store_dir=store_dir),
        str(tmp_path / 'a'),
        log=logs.append,
    )
    built = {
        p.name: p.joinpath('data.mdb').stat().st_mtime_ns
        for p in store_dir.glob('*.lmdb')
    }
    assert len(built) == 3 and sum('graphs stored in' in m for m in logs) == 3

    logs.clear()
    prepare_data(
        _config(tmp_path, storage='lmdb', store_dir=store_dir, extra_db=True),
        str(tmp_path / 'b'),
        log=logs.append,
    )
    after = {
        p.name: p.joinpath('data.mdb').stat().st_mtime_ns
        for p in store_dir.glob('*.lmdb')
    }
    assert len(after) == 4
    assert {k: after[k] for k in built} == built  # untouched
    assert sum('graphs stored in' in m for m in logs) == 1  # only the new one
    assert sum('graphs from store' in m for m in logs) == 3

    # editing a file gives its database a new store (content-keyed); nothing stale
    frames = read(tmp_path / 'mid.extxyz', ':')
    write(tmp_path / 'mid.extxyz', frames[:5])
    data = prepare_data(
        _config(tmp_path, storage='lmdb', store_dir=store_dir, extra_db=True),
        str(tmp_path / 'c'),
    )
    assert len(data.databases[2].train) == 5
    assert len(list(store_dir.glob('*.lmdb'))) == 5
    assert not list(store_dir.glob('.*.tmp'))


def test_bad_frame_names_file_and_frame_and_leaves_no_store(tmp_path):
    raw = _raw(tmp_path, storage='lmdb', store_dir=tmp_path / 'stores')
    frames = read(tmp_path / 'low.extxyz', ':')
    frames[7].calc.results['forces'][2, 1] = np.inf
    frames[11].positions[1] = frames[11].positions[0] + [0.1, 0.0, 0.1]
    write(tmp_path / 'low.extxyz', frames)
    config = config_from_dict(raw, base_dir=str(tmp_path))
    with pytest.raises(
        DataError,
        match=r'2 problems(.|\n)*low.extxyz, frame 7: forces '
        r'contain inf(.|\n)*low.extxyz, frame 11: atoms 0 and 1',
    ):
        prepare_data(config, str(tmp_path / 'wd'))
    assert not os.listdir(tmp_path / 'stores')  # neither a store nor a temporary

    raw = _raw(tmp_path, storage='lmdb')
    raw['model']['chemical_species'] = ['Cu']
    write_emt(tmp_path / 'low.extxyz', 20, seed=1)
    with pytest.raises(DataError, match=r'low.extxyz, frame \d+: contains Ni'):
        prepare_data(
            config_from_dict(raw, base_dir=str(tmp_path)), str(tmp_path / 'w2')
        )


def test_lazy_open_per_worker_and_bounded_map(tmp_path):
    data = prepare_data(_config(tmp_path, storage='lmdb'), str(tmp_path / 'wd'))
    subset = data.databases[0].train
    store = subset.store
    clone = pickle.loads(pickle.dumps(subset))  # what a spawned worker receives
    assert torch.equal(clone[3][KEY.EDGE_VEC], subset[3][KEY.EDGE_VEC])

    def batches(workers):
        loader = DataLoader(subset, batch_size=5, num_workers=workers)
        return [(b[KEY.ENERGY].clone(), b[KEY.EDGE_VEC].clone()) for b in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 4
    for (e1, v1), (e2, v2) in zip(serial, parallel):
        assert torch.equal(e1, e2) and torch.equal(v1, v2)

    # a tiny mapped-bytes budget: the environment is reopened as reads go on,
    # and what is read does not change
    small = GraphStore(store.path, max_mapped_bytes=1)
    before = small.reopened
    n = len(small)
    read = [small.graph(k % n)[KEY.EDGE_VEC] for k in range(3 * 256 + 1)]
    assert small.reopened - before >= 2
    assert all(
        torch.equal(a, store.graph(k % n)[KEY.EDGE_VEC]) for k, a in enumerate(read)
    )


def test_parallel_build_equals_serial(tmp_path):
    raw = _raw(tmp_path, storage='lmdb', store_dir=tmp_path / 's1')
    d1 = prepare_data(
        config_from_dict(raw, base_dir=str(tmp_path)), str(tmp_path / 'a')
    )
    raw2 = copy.deepcopy(raw)
    raw2['data']['graph_store_dir'] = str(tmp_path / 's2')
    raw2['data']['preprocess_workers'] = 2
    d2 = prepare_data(
        config_from_dict(raw2, base_dir=str(tmp_path)), str(tmp_path / 'b')
    )
    for a, b in zip(d1.databases, d2.databases):
        for i in range(len(a.train)):
            assert torch.equal(a.train[i][KEY.EDGE_IDX], b.train[i][KEY.EDGE_IDX])
            assert torch.equal(a.train[i][KEY.FORCE], b.train[i][KEY.FORCE])
