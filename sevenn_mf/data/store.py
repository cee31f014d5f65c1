"""Bounded-memory training data: one on-disk LMDB graph store per database.

``data.storage: lmdb`` replaces the in-memory graph lists by stores that
training streams from, so resident memory does not grow with the number of
structures:

* **Build once, per database.** A database's store is keyed, like the graph
  cache, by the content of its files (plus reader arguments, cutoff, sevenn
  version and the store format): ``<graph_store_dir>/<sha256>.lmdb``. It is
  built by streaming the files frame by frame (``ase.io.iread``), validating
  each frame (the same checks as in memory), building sevenn graphs in
  ``preprocess_workers`` processes and committing them in chunks, with a
  progress bar. It is written to a temporary folder and renamed when
  complete, so a crash or a bad frame never leaves a half store behind, and
  adding or editing one database never rebuilds the others.
* **Values** are pickled dicts of numpy arrays (floats as float32, integers
  as int32), turned into sevenn's ``AtomGraphData`` by sevenn's own
  ``AtomGraphData.from_numpy_dict`` when read: the same tensors, bit for bit,
  as the in-memory path builds. Fidelity and loss weights are attached when a
  graph is read, so they are not part of the store key.
* **Per-structure summaries** (atomic numbers, energy, sum of squared forces,
  edge and atom counts, whether stress is labelled; ~40 bytes per structure)
  are kept next to the graphs, so the statistics (per-fidelity element
  references, force RMS, average number of neighbours) are computed without
  reading a single graph, in exactly the same arithmetic as in memory.
* **Reading** opens the LMDB environment lazily in each process (DataLoader
  workers included) and reopens it after about ``max_mapped_bytes`` (64 MiB)
  of the store have been read through it, so the pages of the memory map a
  long epoch touches do not pile up in the process's resident set either
  (they stay in the kernel's page cache, shared and reclaimable).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import shutil
import tempfile
from array import array
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import ase.io
import numpy as np
import sevenn
from sevenn.atom_graph_data import AtomGraphData
from torch.utils.data import Dataset
from tqdm import tqdm

from .._sevenn import KEY
from .databases import (
    LABEL_KEYS,
    DatabaseSpec,
    DataError,
    Frame,
    file_digest,
    frame_hash,
    frame_problems,
    label_candidates,
    label_frame,
    read_error,
    read_file,
)
from .graphs import atoms_to_graph_dict, normalize_weight
from .statistics import GraphSummary, cell_terms, summarize, summary_of

# Bump when the stored value layout or the metadata changes.
STORE_FORMAT_VERSION = (
    3  # 2: structure hashes, label key candidates; 3: volume, stress trace
)
CHUNK = 512  # frames per worker round trip and per write transaction
DEFAULT_MAX_MAPPED_BYTES = 64 << 20
_META, _SUMMARY = b'__meta__', b'__summary__'
_MIN_DISTANCE = 0.5  # as validate_frames
_MAX_REPORTED = 20


def _lmdb():
    try:
        import lmdb
    except ImportError as e:  # pragma: no cover - install_requires has it
        raise ImportError(
            "data.storage: lmdb needs the 'lmdb' package (pip install lmdb)"
        ) from e
    return lmdb


def _key(i: int) -> bytes:
    return int(i).to_bytes(8, 'big')


# ---- summaries -----------------------------------------------------------------
_CELL_COLUMNS = ('volume', 'hydrostatic')  # of cell_terms, not of GraphSummary
_NO_CELL = (float('nan'), float('nan'))


class _SummaryColumns:
    def __init__(self) -> None:
        self.z = array('h')
        self.offsets = array('q', [0])
        self.hash = array('q')
        self.cols = {
            k: array(t)
            for k, t in (
                ('energy', 'd'),
                ('fsq', 'd'),
                ('fcount', 'q'),
                ('n_edges', 'q'),
                ('n_atoms', 'q'),
                ('stress_ok', 'b'),
                ('volume', 'd'),
                ('hydrostatic', 'd'),
            )
        }

    def add(
        self, s: GraphSummary, structure_hash: int, cell: Sequence[float]
    ) -> None:
        self.hash.append(structure_hash)
        for k, v in zip(_CELL_COLUMNS, cell):
            self.cols[k].append(v)
        self.z.extend(int(v) for v in s.numbers)
        self.offsets.append(len(self.z))
        for k, col in self.cols.items():
            if k not in _CELL_COLUMNS:
                col.append(getattr(s, k))

    def to_arrays(self) -> Dict[str, np.ndarray]:
        out = {
            'z': np.frombuffer(self.z, dtype=np.int16).copy(),
            'offsets': np.frombuffer(self.offsets, dtype=np.int64).copy(),
            'hash': np.frombuffer(self.hash, dtype=np.int64).copy(),
        }
        for k, col in self.cols.items():
            out[k] = np.array(col)
        return out


# ---- key -------------------------------------------------------------------------
def store_key(spec: DatabaseSpec, cutoff: float) -> str:
    """Content hash of what shapes a database's stored graphs."""
    reader = json.dumps(spec.reader, sort_keys=True, default=repr)
    sources = []
    for path in spec.files:
        if not os.path.isfile(path):
            raise DataError(f'{path}: no such file')
        # the path is part of the key because graphs record it in data_info
        sources.append([path, file_digest(path)])
    fields = {
        'format': STORE_FORMAT_VERSION,
        'sevenn': sevenn.__version__,
        'cutoff': float(cutoff),
        'reader': reader,
        'sources': sources,
        'min_distance': _MIN_DISTANCE,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# ---- build ------------------------------------------------------------------------
def iter_frames(spec: DatabaseSpec) -> Iterator[Frame]:
    """The frames of a database, one at a time (``index: ':'``; other
    selections and sevenn ``.pt`` files are read per file)."""
    kwargs = dict(spec.reader)
    kwargs.setdefault('index', ':')
    for path in spec.files:
        if kwargs['index'] != ':' or path.endswith('.pt'):
            yield from read_file(path, kwargs)
            continue
        if not os.path.isfile(path):
            raise DataError(f'{path}: no such file')
        if os.path.getsize(path) == 0:
            raise DataError(f'{path}: file is empty (no structures)')
        rk = dict(kwargs)
        rk.pop('index')
        keys = {label: rk.pop(k, None) for label, k in LABEL_KEYS.items()}
        n = 0
        it = ase.io.iread(path, index=':', **rk)
        while True:
            try:
                atoms = next(it)
            except StopIteration:
                break
            except Exception as e:
                raise read_error(path, n, e, rk.get('format')) from e
            yield label_frame(atoms, path, n, keys, kwargs)
            n += 1
        if n == 0:
            raise DataError(f"{path}: no structures in file (index=':')")


def _compact(d: Dict[str, Any]) -> Dict[str, Any]:
    """float64 -> float32 (what from_numpy_dict makes of it anyway), int64 ->
    int32 where it fits (from_numpy_dict casts back to int64)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            if np.issubdtype(v.dtype, np.floating):
                v = v.astype(np.float32)
            elif np.issubdtype(v.dtype, np.integer) and (
                v.size == 0 or np.abs(v).max() < 2**31 - 1
            ):
                v = v.astype(np.int32)
        out[k] = v
    return out


def _process(frame: Frame, cutoff: float):
    """Worker: (problems, pickled value, summary, structure hash, cell
    terms) of one frame."""
    problems = list(frame_problems(frame, None, _MIN_DISTANCE))
    if problems:
        return problems, None, None, None, None
    info = {'file': frame.file, 'frame': int(frame.index)}
    try:
        if frame.graph is not None:
            if frame.cutoff != cutoff:
                return (
                    [
                        f'{frame.where}: pre-built graph has cutoff {frame.cutoff}, '
                        f'not {cutoff}; rebuild it from the structures'
                    ],
                    None,
                    None,
                    None,
                    None,
                )
            g = frame.graph.clone()
            for k in (KEY.DATA_MODALITY, KEY.DATA_WEIGHT):
                if k in g:
                    del g[k]
            g[KEY.INFO] = info
            value = ('t', {k: g[k] for k in g.keys()})
            summary = summarize(g)
        else:
            d = _compact(atoms_to_graph_dict(frame.atoms, cutoff))
            d[KEY.INFO] = info
            value = ('n', d)
            summary = summary_of(
                d[KEY.ATOMIC_NUMBERS],
                d[KEY.ENERGY],
                d[KEY.FORCE],
                d[KEY.STRESS],
                d[KEY.EDGE_IDX].shape[1],
                d[KEY.NUM_ATOMS],
            )
    except Exception as e:
        return (
            [f'{frame.where}: cannot build a graph ({type(e).__name__}: {e})'],
            None,
            None,
            None,
            None,
        )
    blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return [], blob, summary, frame_hash(frame), cell_terms(frame) or _NO_CELL


def _raise_problems(problems: List[str], total: int) -> None:
    if total == 1:
        raise DataError(problems[0])
    more = total - len(problems)
    tail = [f'and {more} more'] if more else []
    raise DataError(f'{total} problems in the data: ' + '; '.join(problems + tail))


def _put(env, start: int, values: List[bytes]) -> None:
    lmdb = _lmdb()
    while True:
        try:
            with env.begin(write=True) as txn:
                for i, v in enumerate(values):
                    txn.put(_key(start + i), v)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()['map_size'] * 2)


def build_store(
    spec: DatabaseSpec,
    cutoff: float,
    path: str,
    num_workers: int = 1,
    log: Callable[[str], None] = print,
) -> None:
    """Stream ``spec``'s frames into a new store at ``path`` (atomically)."""
    lmdb = _lmdb()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(
        dir=folder, prefix='.' + os.path.basename(path), suffix='.tmp'
    )
    env = lmdb.open(
        tmp,
        map_size=64 << 20,
        subdir=True,
        meminit=False,
        readahead=False,
        sync=False,
        max_dbs=0,
    )
    pool = ProcessPoolExecutor(num_workers) if num_workers > 1 else None
    problems: List[str] = []
    n_problems = n = 0
    columns = _SummaryColumns()
    first_seen: Dict[int, str] = {}
    candidates: Dict[str, List[str]] = {}
    bar = tqdm(desc=f'{spec.name}: graphs', unit=' structures', disable=None)
    try:
        frames = iter_frames(spec)
        while True:
            chunk = list(itertools.islice(frames, CHUNK))
            if not chunk:
                break
            if pool is not None:
                size = max(1, len(chunk) // (4 * num_workers))
                results = pool.map(
                    _process, chunk, [cutoff] * len(chunk), chunksize=size
                )
            else:
                results = (_process(f, cutoff) for f in chunk)
            values = []
            for frame, (probs, value, summary, h, cell) in zip(chunk, results):
                if probs:
                    n_problems += len(probs)
                    problems.extend(probs[: _MAX_REPORTED - len(problems)])
                    continue
                values.append(value)
                columns.add(summary, h, cell)
                for label, keys in label_candidates(frame).items():
                    known = candidates.setdefault(label, [])
                    known.extend(k for k in keys if k not in known)
                for z in set(int(v) for v in summary.numbers):
                    first_seen.setdefault(z, frame.where)
            if not n_problems:
                _put(env, n, values)
            n += len(chunk)
            bar.update(len(chunk))
        if n_problems:
            _raise_problems(problems, n_problems)
        meta = {
            'format': STORE_FORMAT_VERSION,
            'n': n,
            'cutoff': float(cutoff),
            'name': spec.name,
            'files': list(spec.files),
            'reader': dict(spec.reader),
            'sevenn': sevenn.__version__,
            'elements': sorted(first_seen),
            'first_seen': first_seen,
            'label_candidates': candidates,
        }
        summary_blob = pickle.dumps(
            columns.to_arrays(), protocol=pickle.HIGHEST_PROTOCOL
        )
        while True:
            try:
                with env.begin(write=True) as txn:
                    txn.put(_SUMMARY, summary_blob)
                    txn.put(
                        _META, pickle.dumps(meta)
                    )  # last: marks a complete store
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()['map_size'] * 2)
        env.sync(True)
        env.close()
        env = None
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same store first
            if not is_complete(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if env is not None:
            env.close()
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log(f'{spec.name}: {n} graphs stored in {path}')


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, 'data.mdb'))


