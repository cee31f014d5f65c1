"""Data layer: database specs, labelled frames, sevenn graphs, references."""

from .databases import (
    DatabaseSpec,
    DataError,
    Frame,
    parse_databases,
    read_frames,
    validate_frames,
)
from .graphs import build_graphs, cache_key, split_validation
from .references import as_univ_list, fit_reference_energies, force_rms

__all__ = [
    'DataError',
    'DatabaseSpec',
    'Frame',
    'parse_databases',
    'read_frames',
    'validate_frames',
    'build_graphs',
    'cache_key',
    'split_validation',
    'fit_reference_energies',
    'force_rms',
    'as_univ_list',
]
