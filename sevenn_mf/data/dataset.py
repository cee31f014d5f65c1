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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import ConcatDataset
from torch_geometric.loader import DataLoader

from .. import _sevenn as S
from .._sevenn import KEY
from . import graphs as G
from .cross_fidelity import CrossFidelityBatchSampler, CrossFidelityDataset
from .databases import (
    DatabaseSpec,
    DataError,
    frame_hash,
    label_candidates,
    parse_databases,
    read_frames,
    validate_frames,
)
from .sampler import DatabaseSampler, ShardSampler
from .statistics import (
    GraphSummary,
    LabelCounts,
    check_energy_outliers,
    fill_statistics,
    label_warnings,
    leak_pairs,
    stress_slope_line,
    stress_slope_warning,
    summarize,
)

Log = Callable[[str], None]


@dataclass
class Database:
    """One database's training and validation structures (graph lists, or
    store subsets with ``data.storage: lmdb``)."""

    spec: DatabaseSpec
    train: Any = field(default_factory=list)
    valid: Any = field(default_factory=list)
    # labels of all its structures (training and validation)
    labels: Optional[LabelCounts] = None


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

    def label_summary(self) -> str:
        """Per database: structures, how many have an energy / forces /
        stress label, and its elements (what training will learn from)."""
        rows = ['labels (structures with energy / forces / stress):']
        for db in self.databases:
            c = db.labels
            if c is None:
                c = LabelCounts()
                for part in (db.train, db.valid):
                    c.add_summaries(
                        part.summaries()
                        if hasattr(part, 'summaries')
                        else [summarize(g) for g in part]
                    )
            rows.append(
                f'  {db.spec.name:<24} fidelity {db.spec.fidelity:<10} '
                f'{c.structures:>6} structures: energy {c.energy}, forces '
                f'{c.force}, stress {c.stress}; species {c.species}'
            )
        return '\n'.join(rows)

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
    for spec in specs:
        if spec.role == 'test':
            raise DataError(
                f"database '{spec.name}' has role: test, which training never "
                'reads (test data must stay out of training and model choice): '
                'remove it and evaluate it with sevenn_mf evaluate'
            )
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
    for line in label_warnings([(db.spec, db.labels) for db in databases]):
        warnings.warn(line, stacklevel=2)
    fill_statistics(config, data, log)
    return data


class _Source:
    """The structures of one file set, and how to take a subset of them;
    ``hashes`` (structure identities), ``where`` (names structure i) and
    ``labels`` (:class:`LabelCounts`) serve the checks across structures."""

    def __init__(
        self,
        items: Any,
        take: Callable[[Any, Sequence[int]], Any],
        hashes: Sequence[int] = (),
        where: Callable[[int], str] = str,
        labels: Optional[LabelCounts] = None,
    ) -> None:
        self.items = items
        self.take = take
        self.hashes = hashes
        self.where = where
        self.labels = labels or LabelCounts()

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> Any:
        return self.take(self.items, list(indices))


def _split(
    spec: DatabaseSpec, main: _Source, valid: Optional[_Source], seed: int
) -> Database:
    """Training / validation parts of a database: role ``valid``, a separate
    validation file set, a random ratio, or none."""
    db = Database(spec, labels=copy.deepcopy(main.labels))
    everything = range(len(main))
    if valid is not None:
        db.labels.merge(valid.labels)
    if getattr(spec, 'role', 'train') == 'valid':
        db.valid = main.subset(everything)
    elif valid is not None:
        db.train = main.subset(everything)
        db.valid = valid.subset(range(len(valid)))
        _warn_leaks(spec, main, everything, valid, range(len(valid)))
    elif spec.validation and spec.validation.get('ratio'):
        tr, va = G.split_validation(
            everything,
            float(spec.validation['ratio']),
            int(spec.validation.get('seed', seed)),
        )
        db.train, db.valid = main.subset(tr), main.subset(va)
        _warn_leaks(spec, main, tr, main, va)
    else:
        db.train = main.subset(everything)
    return db


_LEAKS_SHOWN = 3


