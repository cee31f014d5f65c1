"""DatabaseSampler: requested database frequencies, determinism, rank shards,
and the ``data.sampling`` config reaching it."""

import numpy as np
import pytest
from scipy.stats import chisquare

from sevenn_mf.data.sampler import DatabaseSampler, ShardSampler

SIZES = [5000, 400, 25]  # a big LF database, a mid one, a tiny HF one
NAMES = ['mptrj', 'scan', 'ccsdt']
DRAWS = 20_000
# A correct sampler fails this at most 0.1% of the time; the seed is fixed, so
# the outcome is deterministic anyway.
P_MIN = 1e-3


def _db_of(indices, sizes=SIZES):
    edges = np.cumsum([0] + list(sizes))
    return np.searchsorted(edges, np.asarray(indices), side='right') - 1


def _counts(sampler, sizes=SIZES):
    return np.bincount(_db_of(list(sampler), sizes), minlength=len(sizes))


@pytest.mark.parametrize('temperature', [1.0, 2.0, 5.0])
def test_temperature_frequencies(temperature):
    s = DatabaseSampler(
        SIZES,
        mode='temperature',
        names=NAMES,
        temperature=temperature,
        epoch_length=DRAWS,
        seed=11,
    )
    w = np.array(SIZES, float) ** (1 / temperature)
    expected = w / w.sum()
    assert np.allclose(s.probabilities, expected)
    counts = _counts(s)
    assert counts.sum() == DRAWS == len(s)
    assert chisquare(counts, expected * DRAWS).pvalue > P_MIN
    # T=2 gives the 25-structure database sqrt-size weight: ~4.6x its share
    if temperature == 2.0:
        share = counts[2] / DRAWS
        assert share > 3 * SIZES[2] / sum(SIZES)


def test_explicit_frequencies():
    ratios = {'mptrj': 4, 'scan': 2, 'ccsdt': 1}
    s = DatabaseSampler(
        SIZES,
        mode='explicit',
        names=NAMES,
        ratios=ratios,
        epoch_length=DRAWS,
        seed=5,
    )
    counts = _counts(s)
    expected = np.array([4, 2, 1]) / 7
    assert chisquare(counts, expected * DRAWS).pvalue > P_MIN
    # each count within 4 binomial standard deviations as well
    sd = np.sqrt(DRAWS * expected * (1 - expected))
    assert np.all(np.abs(counts - expected * DRAWS) < 4 * sd)


def test_oversampled_database_cycles_through_all_before_repeating():
    # ccsdt (25 structures) is drawn ~2857 times: each structure 114-115 times,
    # and every window of 25 consecutive draws from it is a permutation
    s = DatabaseSampler(
        SIZES,
        mode='explicit',
        names=NAMES,
        ratios={'mptrj': 4, 'scan': 2, 'ccsdt': 1},
        epoch_length=DRAWS,
        seed=5,
    )
    order = np.array(list(s))
    small = order[_db_of(order) == 2] - sum(SIZES[:2])
    n_full = len(small) // 25
    for k in range(n_full):
        assert sorted(small[25 * k : 25 * (k + 1)]) == list(range(25))
    cnt = np.bincount(small, minlength=25)
    assert cnt.max() - cnt.min() <= 1


def test_proportional_visits_every_structure_once():
    s = DatabaseSampler(SIZES, names=NAMES, seed=3)
    order = list(s)
    assert len(order) == len(s) == sum(SIZES)
    assert sorted(order) == list(range(sum(SIZES)))
    assert order != list(range(sum(SIZES)))  # shuffled
    unshuffled = DatabaseSampler(SIZES, shuffle=False)
    assert list(unshuffled) == list(range(sum(SIZES)))


@pytest.mark.parametrize(
    'mode,kw',
    [
        ('proportional', {}),
        ('temperature', {'temperature': 2.0, 'epoch_length': 3000}),
        (
            'explicit',
            {'ratios': {'mptrj': 1, 'scan': 1, 'ccsdt': 1}, 'epoch_length': 3000},
        ),
    ],
)
def test_deterministic_from_seed_and_epoch(mode, kw):
    def order(seed, epoch):
        s = DatabaseSampler(SIZES, mode=mode, names=NAMES, seed=seed, **kw)
        s.set_epoch(epoch)
        return list(s)

    assert order(7, 3) == order(7, 3)  # a fresh sampler (a resumed run) repeats it
    assert order(7, 3) != order(7, 4)  # a new epoch, a new order
    assert order(7, 3) != order(8, 3)


