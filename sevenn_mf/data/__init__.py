"""Data layer: everything from files to loaders; nothing here knows of models
or training.

``databases`` (YAML database specs, reading and checking files, frames) ->
``graphs`` (sevenn graphs, content-keyed cache) or ``store`` (on-disk LMDB
graph stores) -> ``statistics`` (per-fidelity references, force scale,
neighbour count) -> ``dataset`` (the training data of a run and its loaders,
the layer's entry point) with ``sampler`` (which structures an epoch visits).
"""

from .databases import (
    DatabaseSpec,
    DataError,
    Frame,
    parse_databases,
    read_frames,
    validate_frames,
)
from .dataset import Database, NamedLoader, TrainingData, make_loaders, prepare_data
from .graphs import build_graphs, cache_key, split_validation
from .references import as_univ_list, fit_reference_energies, force_rms

__all__ = [
    'DataError',
    'DatabaseSpec',
    'Frame',
    'parse_databases',
    'read_frames',
    'validate_frames',
    'Database',
    'NamedLoader',
    'TrainingData',
    'make_loaders',
    'prepare_data',
    'build_graphs',
    'cache_key',
    'split_validation',
    'fit_reference_energies',
    'force_rms',
    'as_univ_list',
]