def _warn_leaks(
    spec: DatabaseSpec,
    train: _Source,
    tr: Sequence[int],
    valid: _Source,
    va: Sequence[int],
) -> None:
    """Validation structures identical to training ones make the validation
    loss (and so the best checkpoint) partly a training loss: report them."""
    if not len(train.hashes) or not len(valid.hashes) or not len(va):
        return
    tr, va = list(tr), list(va)
    pairs = leak_pairs([train.hashes[i] for i in tr], [valid.hashes[i] for i in va])
    if not pairs:
        return
    shown = '; '.join(
        f'{valid.where(va[v])} = {train.where(tr[t])}'
        for v, t in pairs[:_LEAKS_SHOWN]
    )
    more = len(pairs) - _LEAKS_SHOWN
    warnings.warn(
        f"database '{spec.name}': {len(pairs)} of its {len(va)} validation "
        'structures are identical to training structures, so the validation '
        f'loss and best checkpoint partly measure training data: {shown}'
        + (f' and {more} more' if more > 0 else ''),
        stacklevel=3,
    )


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
    for spec in specs:
        fs = frames[spec.name] + vframes.get(spec.name, [])
        check_energy_outliers(
            spec,
            [f.numbers for f in fs],
            [f.energy for f in fs],
            lambda i, fs=fs: fs[i].where,
        )
        line = trains_stress(config, spec) and stress_slope_warning(spec, fs)
        if line:
            warnings.warn(line, stacklevel=3)
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

    def source(spec, fs, desc):
        labels = LabelCounts()
        for f in fs:
            p = f.present
            labels.add(
                f.numbers, p['energy'], p['force'], p['stress'], label_candidates(f)
            )
        where = [f.where for f in fs]
        hashes = [frame_hash(f) for f in fs]
        return _Source(
            graphs(spec, fs, desc), _pick, hashes, where.__getitem__, labels
        )

    sources = {}
    for spec in specs:
        main = source(spec, frames[spec.name], spec.name)
        valid = None
        if spec.name in vframes:
            valid = source(spec, vframes[spec.name], f'{spec.name} (validation)')
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

    def source(store, take):
        labels = LabelCounts(**store.label_counts(), elements=set(store.elements))
        labels.add_candidates(store.label_candidates)
        return _Source(store, take, store.hashes(), store.where, labels)

    sources = {}
    for spec in specs:

        def take(store, idx, spec=spec):
            return StoreSubset(store, idx, spec.fidelity, spec.weight)

        main, valid = stores[spec.name]
        parts = [st for st in (main, valid) if st is not None]
        summaries = [s for st in parts for s in st.summaries()]
        check_energy_outliers(
            spec,
            [s.numbers for s in summaries],
            [s.energy for s in summaries],
            lambda i, main=main, valid=valid: (
                main.where(i) if i < len(main) else valid.where(i - len(main))
            ),
        )
        if trains_stress(config, spec):
            line = _store_stress_line(spec, parts)
            if line:
                warnings.warn(line, stacklevel=3)
        sources[spec.name] = (
            source(main, take),
            source(valid, take) if valid is not None else None,
        )
    return sources


def trains_stress(config: Dict[str, Any], spec: DatabaseSpec) -> bool:
    """Whether the run fits this database's stress labels (the one place
    that decides whether its stress labels are checked against its energies)."""
    return float(config.get(KEY.STRESS_WEIGHT, 1.0) or 0.0) > 0 and (
        spec.weight['stress'] > 0
    )


def _store_stress_line(spec: DatabaseSpec, stores) -> Optional[str]:
    parts = [st.stress_slope_inputs() for st in stores]
    merged = {
        k: [v for p in parts for v in p[k]] for k in parts[0] if k != 'force_sq'
    }
    fsq = [p['force_sq'] for p in parts]
    merged['force_sq'] = (
        None if any(f is None for f in fsq) else [v for f in fsq for v in f]
    )
    return stress_slope_line(spec, **merged)


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
    """A DataLoader that knows its name (per-fidelity metrics need it), its
    epoch sampler and its batch size (also when batches come from a batch
    sampler)."""

    def __init__(self, name: str, loader: DataLoader, sampler=None, batch_size=None):
        self.name = name
        self.loader = loader
        self.sampler = sampler if sampler is not None else loader.sampler
        self.batch_size = batch_size or loader.batch_size
        self._epoch_setters = [
            s
            for s in (self.sampler, getattr(loader, 'batch_sampler', None))
            if hasattr(s, 'set_epoch')
        ]

    def set_epoch(self, epoch: int) -> None:
        for s in self._epoch_setters:
            s.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_loaders(
    data: TrainingData,
    config: Dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    copies: Optional[Tuple[List[str], Dict[str, List[int]], float]] = None,
) -> Dict[str, NamedLoader]:
    """The training loader and the validation loaders. ``copies`` =
    (target fidelities, {source fidelity: target numbers}, fraction of
    batches): training batches also carry unlabelled copies of structures at
    other fidelities (:mod:`sevenn_mf.data.cross_fidelity`)."""
    batch = int(config[KEY.BATCH_SIZE])
    sampling = dict(config.get(S.SAMPLING) or {})
    train_dbs = [db for db in data.databases if len(db.train)]
    seed = int(config.get(KEY.RANDOM_SEED, 1))
    sampler = DatabaseSampler(
        [len(db.train) for db in train_dbs],
        mode=sampling.pop('mode', 'proportional'),
        names=[db.spec.name for db in train_dbs],
        seed=seed,
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
    if copies is None:
        loader = DataLoader(train, batch_size=batch, sampler=sampler, **extra)
    else:
        targets, copies_of, fraction = copies
        fidelity_of = [
            db.spec.fidelity for db in train_dbs for _ in range(len(db.train))
        ]
        batches = CrossFidelityBatchSampler(
            sampler, batch, fidelity_of, copies_of, fraction, seed
        )
        loader = DataLoader(
            CrossFidelityDataset(train, targets), batch_sampler=batches, **extra
        )
    loaders = {'trainset': NamedLoader('trainset', loader, sampler, batch)}
    for name, graphs in data.valid_sets().items():
        # under DDP each rank evaluates a disjoint shard; the errors are all-reduced
        shard = (
            ShardSampler(len(graphs), world_size, rank) if world_size > 1 else None
        )
        loaders[name] = NamedLoader(
            name, DataLoader(graphs, batch_size=batch, sampler=shard, **extra)
        )
    return loaders