def open_store(
    spec: DatabaseSpec,
    cutoff: float,
    store_dir: str,
    num_workers: int = 1,
    log: Callable[[str], None] = print,
) -> GraphStore:
    """The database's store, built first if it does not exist yet."""
    path = os.path.join(store_dir, store_key(spec, cutoff) + '.lmdb')
    if not is_complete(path):
        build_store(spec, cutoff, path, num_workers, log)
    else:
        log(f'{spec.name}: graphs from store {path}')
    return GraphStore(path)


# ---- read -------------------------------------------------------------------------
def _resident_file_pages() -> Optional[int]:
    """Resident file-backed (shared) memory of this process in bytes (Linux),
    None where /proc is not there."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[2]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096
_CHECK_EVERY = 256  # reads between two looks at the resident set
_FAULT_AROUND = 64 << 10  # what a read can map where /proc is not available


class _Environments:
    """LMDB allows one open environment per path and process: every
    GraphStore of a path shares it. An environment is opened lazily in each
    process (never used across fork). When the pages mapped by reading have
    grown by more than ``budget`` bytes (resident file-backed memory, looked
    at every 256 reads; a read maps more than its value: the kernel maps
    neighbouring pages on a fault, so the bytes read undercount it), the
    process's environments are closed, which unmaps those pages, and reopen
    on the next read."""

    def __init__(self) -> None:
        self.open_envs: Dict[tuple, Any] = {}  # (pid, path) -> env
        self.reopened = 0
        self._reads = 0
        self._charged = 0
        self._baseline: Optional[int] = None

    def get(self, path: str, budget: int, nbytes: int = 0):
        self._reads += 1
        self._charged += max(nbytes, _FAULT_AROUND)
        if self._reads % _CHECK_EVERY == 0:
            now = _resident_file_pages()
            grown = self._charged if now is None else now - (self._baseline or now)
            if grown > budget:
                self._close_all()
        key = (os.getpid(), path)
        env = self.open_envs.get(key)
        if env is None:
            if not self.open_envs:
                self._baseline = _resident_file_pages()
                self._charged = 0
            env = _lmdb().open(
                path,
                readonly=True,
                lock=False,
                readahead=False,
                meminit=False,
                subdir=True,
                max_readers=512,
            )
            self.open_envs[key] = env
        return env

    def _close_all(self) -> None:
        pid = os.getpid()
        for key in [k for k in self.open_envs if k[0] == pid]:
            self.open_envs.pop(key).close()
        self.reopened += 1

    def close(self, path: str) -> None:
        env = self.open_envs.pop((os.getpid(), path), None)
        if env is not None:
            env.close()

    def after_fork_in_child(self) -> None:
        # Handles inherited over fork must not be used; with readonly and
        # lock=False there is no lock table, so closing them only unmaps (and
        # lets the child open its own: lmdb refuses a second open otherwise).
        pid = os.getpid()
        for key in [k for k in self.open_envs if k[0] != pid]:
            try:
                self.open_envs.pop(key).close()
            except Exception:
                pass


_ENVS = _Environments()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_ENVS.after_fork_in_child)


class GraphStore:
    """Read side of one store; safe to pickle into DataLoader workers (it
    holds no handle: environments are per process, see _Environments)."""

    def __init__(self, path: str, max_mapped_bytes: int = DEFAULT_MAX_MAPPED_BYTES):
        self.path = os.path.realpath(path)
        self.max_mapped_bytes = int(max_mapped_bytes)
        env = _ENVS.get(self.path, self.max_mapped_bytes)
        with env.begin() as txn:
            meta = txn.get(_META)
            if meta is None:
                raise DataError(f'{path}: incomplete graph store (no metadata)')
            self.meta = pickle.loads(meta)
            self._summary = pickle.loads(txn.get(_SUMMARY))
        if self.meta.get('format') != STORE_FORMAT_VERSION:
            raise DataError(
                f'{path}: graph store format {self.meta.get("format")}, '
                f'expected {STORE_FORMAT_VERSION}'
            )

    @property
    def reopened(self) -> int:
        """How often this process's stores were reopened to unmap pages."""
        return _ENVS.reopened

    def close(self) -> None:
        _ENVS.close(self.path)

    def __len__(self) -> int:
        return int(self.meta['n'])

    @property
    def elements(self) -> List[int]:
        return list(self.meta['elements'])

    def graph(self, i: int) -> AtomGraphData:
        if not 0 <= i < len(self):
            raise IndexError(i)
        with _ENVS.get(self.path, self.max_mapped_bytes).begin() as txn:
            buf = txn.get(_key(i))
        kind, d = pickle.loads(buf)
        if kind == 'n':
            return AtomGraphData.from_numpy_dict(d)
        return AtomGraphData(**d)

    def hashes(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """Structure identities (:func:`~sevenn_mf.data.databases.frame_hash`)."""
        h = self._summary['hash']
        return h if indices is None else h[np.asarray(indices, dtype=np.int64)]

    def where(self, i: int) -> str:
        """'file, frame k' of graph ``i`` (read from the graph's data_info)."""
        with _ENVS.get(self.path, self.max_mapped_bytes).begin() as txn:
            _, d = pickle.loads(txn.get(_key(int(i))))
        info = d[KEY.INFO]
        return f'{info["file"]}, frame {info["frame"]}'

    def label_counts(self) -> Dict[str, int]:
        """Structures, and how many have an energy / force / stress label."""
        s = self._summary
        return {
            'structures': len(self),
            'energy': int(np.isfinite(s['energy']).sum()),
            'force': int((s['fcount'] > 0).sum()),
            'stress': int(np.asarray(s['stress_ok'], dtype=bool).sum()),
        }

    @property
    def label_candidates(self) -> Dict[str, List[str]]:
        return dict(self.meta.get('label_candidates') or {})

    def stress_slope_inputs(self) -> Dict[str, Any]:
        """The structures the stress-label check can use (periodic, energy
        and stress labelled), as the arguments of
        :func:`sevenn_mf.data.statistics.stress_slope_line`."""
        s = self._summary
        use = np.nonzero(
            np.isfinite(s['volume'])
            & np.isfinite(s['hydrostatic'])
            & np.isfinite(s['energy'])
        )[0]
        off = s['offsets']
        has_f = bool(len(use)) and bool((s['fcount'][use] > 0).all())
        return {
            'numbers': [s['z'][off[i] : off[i + 1]] for i in use],
            'energies': s['energy'][use].tolist(),
            'volumes': s['volume'][use].tolist(),
            'hydrostatic': s['hydrostatic'][use].tolist(),
            'force_sq': (s['fsq'][use] / s['n_atoms'][use]).tolist()
            if has_f
            else None,
        }

    def summaries(
        self, indices: Optional[Sequence[int]] = None
    ) -> List[GraphSummary]:
        s = self._summary
        off = s['offsets']
        idx = range(len(self)) if indices is None else indices
        return [
            GraphSummary(
                s['z'][off[i] : off[i + 1]],
                float(s['energy'][i]),
                float(s['fsq'][i]),
                int(s['fcount'][i]),
                int(s['n_edges'][i]),
                int(s['n_atoms'][i]),
                bool(s['stress_ok'][i]),
            )
            for i in idx
        ]


class StoreSubset(Dataset):
    """Graphs ``indices`` of a store, tagged with fidelity and loss weights
    as :func:`sevenn_mf.data.graphs.build_graphs` tags in-memory graphs."""

    def __init__(
        self, store: GraphStore, indices: Sequence[int], fidelity: str, weight=None
    ) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.fidelity = fidelity
        self.weight = normalize_weight(weight)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> AtomGraphData:
        g = self.store.graph(int(self.indices[k]))
        g[KEY.DATA_MODALITY] = self.fidelity
        g[KEY.DATA_WEIGHT] = dict(self.weight)
        return g

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def summaries(self) -> List[GraphSummary]:
        return self.store.summaries(self.indices)
