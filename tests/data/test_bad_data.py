"""Silent data problems (issue #12, part 6): each class of bad data is refused
at read time naming file and frame, or reported, in both storages.

Refused before any graph is built (memory: no graph cache is written; lmdb:
no store is committed): wrong-shaped labels, unparsable numbers, singular
periodic cells, xyz atom counts that do not match the atom lines. Refused
after the store's summaries exist (lmdb) or before the graphs (memory):
energy-per-atom outliers. Reported (warnings, label summary): missing force or
energy labels, elements without a reference at some fidelity, validation
structures identical to training ones.
"""

import warnings
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import QUICKSTART_DATA

from sevenn_mf.cli import main
from sevenn_mf.config import config_from_dict
from sevenn_mf.data.databases import DataError, parse_databases, read_frames
from sevenn_mf.data.dataset import prepare_data
from sevenn_mf.data.references import energy_outliers
from sevenn_mf.data.statistics import stress_slope_mismatch

STORAGES = ['memory', 'lmdb']
N_ATOMS = 4
PER_FRAME = N_ATOMS + 2  # lines of one extxyz frame
BAD = 3  # the frame made bad in each file (of 6)


# ---- helpers ---------------------------------------------------------------------
def emt_cells(n, seed=0, symbols=('Cu', 'Ni')):
    """Labelled 4-atom fcc cells (EMT energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = bulk('Cu', 'fcc', a=3.6, cubic=True)
        a.set_chemical_symbols(rng.choice(list(symbols), size=len(a)))
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        out.append(emt_labelled(a))
    return out


def emt_labelled(a, stress_sign=1.0):
    """``a`` with its EMT energy, forces and ``stress_sign`` x stress stored."""
    a.calc = EMT()
    e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
    a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=stress_sign * s)
    return a


def write(path, frames):
    ase.io.write(str(path), frames, format='extxyz')
    return Path(path)


def edit_frame(path, fn):
    """Apply ``fn`` to the lines (header, comment, atoms) of frame BAD."""
    lines = Path(path).read_text().splitlines()
    start = BAD * PER_FRAME
    lines[start : start + PER_FRAME] = fn(lines[start : start + PER_FRAME])
    Path(path).write_text('\n'.join(lines) + '\n')
    return Path(path)


def raw_config(dbs, storage='memory'):
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
        'train': {'epoch': 1, 'device': 'cpu', 'random_seed': 1},
        'data': {'batch_size': 2, 'databases': dbs, 'storage': storage},
    }


def prepare(tmp_path, dbs, storage='memory'):
    cfg = config_from_dict(raw_config(dbs, storage), base_dir=str(tmp_path))
    return prepare_data(cfg, str(tmp_path / 'run'), log=lambda s: None)


def db(files, name='d', fidelity='low', **kw):
    return {'name': name, 'fidelity': fidelity, 'files': files, **kw}


def assert_no_graphs(tmp_path):
    """Nothing was built: no graph cache entry and no complete store."""
    run = tmp_path / 'run'
    assert not list(run.glob('graph_cache/*.pt'))
    assert not list(run.glob('graph_store/*.lmdb'))


def refused(tmp_path, dbs, storage, match):
    with pytest.raises(DataError) as err:
        prepare(tmp_path, dbs, storage)
    msg = str(err.value)
    assert '\n' not in msg
    assert match in msg, msg
    return msg


# ---- 1. wrong-shaped labels ---------------------------------------------------
def _two_force_columns(lines):
    header = lines[1].replace('forces:R:3', 'forces:R:2')
    return [lines[0], header] + [' '.join(r.split()[:-1]) for r in lines[2:]]


@pytest.mark.parametrize('storage', STORAGES)
def test_forces_with_two_columns_refused_at_read(tmp_path, storage):
    path = edit_frame(
        write(tmp_path / 'f2.extxyz', emt_cells(6)), _two_force_columns
    )
    msg = refused(
        tmp_path, [db('f2.extxyz')], storage, f'{path}, frame {BAD}: forces have'
    )
    assert '(4, 2), expected (4, 3)' in msg
    assert_no_graphs(tmp_path)


@pytest.mark.parametrize(
    'key, value, reader_key, expected',
    [
        ('dft_forces', np.zeros((N_ATOMS, 2)), 'force_key', 'shape (4, 2)'),
        ('dft_stress', np.zeros(4), 'stress_key', 'shape (4,)'),
        ('dft_energy', np.zeros(2), 'energy_key', 'shape (2,)'),
    ],
)
def test_keyed_label_of_wrong_shape_refused(
    tmp_path, key, value, reader_key, expected
):
    frames = emt_cells(6)
    for i, a in enumerate(frames):
        good = {
            'dft_forces': a.get_forces(),
            'dft_stress': a.get_stress(),
            'dft_energy': a.get_potential_energy(),
        }[key]
        (a.arrays if key == 'dft_forces' else a.info)[key] = (
            value if i == BAD else good
        )
    path = write(tmp_path / 'keyed.extxyz', frames)
    msg = refused(
        tmp_path,
        [db('keyed.extxyz', reader={reader_key: key})],
        'memory',
        f'{path}, frame {BAD}: ',
    )
    assert f"key '{key}' has {expected}" in msg


# ---- 2. energy-per-atom outliers --------------------------------------------
def _with_outlier(tmp_path, name='out.extxyz', energy=1e10):
    frames = emt_cells(8, seed=4)
    frames[BAD].calc.results['energy'] = energy
    return write(tmp_path / name, frames)


@pytest.mark.parametrize('storage', STORAGES)
def test_energy_outlier_refused_naming_frame(tmp_path, storage):
    path = _with_outlier(tmp_path)
    msg = refused(
        tmp_path, [db('out.extxyz')], storage, f'{path}, frame {BAD}: energy'
    )
    assert 'allow_outliers: true' in msg and "database 'd'" in msg
    if storage == 'memory':
        assert_no_graphs(tmp_path)


@pytest.mark.parametrize('storage', STORAGES)
def test_outlier_in_validation_file_named(tmp_path, storage):
    write(tmp_path / 'train.extxyz', emt_cells(6, seed=1))
    path = _with_outlier(tmp_path, 'valid.extxyz', energy=-3e4)
    entry = db('train.extxyz', validation={'files': 'valid.extxyz'})
    refused(tmp_path, [entry], storage, f'{path}, frame {BAD}: energy -30000 eV')


@pytest.mark.parametrize('storage', STORAGES)
def test_allow_outliers_trains_on_them(tmp_path, storage):
    _with_outlier(tmp_path)
    data = prepare(tmp_path, [db('out.extxyz', allow_outliers=True)], storage)
    # what the check protects against: the least-squares references explode
    refs = np.asarray(data.config['shift']['low'])
    assert np.abs(refs).max() > 1e6


def test_outlier_threshold_key(tmp_path):
    # a 20 eV/atom shift of one frame passes the default 10 eV/atom floor
    # only when the threshold is raised above it
    frames = emt_cells(8, seed=4)
    frames[BAD].calc.results['energy'] += 20.0 * N_ATOMS
    path = write(tmp_path / 'shift.extxyz', frames)
    refused(tmp_path, [db('shift.extxyz')], 'memory', f'{path}, frame {BAD}')
    prepare(tmp_path, [db('shift.extxyz', outlier_threshold=50.0)], 'memory')


@pytest.mark.parametrize(
    'entry, expected',
    [
        ({'allow_outliers': 'yes'}, 'allow_outliers must be true or false'),
        ({'outlier_threshold': -1}, 'outlier_threshold must be a number > 0'),
    ],
)
def test_outlier_keys_validated(tmp_path, entry, expected):
    write(tmp_path / 'a.extxyz', emt_cells(1))
    with pytest.raises(DataError, match=expected):
        parse_databases([db('a.extxyz', **entry)], base_dir=str(tmp_path))


def test_no_outliers_in_real_ingan_data():
    """The bundled real InGaN cells (several compositions, PBE and r2SCAN)
    pass; one wrong energy among them is found, whichever frame it is."""
    for name in ('pbe.extxyz', 'r2scan.extxyz'):
        frames = read_frames(QUICKSTART_DATA / name)
        numbers = [f.numbers for f in frames]
        energies = np.array([f.energy for f in frames])
        assert len(energy_outliers(numbers, energies)[0]) == 0
        for bad in (0, len(frames) // 2, len(frames) - 1):
            e = energies.copy()
            e[bad] *= 27.2  # a frame in Hartree-sized numbers
            assert energy_outliers(numbers, e)[0].tolist() == [bad]


# ---- 3. label summary and missing labels ------------------------------------
def _forces_renamed(frames, key='dft_forces'):
    for a in frames:
        a.arrays[key] = a.get_forces()
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy())
    return frames


def _energy_renamed(frames, key='dft_energy'):
    for a in frames:
        a.info[key] = a.get_potential_energy()
        a.calc = SinglePointCalculator(a, forces=a.get_forces())
    return frames


@pytest.mark.parametrize('storage', STORAGES)
def test_misnamed_force_key_warned_and_summarised(tmp_path, storage):
    write(tmp_path / 'good.extxyz', emt_cells(6, seed=1))
    path = write(tmp_path / 'renamed.extxyz', _forces_renamed(emt_cells(6, seed=2)))
    dbs = [db('good.extxyz', name='good'), db('renamed.extxyz', name='renamed')]
    with pytest.warns(UserWarning) as record:
        data = prepare(tmp_path, dbs, storage)
    lines = [str(w.message) for w in record if 'no force labels' in str(w.message)]
    assert len(lines) == 1, lines
    assert f"database 'renamed' ({path}) has no force labels" in lines[0]
    assert "(database 'good' has)" in lines[0]
    assert 'reader: {force_key: dft_forces}' in lines[0]
    summary = data.label_summary().splitlines()
    assert summary[0].startswith('labels')
    good = next(r for r in summary if r.strip().startswith('good'))
    renamed = next(r for r in summary if r.strip().startswith('renamed'))
    assert '6 structures: energy 6, forces 6, stress 6; species Cu Ni' in good
    assert '6 structures: energy 6, forces 0, stress 0; species Cu Ni' in renamed
    # with the key set, the forces are read and nothing is said
    dbs[1]['reader'] = {'force_key': 'dft_forces'}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        data = prepare(tmp_path, dbs, storage)
    assert not [w for w in record if 'labels' in str(w.message)]
    assert 'forces 6' in data.label_summary().splitlines()[2]


def test_lone_database_with_force_like_key_warned(tmp_path):
    write(tmp_path / 'a.extxyz', _forces_renamed(emt_cells(6), key='F'))
    with pytest.warns(UserWarning, match=r'reader: \{force_key: F\}'):
        with pytest.raises(DataError, match='give data.scale a number'):
            prepare(tmp_path, [db('a.extxyz')], 'memory')


@pytest.mark.parametrize('storage', STORAGES)
def test_missing_energy_labels_warned(tmp_path, storage):
    write(tmp_path / 'good.extxyz', emt_cells(6, seed=1))
    write(tmp_path / 'noe.extxyz', _energy_renamed(emt_cells(6, seed=2)))
    dbs = [db('good.extxyz', name='good'), db('noe.extxyz', name='noe')]
    with pytest.warns(UserWarning) as record:
        data = prepare(tmp_path, dbs, storage)
    lines = [str(w.message) for w in record if 'no energy labels' in str(w.message)]
    assert len(lines) == 1 and 'reader: {energy_key: dft_energy}' in lines[0]
    assert 'it trains on forces only' in lines[0]
    assert 'energy 0, forces 6' in data.label_summary()


@pytest.mark.parametrize('storage', STORAGES)
def test_element_missing_at_one_fidelity_warned(tmp_path, storage):
    write(tmp_path / 'low.extxyz', emt_cells(6, seed=1))
    write(tmp_path / 'high.extxyz', emt_cells(6, seed=2, symbols=('Cu',)))
    dbs = [
        db('low.extxyz', name='lo'),
        db('high.extxyz', name='hi', fidelity='high'),
    ]
    with pytest.warns(UserWarning) as record:
        data = prepare(tmp_path, dbs, storage)
    lines = [str(w.message) for w in record if 'element Ni' in str(w.message)]
    assert len(lines) == 1, [str(w.message) for w in record]
    assert "fidelity 'low' but not of 'high'" in lines[0]
    assert 'is 0.0 eV' in lines[0]
    assert data.config['shift']['high'][28] == 0.0  # Ni
    # a reference given for it: nothing to say, and it is used
    raw = raw_config(dbs, storage)
    raw['data']['reference_energies'] = {'high': {'Ni': -1.5}}
    cfg = config_from_dict(raw, base_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        data = prepare_data(cfg, str(tmp_path / 'run2'), log=lambda s: None)
    assert not [w for w in record if 'element Ni' in str(w.message)]
    assert data.config['shift']['high'][28] == -1.5


# ---- 4. validation structures identical to training ones --------------------
@pytest.mark.parametrize('storage', STORAGES)
def test_validation_file_copies_of_training_structures(tmp_path, storage):
    train = emt_cells(6, seed=1)
    train_path = write(tmp_path / 'train.extxyz', train)
    valid = emt_cells(3, seed=2)
    valid[1] = train[4].copy()
    valid[1].calc = train[4].calc
    valid_path = write(tmp_path / 'valid.extxyz', valid)
    entry = db('train.extxyz', validation={'files': 'valid.extxyz'})
    with pytest.warns(UserWarning) as record:
        prepare(tmp_path, [entry], storage)
    lines = [str(w.message) for w in record if 'identical' in str(w.message)]
    assert len(lines) == 1
    assert "database 'd': 1 of its 3 validation structures" in lines[0]
    assert f'{valid_path}, frame 1 = {train_path}, frame 4' in lines[0]


@pytest.mark.parametrize('storage', STORAGES)
def test_duplicates_split_across_training_and_validation(tmp_path, storage):
    # two structures, four copies each: every validation structure has a twin
    a, b = emt_cells(2, seed=3)
    write(tmp_path / 'dup.extxyz', [a, b] * 4)
    entry = db('dup.extxyz', validation={'ratio': 0.25, 'seed': 0})
    with pytest.warns(UserWarning, match=r'2 of its 2 validation structures'):
        prepare(tmp_path, [entry], storage)


def test_distinct_structures_not_reported(tmp_path):
    write(tmp_path / 'a.extxyz', emt_cells(8, seed=5))
    entry = db('a.extxyz', validation={'ratio': 0.25, 'seed': 0})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        prepare(tmp_path, [entry], 'memory')
    assert not [w for w in record if 'identical' in str(w.message)]


# ---- 5. unreadable frames name file and frame -------------------------------
def _energy_abc(lines):
    import re

    return [lines[0], re.sub(r'energy=\S+', 'energy=abc', lines[1])] + lines[2:]


def _zero_volume(lines):
    import re

    flat = 'Lattice="3.6 0.0 0.0 0.0 3.6 0.0 0.0 0.0 0.0"'
    return [lines[0], re.sub(r'Lattice="[^"]*"', flat, lines[1])] + lines[2:]


def _count(n):
    return lambda lines: [str(n)] + lines[1:]


@pytest.mark.parametrize('storage', STORAGES)
@pytest.mark.parametrize(
    'edit, expected',
    [
        (_energy_abc, "energy 'abc' is not a number"),
        (_zero_volume, 'its cell is singular'),
        (_count(N_ATOMS + 1), 'header gives 5 atoms but only 4 atom lines follow'),
        (_count(N_ATOMS - 1), 'header gives 3 atoms but more atom lines follow'),
    ],
    ids=['energy_abc', 'zero_volume', 'count_too_large', 'count_too_small'],
)
def test_unreadable_frame_named(tmp_path, storage, edit, expected):
    path = edit_frame(write(tmp_path / 'bad.extxyz', emt_cells(6)), edit)
    msg = refused(tmp_path, [db('bad.extxyz')], storage, f'{path}, frame {BAD}: ')
    assert expected in msg
    assert_no_graphs(tmp_path)


@pytest.mark.parametrize('storage', STORAGES)
def test_several_bad_frames_reported_on_one_line(tmp_path, storage):
    frames = emt_cells(6)
    for i in (1, 4):
        frames[i].cell[2] = 0.0
    path = write(tmp_path / 'two.extxyz', frames)
    msg = refused(tmp_path, [db('two.extxyz')], storage, '2 problems in the data: ')
    assert f'{path}, frame 1: its cell is singular' in msg
    assert f'; {path}, frame 4: its cell is singular' in msg
    assert_no_graphs(tmp_path)


def test_count_error_in_first_and_last_frame(tmp_path):
    frames = emt_cells(6)
    path = write(tmp_path / 'c.extxyz', frames)
    lines = path.read_text().splitlines()
    first = [str(N_ATOMS + 2)] + lines[1:]
    path.write_text('\n'.join(first) + '\n')
    with pytest.raises(
        DataError, match=r'c\.extxyz, frame 0: cannot be read, its header gives 6'
    ):
        read_frames(path)
    last = lines[:-PER_FRAME] + [str(N_ATOMS + 1)] + lines[-PER_FRAME + 1 :]
    path.write_text('\n'.join(last) + '\n')
    with pytest.raises(DataError, match=r'c\.extxyz, frame 5: cannot be read'):
        read_frames(path)


# ---- CLI: one line, no traceback, nothing written ---------------------------
@pytest.mark.parametrize(
    'storage, make',
    [
        ('memory', lambda p: edit_frame(write(p, emt_cells(6)), _two_force_columns)),
        (
            'memory',
            lambda p: edit_frame(write(p, emt_cells(6)), _count(N_ATOMS + 1)),
        ),
        ('memory', lambda p: edit_frame(write(p, emt_cells(6)), _energy_abc)),
        ('lmdb', lambda p: _with_outlier(p.parent, p.name)),
    ],
    ids=['forces_r2', 'atom_count', 'energy_abc', 'outlier_lmdb'],
)
def test_cli_one_line_error(tmp_path, capsys, storage, make):
    path = make(tmp_path / 'bad.extxyz')
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(yaml.safe_dump(raw_config([db('bad.extxyz')], storage)))
    wd = tmp_path / 'wd'
    assert main(['train', str(cfg), '-w', str(wd)]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith('sevenn_mf train: error: ')
    assert f'{path}, frame {BAD}: ' in err[0]
    assert 'Traceback' not in err[0]
    assert not list(wd.glob('*.pth'))


def test_cli_logs_label_summary(tmp_path, capsys):
    write(tmp_path / 'a.extxyz', emt_cells(6, seed=1))
    write(tmp_path / 'b.extxyz', _forces_renamed(emt_cells(4, seed=2)))
    dbs = [db('a.extxyz', name='a'), db('b.extxyz', name='b', fidelity='high')]
    raw = raw_config(dbs)
    raw['train'].update(
        optimizer='adam',
        optim_param={'lr': 0.01},
        scheduler='linearlr',
        scheduler_param={'start_factor': 1.0, 'end_factor': 0.1, 'total_iters': 1},
    )
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(yaml.safe_dump(raw))
    wd = tmp_path / 'wd'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(['train', str(cfg), '-w', str(wd), '-q']) == 0
    log = (wd / 'log.sevenn_mf').read_text()
    lines = log.splitlines()
    head = lines.index('labels (structures with energy / forces / stress):')
    row = next(r for r in lines[head:] if r.strip().startswith('b '))
    assert '4 structures: energy 4, forces 0, stress 0; species Cu Ni' in row


# ---- 4. stress labels that contradict the energies ---------------------------
def compressed_cu(n, seed=0, stress_sign=1.0):
    """Pure Cu cells compressed by 1-4 % (EMT): the energy falls with volume
    and the stress (ASE sign, = dE/dV) is negative; ``stress_sign=-1`` writes
    the stresses of a code with the other sign convention."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = bulk('Cu', 'fcc', a=rng.uniform(3.45, 3.55), cubic=True)
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        out.append(emt_labelled(a, stress_sign))
    return out


