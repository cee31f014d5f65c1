"""The training data of a run: every database read, checked, turned into
graphs, split into training and validation, its statistics filled into the
config, and the loaders that feed sevenn's Trainer.

This is the data layer's public face; the training loop (``sevenn_mf.train``),
fine-tuning and the analysis tools call it and nothing below it:

* :func:`prepare_data` (config, working dir) -> :class:`TrainingData`: all
  input errors are raised here, before any model is built;
* :func:`make_loaders` (data, config) -> ``{name: NamedLoader}``: the training
  loader with sevenn_mf's :class:`~sevenn_mf.data.sampler.DatabaseSampler` and
  one validation loader per set (all, per fidelity, per database).

Two storages give the same :class:`TrainingData`: ``data.storage: memory``
(graph lists, content-keyed cache, :mod:`sevenn_mf.data.graphs`) and
``lmdb`` (on-disk graph stores, :mod:`sevenn_mf.data.store`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch.utils.data import ConcatDataset
from torch_geometric.loader import DataLoader

from .. import _sevenn as S
from .._sevenn import KEY
from . import graphs as G
from .databases import (
    DatabaseSpec,
    DataError,
    parse_databases,
    read_frames,
    validate_frames,
)
from .sampler import DatabaseSampler, ShardSampler
from .statistics import GraphSummary, fill_statistics, summarize

Log = Callable[[str], None]


@dataclass
class Database:
    """One database's training and validation structures (graph lists, or
    store subsets with ``data.storage: lmdb``)."""

    spec: DatabaseSpec
    train: Any = field(default_factory=list)
    valid: Any = field(default_factory=list)


@dataclass
class TrainingData:
    config: Dict[str, Any]
    databases: List[Database]

    @property
    def fidelities(self) -> List[str]:
        return list(self.config[S.FIDELITIES])

    def train_graphs(self) -> List[Any]:
        return [g for db in self.databases for g in db.train]

    def summaries(self, fidelity: Optional[str] = None) -> List[GraphSummary]:
        """Per-structure statistics inputs of the training structures (of one
        fidelity), in database order; from the store without reading graphs."""
        out: List[GraphSummary] = []
        for db in self.databases:
            if fidelity is None or db.spec.fidelity == fidelity:
                out.extend(
                    db.train.summaries()
                    if hasattr(db.train, 'summaries')
                    else [summarize(g) for g in db.train]
                )
        return out

    def valid_sets(self) -> Dict[str, Any]:
        """Loader name -> graphs: all, per fidelity, per database."""
        sets: Dict[str, Any] = {}
        everything = concat([db.valid for db in self.databases])
        if not len(everything):
            return sets
        sets['validset'] = everything
        for fid in self.fidelities:
            gs = concat(
                [db.valid for db in self.databases if db.spec.fidelity == fid]
            )
            if len(gs):
                sets[f'{fid}_validset'] = gs
        if len(self.databases) > len(self.fidelities):
            for db in self.databases:
                if len(db.valid):
                    sets[f'{db.spec.name}_db_validset'] = db.valid
        return sets


def concat(parts: Sequence[Any]) -> Any:
    """Graph lists stay a list; on-disk datasets (data.storage: lmdb) are
    concatenated lazily."""
    parts = [p for p in parts if len(p)]
    if all(isinstance(p, list) for p in parts):
        return [g for p in parts for g in p]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


# ---- assembly ----------------------------------------------------------------
def prepare_data(
    config: Dict[str, Any], working_dir: str, log: Log = print
) -> TrainingData:
    """Read, validate and graph all databases; fill the data-derived config
    (species, fidelities, references, scale, conv denominator). All input
    errors are raised here, before any model is built. The returned data's
    ``config`` is a completed copy of ``config``."""
    config = copy.deepcopy(config)
    base_dir = config.get('_base_dir', os.getcwd())
    specs = parse_databases(config[S.DATABASES], base_dir)
    resolve_fidelities(config, specs)
    if config.get(S.STORAGE, 'memory') == 'lmdb':
        sources = _store_sources(config, specs, working_dir, log)
    else:
        sources = _memory_sources(config, specs, working_dir)
    seed = int(config.get(KEY.RANDOM_SEED, 1))
    databases = [_split(spec, *sources[spec.name], seed) for spec in specs]
    data = TrainingData(config, databases)
    if not any(len(db.train) for db in databases):
        raise DataError('no training structures: every database is validation-only')
    fill_statistics(config, data, log)
    return data


class _Source:
    """The structures of one file set, and how to take a subset of them."""

    def __init__(
        self, items: Any, take: Callable[[Any, Sequence[int]], Any]
    ) -> None:
        self.items = items
        self.take = take

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> Any:
        return self.take(self.items, list(indices))


def _split(
    spec: DatabaseSpec, main: _Source, valid: Optional[_Source], seed: int
) -> Database:
    """Training / validation parts of a database: role ``valid``, a separate
    validation file set, a random ratio, or none."""
    db = Database(spec)
    everything = range(len(main))
    if getattr(spec, 'role', 'train') == 'valid':
        db.valid = main.subset(everything)
    elif valid is not None:
        db.train = main.subset(everything)
        db.valid = valid.subset(range(len(valid)))
    elif spec.validation and spec.validation.get('ratio'):
        tr, va = G.split_validation(
            everything,
            float(spec.validation['ratio']),
            int(spec.validation.get('seed', seed)),
        )
        db.train, db.valid = main.subset(tr), main.subset(va)
    else:
        db.train = main.subset(everything)
    return db


def _validation_spec(spec: DatabaseSpec) -> Optional[DatabaseSpec]:
    vfiles = (spec.validation or {}).get('files')
    if not vfiles:
        return None
    vspec = copy.deepcopy(spec)
    vspec.files = list(vfiles)
    vspec.validation = None
    vspec.name = f'{spec.name} (validation)'
    return vspec


def _pick(items: List[Any], indices: Sequence[int]) -> List[Any]:
    return [items[i] for i in indices]


def _memory_sources(
    config: Dict[str, Any], specs: List[DatabaseSpec], working_dir: str
):
    """Graph lists: every file read and validated first (errors surface
    before long work), then graphs built or taken from the cache."""
    frames, vframes = {}, {}
    for spec in specs:
        frames[spec.name] = read_frames(spec)
        vspec = _validation_spec(spec)
        if vspec is not None:
            vframes[spec.name] = read_frames(vspec)
    chem = config[KEY.CHEMICAL_SPECIES]
    auto = isinstance(chem, str) and chem.lower() == 'auto'
    known = None if auto else list(chem)
    for part in (frames, vframes):
        for fs in part.values():
            validate_frames(fs, species=known)
    if auto:
        numbers = {
            int(z)
            for part in (frames, vframes)
            for fs in part.values()
            for fr in fs
            for z in fr.numbers
        }
        _set_species(config, numbers)

    cutoff = float(config[KEY.CUTOFF])
    cache_dir = config.get('graph_cache_dir') or os.path.join(
        working_dir, 'graph_cache'
    )

    def graphs(spec, fs, desc):
        return G.build_graphs(
            fs, cutoff, spec.fidelity, spec.weight, cache_dir=cache_dir, desc=desc
        )

    sources = {}
    for spec in specs:
        main = _Source(graphs(spec, frames[spec.name], spec.name), _pick)
        valid = None
        if spec.name in vframes:
            desc = f'{spec.name} (validation)'
            valid = _Source(graphs(spec, vframes[spec.name], desc), _pick)
        sources[spec.name] = (main, valid)
    return sources


def _store_sources(
    config: Dict[str, Any], specs: List[DatabaseSpec], working_dir: str, log: Log
):
    """On-disk stores (built once per database, checked while built)."""
    from ase.data import chemical_symbols

    from .store import StoreSubset, open_store

    base_dir = config.get('_base_dir', os.getcwd())
    cutoff = float(config[KEY.CUTOFF])
    store_dir = config.get(S.GRAPH_STORE_DIR) or os.path.join(
        working_dir, 'graph_store'
    )
    if not os.path.isabs(store_dir):
        store_dir = os.path.join(base_dir, store_dir)
    workers = max(1, int(config.get(S.PREPROCESS_WORKERS, 1) or 1))
    stores = {}
    for spec in specs:
        main = open_store(spec, cutoff, store_dir, workers, log)
        vspec = _validation_spec(spec)
        valid = open_store(vspec, cutoff, store_dir, workers, log) if vspec else None
        stores[spec.name] = (main, valid)

    everything = [st for pair in stores.values() for st in pair if st is not None]
    chem = config[KEY.CHEMICAL_SPECIES]
    if isinstance(chem, str) and chem.lower() == 'auto':
        _set_species(config, {z for st in everything for z in st.elements})
    else:
        known = {
            chemical_symbols.index(s) if isinstance(s, str) else int(s) for s in chem
        }
        for st in everything:
            unknown = sorted(set(st.elements) - known)
            if unknown:
                names = ', '.join(chemical_symbols[z] for z in unknown)
                allowed = ', '.join(sorted(chemical_symbols[z] for z in known))
                raise DataError(
                    f'{st.meta["first_seen"][unknown[0]]}: contains {names}, '
                    f'which the model does not know (species: {allowed})'
                )

    sources = {}
    for spec in specs:

        def take(store, idx, spec=spec):
            return StoreSubset(store, idx, spec.fidelity, spec.weight)

        main, valid = stores[spec.name]
        sources[spec.name] = (
            _Source(main, take),
            _Source(valid, take) if valid is not None else None,
        )
    return sources


def _set_species(config: Dict[str, Any], numbers) -> None:
    from ase.data import chemical_symbols
    from sevenn.util import chemical_species_preprocess

    config.update(
        chemical_species_preprocess(sorted(chemical_symbols[z] for z in numbers))
    )


def resolve_fidelities(
    config: Dict[str, Any], specs: Sequence[DatabaseSpec]
) -> None:
    """The model's fidelities: ``model.fidelities`` if given (every database
    must use one of them), else the databases' in order of appearance."""
    from ..model import set_fidelities

    fids = list(config.get(S.FIDELITIES) or [])
    for spec in specs:
        if spec.fidelity not in fids:
            if config.get(S.FIDELITIES):
                raise DataError(
                    f"database '{spec.name}' has fidelity '{spec.fidelity}', which "
                    f'is not in model.fidelities ({", ".join(fids)})'
                )
            fids.append(spec.fidelity)
    set_fidelities(config, fids, config[S.FIDELITY_LAYER_MODE])