@pytest.mark.parametrize('total_extra', [0, 1])
def test_proportional_rank_shards_partition_the_epoch(total_extra):
    sizes = [10, 7 + total_extra]  # 17 (odd) and 18 structures
    total = sum(sizes)
    shards = []
    for rank in range(2):
        s = DatabaseSampler(sizes, seed=4, num_replicas=2, rank=rank)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    a, b = map(set, shards)
    assert not a & b  # disjoint
    assert a | b == set(range(total))  # cover: nothing dropped
    assert len(shards[0]) + len(shards[1]) == total  # nothing repeated
    # interleaved shards of the single-process order: the ranks' k-th batches
    # (per-rank batch 2) form exactly the k-th batch of 4 of one process
    single = DatabaseSampler(sizes, seed=4)
    single.set_epoch(2)
    full = list(single)
    assert full[0::2] == shards[0] and full[1::2] == shards[1]
    for k in range(total // 4):
        assert sorted(
            shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2]
        ) == sorted(full[4 * k : 4 * k + 4])


def test_sampling_mode_rank_shards_are_disjoint_positions():
    kw = dict(
        mode='temperature', names=NAMES, temperature=2.0, epoch_length=1001, seed=9
    )
    shards = [
        list(DatabaseSampler(SIZES, num_replicas=3, rank=r, **kw)) for r in range(3)
    ]
    assert len({len(x) for x in shards}) == 1  # equal steps on every rank
    single = list(DatabaseSampler(SIZES, **kw))
    merged = [x for step in zip(*shards) for x in step]
    assert merged[:1001] == single  # rank r takes positions r, r+3, ...


def test_shard_sampler_partitions():
    parts = [list(ShardSampler(11, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert [len(ShardSampler(11, 3, r)) for r in range(3)] == [4, 4, 3]


@pytest.mark.parametrize(
    'kw,match',
    [
        ({'mode': 'random'}, 'sampling mode'),
        ({'mode': 'explicit'}, 'needs ratios'),
        ({'mode': 'explicit', 'ratios': {'mptrj': 1, 'scan': 1}}, 'missing'),
        (
            {
                'mode': 'explicit',
                'ratios': {'mptrj': 1, 'scan': 1, 'ccsdt': 1, 'x': 1},
            },
            'unknown',
        ),
        ({'mode': 'proportional', 'epoch_length': 10}, 'proportional'),
        ({'rank': 2, 'num_replicas': 2}, 'rank 2'),
    ],
)
def test_bad_sampler_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DatabaseSampler(SIZES, names=NAMES, **kw)


def test_config_sampling_reaches_the_sampler(tmp_path):
    """``data.sampling`` survives sevenn's config parser; make_loaders pops
    ``mode`` and passes the other keys to the sampler."""
    import yaml

    from sevenn_mf.config import load_config
    from sevenn_mf.data.databases import DatabaseSpec
    from sevenn_mf.data.dataset import Database, TrainingData, make_loaders

    raw = {
        'model': {'chemical_species': ['Cu'], 'cutoff': 4.0},
        'train': {'random_seed': 21},
        'data': {
            'batch_size': 5,
            'sampling': {
                'mode': 'temperature',
                'temperature': 2.0,
                'epoch_length': 60,
            },
            'databases': [
                {'name': 'big', 'fidelity': 'lo', 'files': 'x'},
                {'name': 'small', 'fidelity': 'hi', 'files': 'x'},
            ],
        },
    }
    path = tmp_path / 'input.yaml'
    path.write_text(yaml.safe_dump(raw))
    config = load_config(str(path))
    assert config['sampling'] == raw['data']['sampling']

    dbs = [
        Database(DatabaseSpec('big', 'lo', []), train=list(range(400))),
        Database(DatabaseSpec('small', 'hi', []), train=list(range(400, 425))),
    ]
    data = TrainingData(config, dbs)
    sampler = make_loaders(data, config)['trainset'].sampler
    assert (sampler.mode, sampler.epoch_length, sampler.seed) == (
        'temperature',
        60,
        21,
    )
    assert sampler.names == ['big', 'small']
    assert np.allclose(sampler.probabilities, [20 / 25, 5 / 25])
    assert config['sampling']['mode'] == 'temperature'  # the config is not consumed
    loader = make_loaders(data, config)['trainset']
    assert len(loader) == 12  # 60 / 5 batches

    config['sampling'] = {
        'mode': 'explicit',
        'ratios': {'big': 1, 'small': 3},
        'epoch_length': 40,
    }
    sampler = make_loaders(data, config, rank=1, world_size=2)['trainset'].sampler
    assert sampler.mode == 'explicit' and (sampler.rank, sampler.num_replicas) == (
        1,
        2,
    )
    assert np.allclose(sampler.probabilities, [0.25, 0.75]) and len(sampler) == 20