def _stress_lines(record):
    return [
        str(w.message)
        for w in record
        if 'stress labels contradict' in str(w.message)
    ]


def test_stress_slope_of_consistent_labels_matches():
    frames = compressed_cu(16)
    args = (
        [a.numbers for a in frames],
        [a.get_potential_energy() for a in frames],
        [a.get_volume() for a in frames],
    )
    s = [a.get_stress()[:3].mean() for a in frames]
    f2 = [(a.get_forces() ** 2).sum() / len(a) for a in frames]
    assert np.mean(s) < -0.05  # compressed: a real signal to contradict
    assert stress_slope_mismatch(*args, s, f2) is None
    found = stress_slope_mismatch(*args, [-x for x in s], f2)
    assert found is not None and found['compositions'] == 1
    assert found['slope'] < 0 < found['stress']
    # the energies' own slope is the stress they imply, within its error
    assert abs(found['slope'] - np.mean(s)) < 4 * found['slope_se'] + 0.02


@pytest.mark.parametrize('storage', STORAGES)
def test_stress_contradicting_energies_warned(tmp_path, storage):
    """In memory from the frames, from an on-disk store from its summaries
    (volume and stress trace are stored with each structure)."""
    path = write(tmp_path / 'flipped.extxyz', compressed_cu(16, stress_sign=-1.0))
    write(tmp_path / 'good.extxyz', compressed_cu(16, seed=1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        prepare(tmp_path, [db('flipped.extxyz', name='flipped')], storage)
    lines = _stress_lines(record)
    assert len(lines) == 1, lines
    assert f"database 'flipped' ({path})" in lines[0]
    assert 'energy per atom falls with volume' in lines[0]
    assert 'weight: {stress: 0}' in lines[0]
    # consistent labels, a database that does not train stress, or a run that
    # does not: nothing said
    quiet = [
        ([db('good.extxyz', name='good')], {}),
        ([db('flipped.extxyz', name='flipped', weight={'stress': 0})], {}),
        ([db('flipped.extxyz', name='flipped')], {'stress_loss_weight': 0.0}),
    ]
    for dbs, train in quiet:
        raw = raw_config(dbs, storage)
        raw['train'].update(train)
        cfg = config_from_dict(raw, base_dir=str(tmp_path))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter('always')
            prepare_data(cfg, str(tmp_path / 'run'), log=lambda s: None)
        assert not _stress_lines(record), (dbs, train)


@pytest.mark.parametrize('storage', STORAGES)
def test_real_ingan_pbe_stress_flagged(shared_data, tmp_path, storage):
    """The project's InGaN PBE pool: its stresses say the energy rises with
    volume, its energies that it falls (docs/benchmarks.md, "InGaN stress
    labels"). A training run on it says so, naming the database."""
    pool = shared_data / 'ingan' / 'lf_train_pbe.extxyz'
    frames = read_frames(pool)
    found = stress_slope_mismatch(
        [f.numbers for f in frames],
        [f.energy for f in frames],
        [f.atoms.get_volume() for f in frames],
        [-f.stress[:3].mean() for f in frames],
        [(f.forces**2).sum() / len(f.numbers) for f in frames],
    )
    assert found is not None and found['compositions'] == 5
    assert found['slope'] < 0 < found['stress']
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        prepare(tmp_path, [db(str(pool), name='pbe_all_x')], storage)
    lines = _stress_lines(record)
    assert len(lines) == 1
    # the same fit from the store's summaries as from the frames
    assert f'{found["slope"]:+.3g} +- {found["slope_se"]:.2g} eV/A^3' in lines[0]
