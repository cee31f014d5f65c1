"""Frames -> sevenn graphs, tagged with fidelity and loss weights, cached.

Graphs are sevenn's own ``AtomGraphData`` built by sevenn's ``atoms_to_graph``,
so sevenn's model, loss and PyG collation take them unchanged. The cache is
keyed by the *content* of the source files (and everything else that shapes a
graph); an edited file therefore always gets new graphs, never stale ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import sevenn
import torch
from sevenn.atom_graph_data import AtomGraphData
from sevenn.train.dataload import atoms_to_graph
from tqdm import tqdm

from .._sevenn import KEY
from .databases import LABELS, DataError, Frame, file_digest
from .files import publish

# Bump when the graph layout or the cache file layout changes.
CACHE_FORMAT_VERSION = 1

log = logging.getLogger(__name__)
T = TypeVar('T')


def normalize_weight(
    weight: Union[float, Dict[str, float], None],
) -> Dict[str, float]:
    if weight is None:
        return {k: 1.0 for k in LABELS}
    if isinstance(weight, (int, float)):
        return {k: float(weight) for k in LABELS}
    out = {k: 1.0 for k in LABELS}
    out.update({k: float(v) for k, v in weight.items()})
    return out


def build_graphs(
    frames: Sequence[Frame],
    cutoff: float,
    fidelity: str,
    weight: Union[float, Dict[str, float], None] = None,
    cache_dir: Optional[str] = None,
    desc: Optional[str] = None,
    num_workers: int = 1,
) -> List[Any]:
    """Build one ``AtomGraphData`` per frame (validate the frames first).

    Each graph carries ``data_modality`` = ``fidelity`` (a str; PyG batches it
    into a list), ``data_weight`` = ``{'energy','force','stress'}`` floats
    (batched into 1-D tensors, what sevenn's loss reads with ``use_weight``)
    and ``data_info`` = ``{'file', 'frame'}``. Only these two info entries are
    kept: PyG collates info dicts key by key, so mixing databases whose extxyz
    info differs would fail to batch.

    With ``cache_dir``, graphs are stored in ``cache_dir/<sha256>.pt`` and
    loaded from there when file contents, cutoff, reader arguments, fidelity,
    weights and sevenn version all match.
    """
    frames = list(frames)
    weight = normalize_weight(weight)
    path = None
    if cache_dir is not None:
        key = cache_key(frames, cutoff, fidelity, weight)
        path = os.path.join(cache_dir, f'{key}.pt')
        graphs = _load_cache(path)
        if graphs is not None:
            log.info(
                'loaded %d %s graphs from cache %s', len(graphs), fidelity, path
            )
            return graphs
    graphs = _build(frames, cutoff, desc or f'graphs ({fidelity})', num_workers)
    for frame, graph in zip(frames, graphs):
        graph[KEY.DATA_MODALITY] = fidelity
        graph[KEY.DATA_WEIGHT] = dict(weight)
        graph[KEY.INFO] = {'file': frame.file, 'frame': int(frame.index)}
    if path is not None:
        _save_cache(path, graphs)
        log.info('cached %d %s graphs in %s', len(graphs), fidelity, path)
    return graphs


def _build(frames: List[Frame], cutoff: float, desc: str, num_workers: int):
    for frame in frames:
        if frame.graph is not None and frame.cutoff != cutoff:
            raise DataError(
                f'{frame.where}: pre-built graph has cutoff {frame.cutoff}, '
                f'not {cutoff}; rebuild it from the structures'
            )
    todo = [f for f in frames if f.graph is None]
    atoms = [f.atoms for f in todo]
    bar = dict(total=len(atoms), desc=desc, disable=None)
    if num_workers > 1 and len(atoms) > 1:
        chunk = max(1, len(atoms) // (4 * num_workers))
        with ProcessPoolExecutor(num_workers) as pool:
            dicts = list(
                tqdm(
                    pool.map(
                        _graph_dict_or_error,
                        atoms,
                        [cutoff] * len(atoms),
                        chunksize=chunk,
                    ),
                    **bar,
                )
            )
    else:
        dicts = [_graph_dict_or_error(a, cutoff) for a in tqdm(atoms, **bar)]
    for frame, d in zip(todo, dicts):
        if isinstance(d, str):  # the checks before should have caught it
            raise DataError(f'{frame.where}: cannot build a graph ({d})')
    built = iter(AtomGraphData.from_numpy_dict(d) for d in dicts)
    return [next(built) if f.graph is None else f.graph.clone() for f in frames]


def _graph_dict_or_error(atoms, cutoff: float) -> Union[dict, str]:
    try:
        return atoms_to_graph_dict(atoms, cutoff)
    except Exception as e:
        return f'{type(e).__name__}: {e}'


def atoms_to_graph_dict(atoms, cutoff: float) -> dict:
    # Top level so that worker processes can unpickle it.
    return atoms_to_graph(
        atoms, cutoff, transfer_info=False, y_from_calc=False, allow_unlabeled=True
    )


# ---- cache -----------------------------------------------------------------------
def cache_key(
    frames: Sequence[Frame], cutoff: float, fidelity: str, weight: Dict[str, float]
) -> str:
    sources: Dict[Tuple[str, str], int] = {}
    source_list, picked = [], []
    for frame in frames:
        reader = json.dumps(frame.reader, sort_keys=True, default=repr)
        ident = (frame.file, reader)
        if ident not in sources:
            sources[ident] = len(source_list)
            # the path is part of the key because graphs record it in data_info
            source_list.append([frame.file, _content_digest(frame), reader])
        # in-memory frames have no file to hash; hash them one by one
        index = frame.index if os.path.isfile(frame.file) else _frame_digest(frame)
        picked.append([sources[ident], index])
    fields = {
        'format': CACHE_FORMAT_VERSION,
        'sevenn': sevenn.__version__,
        'cutoff': float(cutoff),
        'fidelity': fidelity,
        'weight': {k: float(v) for k, v in sorted(normalize_weight(weight).items())},
        'sources': source_list,
        'frames': picked,
    }
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _content_digest(frame: Frame) -> str:
    return file_digest(frame.file) if os.path.isfile(frame.file) else 'memory'


def _frame_digest(frame: Frame) -> str:
    h = hashlib.sha256()
    a = frame.atoms
    parts = [frame.numbers, frame.label('energy'), frame.forces, frame.stress]
    if a is not None:
        parts += [a.positions, np.asarray(a.cell), a.pbc]
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def _pack(graphs: List[Any]) -> dict:
    """Column layout: one flat tensor per key plus a shape table, constants
    stored once. Loads several times faster than pickled Data objects, and
    with ``weights_only=True``."""
    keys = sorted({k for g in graphs for k in g.keys()})
    columns = {}
    for k in keys:
        values = [g[k] if k in g else None for g in graphs]
        if (
            all(isinstance(v, torch.Tensor) for v in values)
            and len({(v.dtype, v.dim()) for v in values}) == 1
        ):
            shapes = torch.tensor([list(v.shape) for v in values], dtype=torch.long)
            columns[k] = {
                'data': torch.cat([v.reshape(-1) for v in values]),
                'shapes': shapes.reshape(len(values), -1),
            }
        elif _all_equal(values):
            columns[k] = {'constant': values[0]}
        else:
            columns[k] = {'objects': values}
    return {'format': CACHE_FORMAT_VERSION, 'n': len(graphs), 'columns': columns}


def _all_equal(values: List[Any]) -> bool:
    if values[0] is None or any(isinstance(v, torch.Tensor) for v in values):
        return False
    try:
        return all(bool(v == values[0]) for v in values[1:])
    except (ValueError, RuntimeError):  # e.g. arrays inside, no plain truth value
        return False


def _unpack(packed: dict) -> List[Any]:
    n = packed['n']
    per_graph: List[Dict[str, Any]] = [{} for _ in range(n)]
    for k, col in packed['columns'].items():
        if 'data' in col:
            shapes = col['shapes']
            sizes = shapes.prod(dim=1).tolist()
            for d, part, shape in zip(
                per_graph, col['data'].split(sizes), shapes.tolist()
            ):
                d[k] = part.view(shape)
        elif 'constant' in col:
            for d in per_graph:
                d[k] = copy.deepcopy(col['constant'])
        else:
            for d, v in zip(per_graph, col['objects']):
                if v is not None:
                    d[k] = v
    return [AtomGraphData(**d) for d in per_graph]


def _load_cache(path: str) -> Optional[List[Any]]:
    if not os.path.isfile(path):
        return None
    try:
        packed = torch.load(path, map_location='cpu', weights_only=True)
        if packed.get('format') != CACHE_FORMAT_VERSION:
            return None
        return _unpack(packed)
    except Exception as e:  # a damaged cache entry only costs a rebuild
        log.warning('ignoring unreadable graph cache %s (%s)', path, e)
        return None


def _save_cache(path: str, graphs: List[Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # tmp + rename: a crash or a concurrent run never leaves half a file
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(_pack(graphs), f)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- split -----------------------------------------------------------------------
def split_validation(
    items: Sequence[T], ratio: float, seed: int = 0
) -> Tuple[List[T], List[T]]:
    """Random split, reproducible from ``seed``; both parts keep input order.

    At least one item goes to each side when there are two or more items.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f'validation ratio must be in [0, 1), got {ratio}')
    items = list(items)
    n = len(items)
    n_valid = int(round(ratio * n))
    if ratio > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_valid].tolist())
    train = [x for i, x in enumerate(items) if i not in chosen]
    valid = [x for i, x in enumerate(items) if i in chosen]
    return train, valid