# ---- loaders -----------------------------------------------------------------
class NamedLoader:
    """A DataLoader that knows its name (per-fidelity metrics need it)."""

    def __init__(self, name: str, loader: DataLoader) -> None:
        self.name = name
        self.loader = loader
        self.sampler = loader.sampler

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_loaders(
    data: TrainingData, config: Dict[str, Any], rank: int = 0, world_size: int = 1
) -> Dict[str, NamedLoader]:
    batch = int(config[KEY.BATCH_SIZE])
    sampling = dict(config.get(S.SAMPLING) or {})
    train_dbs = [db for db in data.databases if len(db.train)]
    sampler = DatabaseSampler(
        [len(db.train) for db in train_dbs],
        mode=sampling.pop('mode', 'proportional'),
        names=[db.spec.name for db in train_dbs],
        seed=int(config.get(KEY.RANDOM_SEED, 1)),
        shuffle=bool(config.get(KEY.TRAIN_SHUFFLE, True)),
        num_replicas=world_size,
        rank=rank,
        **sampling,
    )
    train = concat([db.train for db in train_dbs])
    extra = {}
    workers = int(config.get(KEY.NUM_WORKERS, 0) or 0)
    if workers > 0:  # e.g. with data.storage: lmdb, workers read the store
        extra = {'num_workers': workers, 'persistent_workers': True}
    loaders = {
        'trainset': NamedLoader(
            'trainset', DataLoader(train, batch_size=batch, sampler=sampler, **extra)
        )
    }
    for name, graphs in data.valid_sets().items():
        # under DDP each rank evaluates a disjoint shard; the errors are all-reduced
        shard = (
            ShardSampler(len(graphs), world_size, rank) if world_size > 1 else None
        )
        loaders[name] = NamedLoader(
            name, DataLoader(graphs, batch_size=batch, sampler=shard, **extra)
        )
    return loaders
