"""Training databases: what the YAML names, what the files hold, and whether
it is fit to train on.

Everything here runs before any graph is built, so a bad file costs seconds,
not a crashed training run, and every complaint names the file and the frame
(frames are counted from 0, as ``ase.io.read``'s ``index`` counts them).

Labels follow sevenn's convention exactly, because the loss compares them
with sevenn's predictions: energy in eV, forces in eV/Å, stress in sevenn's
Voigt order and sign (taken through sevenn's own ``_set_atoms_y``). A label
that a structure does not have is NaN throughout ("partial labels"); sevenn's
loss skips NaN references, so absent labels are never treated as zero.
"""

from __future__ import annotations

import filecmp
import glob
import hashlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import ase.io
import numpy as np
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, chemical_symbols
from ase.neighborlist import neighbor_list
from ase.stress import full_3x3_to_voigt_6_stress
from ase.utils import string2index

from .. import _sevenn as S
from .._sevenn import KEY
from .files import publish
from .references import OUTLIER_FLOOR

LABELS = ('energy', 'force', 'stress')
ALLOWED_KEYS = (
    'name',
    'fidelity',
    'files',
    'weight',
    'validation',
    'reader',
    'role',
    'allow_outliers',
    'outlier_threshold',
)
ROLES = ('train', 'valid', 'test')
LABEL_KEYS = {'energy': 'energy_key', 'force': 'force_key', 'stress': 'stress_key'}
# Names under which ASE readers store each label in a SinglePointCalculator.
_CALC_NAMES = {
    'energy': ('energy', 'free_energy'),
    'force': ('forces',),
    'stress': ('stress',),
}
_MAX_REPORTED = 20


class DataError(ValueError):
    """Unusable training data; the message names the file (and frame)."""


# ---- database specs ------------------------------------------------------------
@dataclass
class DatabaseSpec:
    name: str
    fidelity: str
    files: List[str]
    weight: Dict[str, float] = field(
        default_factory=lambda: {k: 1.0 for k in LABELS}
    )
    # {'ratio': float, 'seed': int} or {'files': [absolute paths]}
    validation: Optional[dict] = None
    # ase.io.read kwargs plus optional energy_key/force_key/stress_key
    reader: dict = field(default_factory=lambda: {'index': ':'})
    role: str = 'train'
    # energy-per-atom outliers (see references.energy_outliers): refused
    # unless allowed; the threshold is the floor in eV/atom
    allow_outliers: bool = False
    outlier_threshold: float = OUTLIER_FLOOR


def parse_databases(raw: list, base_dir: str) -> List[DatabaseSpec]:
    """Turn the config's ``databases`` list into specs.

    Relative paths and globs are resolved against ``base_dir`` (the YAML's
    folder), so a config means the same thing from any working directory.
    """
    if not isinstance(raw, list) or not raw:
        raise DataError(
            f'databases must be a non-empty list of mappings, got {raw!r}'
        )
    specs = []
    for i, entry in enumerate(raw):
        specs.append(_parse_one(entry, i, base_dir))
    seen: Dict[str, int] = {}
    for spec in specs:
        seen[spec.name] = seen.get(spec.name, 0) + 1
    dups = sorted(n for n, c in seen.items() if c > 1)
    if dups:
        raise DataError(
            f'duplicate database name(s) {", ".join(map(repr, dups))}: '
            "give each database a unique 'name'"
        )
    return specs


def _parse_one(entry: Any, i: int, base_dir: str) -> DatabaseSpec:
    label = f'#{i + 1}'
    if not isinstance(entry, dict):
        raise DataError(f'database {label} must be a mapping, got {entry!r}')
    label = str(entry.get('name') or label)
    unknown = sorted(set(entry) - set(ALLOWED_KEYS))
    if unknown:
        raise DataError(
            f"database '{label}': unknown key(s) {', '.join(map(repr, unknown))};"
            f' allowed keys: {", ".join(ALLOWED_KEYS)}'
        )
    if entry.get('files') in (None, '', []):
        raise DataError(f"database '{label}' has no files")
    files = _expand_files(entry['files'], base_dir, label)
    # A default name from the file keeps one-file databases short to write.
    name = str(entry.get('name') or Path(files[0]).stem)
    fidelity = entry.get('fidelity')
    if fidelity is None or str(fidelity).strip() == '':
        raise DataError(f"database '{name}' has no fidelity")
    if not isinstance(fidelity, str):
        raise DataError(
            f"database '{name}': fidelity must be a string, got {fidelity!r}"
        )
    role = entry.get('role', 'train')
    if role not in ROLES:
        raise DataError(
            f"database '{name}': role {role!r} is not one of {', '.join(ROLES)}"
        )
    allow = entry.get('allow_outliers', False)
    if not isinstance(allow, bool):
        raise DataError(
            f"database '{name}': allow_outliers must be true or false, got {allow!r}"
        )
    threshold = entry.get('outlier_threshold', OUTLIER_FLOOR)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not np.isfinite(threshold)
        or threshold <= 0
    ):
        raise DataError(
            f"database '{name}': outlier_threshold must be a number > 0 "
            f'(eV/atom), got {threshold!r}'
        )
    return DatabaseSpec(
        name=name,
        fidelity=fidelity,
        files=files,
        weight=_parse_weight(entry.get('weight'), name),
        validation=_parse_validation(entry.get('validation'), base_dir, name, files),
        reader=_parse_reader(entry.get('reader'), name),
        role=role,
        allow_outliers=allow,
        outlier_threshold=float(threshold),
    )


def _expand_files(patterns: Any, base_dir: str, name: str) -> List[str]:
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not isinstance(patterns, list):
        raise DataError(
            f"database '{name}': files must be a path or a list of paths, "
            f'got {patterns!r}'
        )
    found = set()
    for pattern in patterns:
        path = os.path.expanduser(os.fspath(pattern))
        path = os.path.abspath(os.path.join(base_dir, path))
        matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise DataError(f"no file matches '{path}' (database '{name}')")
        found.update(os.path.abspath(p) for p in matches)
    return sorted(found)


def _parse_weight(raw: Any, name: str) -> Dict[str, float]:
    weight = {k: 1.0 for k in LABELS}
    if raw is None:
        return weight
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = {k: raw for k in LABELS}
    if not isinstance(raw, dict):
        raise DataError(
            f"database '{name}': weight must be a number or a mapping with keys "
            f'{", ".join(LABELS)}, got {raw!r}'
        )
    bad = sorted(set(raw) - set(LABELS))
    if bad:
        raise DataError(
            f"database '{name}': unknown weight key(s) {', '.join(map(repr, bad))};"
            f' allowed: {", ".join(LABELS)}'
        )
    for k, v in raw.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float('nan')
        if not np.isfinite(v) or v < 0:
            raise DataError(
                f"database '{name}': weight {k} must be a finite number >= 0, "
                f'got {raw[k]!r}'
            )
        weight[k] = v
    return weight


def _parse_validation(
    raw: Any, base_dir: str, name: str, train_files: List[str]
) -> Optional[dict]:
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = {'ratio': raw}
    if not isinstance(raw, dict) or (('ratio' in raw) == ('files' in raw)):
        raise DataError(
            f"database '{name}': validation must be {{ratio: r, seed: s}} or "
            f'{{files: [...]}}, got {raw!r}'
        )
    if 'files' in raw:
        if set(raw) != {'files'}:
            raise DataError(
                f"database '{name}': validation with files takes no other keys, "
                f'got {sorted(raw)}'
            )
        files = _expand_files(raw['files'], base_dir, name)
        shared = sorted(set(files) & set(train_files))
        if shared:
            raise DataError(
                f"database '{name}': {shared[0]} is both a training and a "
                'validation file'
            )
        return {'files': files}
    extra = sorted(set(raw) - {'ratio', 'seed'})
    if extra:
        raise DataError(
            f"database '{name}': unknown validation key(s) {extra}; "
            'allowed: ratio, seed (or files)'
        )
    ratio, seed = raw['ratio'], raw.get('seed', 0)
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise DataError(
            f"database '{name}': validation ratio must be in (0, 1), got {ratio!r}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(
            f"database '{name}': validation seed must be an integer, got {seed!r}"
        )
    return {'ratio': float(ratio), 'seed': seed}


def _parse_reader(raw: Any, name: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DataError(
            f"database '{name}': reader must be a mapping of ase.io.read "
            f'arguments, got {raw!r}'
        )
    reader = dict(raw)
    reader.setdefault('index', ':')
    for k in LABEL_KEYS.values():
        if k in reader and reader[k] is not None and not isinstance(reader[k], str):
            raise DataError(
                f"database '{name}': reader {k} must be a string, got {reader[k]!r}"
            )
    return reader


# ---- frames ----------------------------------------------------------------------
@dataclass(eq=False)
class Frame:
    """One structure with its labels and where it came from.

    Either ``atoms`` (labels stored by sevenn's ``_set_atoms_y`` as
    ``info['y_energy']``, ``arrays['y_force']``, ``info['y_stress']``) or, for
    sevenn's preprocessed ``.pt`` files, a ready ``graph`` built with
    ``cutoff``. ``present`` records which labels the source really had, so an
    explicit NaN in a file is told apart from an absent label.
    """

    file: str
    index: int
    atoms: Optional[Atoms] = None
    graph: Optional[Any] = None
    cutoff: Optional[float] = None
    present: Dict[str, bool] = field(default_factory=dict)
    reader: Dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f'{self.file}, frame {self.index}'

    @property
    def numbers(self) -> np.ndarray:
        if self.atoms is not None:
            return self.atoms.get_atomic_numbers()
        return _graph_array(self.graph, 'atomic_numbers').astype(int)

    @property
    def energy(self) -> float:
        if self.atoms is not None:
            return float(self.atoms.info['y_energy'])
        return float(_graph_array(self.graph, 'total_energy'))

    @property
    def forces(self) -> np.ndarray:
        if self.atoms is not None:
            return np.asarray(self.atoms.arrays['y_force'], dtype=float)
        return _graph_array(self.graph, 'force_of_atoms').reshape(-1, 3)

    @property
    def stress(self) -> np.ndarray:
        """Sevenn's order and sign: [xx, yy, zz, xy, yz, zx]."""
        if self.atoms is not None:
            return np.asarray(self.atoms.info['y_stress'], dtype=float).reshape(6)
        return _graph_array(self.graph, 'stress').reshape(-1)

    def label(self, name: str) -> np.ndarray:
        value = {'energy': self.energy, 'force': self.forces, 'stress': self.stress}
        return np.asarray(value[name], dtype=float)

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms,
        file: str = '<memory>',
        index: int = 0,
        energy_key: Optional[str] = None,
        force_key: Optional[str] = None,
        stress_key: Optional[str] = None,
    ) -> Frame:
        """Label a copy of ``atoms`` (the caller's object is left untouched)."""
        work = atoms.copy()
        work.calc = atoms.calc
        keys = {'energy': energy_key, 'force': force_key, 'stress': stress_key}
        return label_frame(work, file, index, keys, {})


def _graph_array(graph: Any, key: str) -> np.ndarray:
    return np.asarray(graph[key].detach().cpu().numpy(), dtype=float)


def read_frames(
    source: Union[str, os.PathLike, DatabaseSpec], **reader
) -> List[Frame]:
    """Read every structure of a database spec, or of one file.

    ``reader`` holds ``ase.io.read`` arguments (``index`` defaults to ':')
    plus the optional ``energy_key``/``force_key``/``stress_key``; for a spec
    they override ``spec.reader``. Unreadable, truncated or empty files raise
    :class:`DataError` naming the file and, where known, the frame.
    """
    if isinstance(source, DatabaseSpec):
        files, kwargs = source.files, {**source.reader, **reader}
    else:
        files, kwargs = [os.path.abspath(os.fspath(source))], dict(reader)
    kwargs.setdefault('index', ':')
    frames: List[Frame] = []
    for path in files:
        frames.extend(read_file(path, kwargs))
    return frames


def read_file(path: str, reader: dict) -> List[Frame]:
    if not os.path.isfile(path):
        raise DataError(f'{path}: no such file')
    if os.path.getsize(path) == 0:
        raise DataError(f'{path}: file is empty (no structures)')
    if path.endswith('.pt'):
        frames = _read_sevenn_graphs(path)
    else:
        frames = _read_ase(path, reader)
    if not frames:
        raise DataError(f'{path}: no structures in file (index={reader["index"]!r})')
    return frames


def _read_ase(path: str, reader: dict) -> List[Frame]:
    kwargs = dict(reader)
    index = kwargs.pop('index', ':')
    keys = {label: kwargs.pop(k, None) for label, k in LABEL_KEYS.items()}
    # Read everything and select afterwards, so that each frame keeps its
    # number in the file and a parse error can name the frame it hit.
    everything: List[Atoms] = []
    try:
        for atoms in ase.io.iread(path, index=':', **kwargs):
            everything.append(atoms)
    except Exception as e:
        raise read_error(path, len(everything), e, kwargs.get('format')) from e
    numbered = list(enumerate(everything))
    try:
        selection = string2index(index) if isinstance(index, str) else index
        chosen = numbered[selection]
    except (ValueError, IndexError, TypeError) as e:
        raise DataError(f'{path}: bad index {index!r} ({e})') from e
    if isinstance(selection, int):
        chosen = [chosen]
    return [label_frame(a, path, i, keys, reader) for i, a in chosen]


def read_error(
    path: str, n_read: int, exc: Exception, fmt: Optional[str] = None
) -> DataError:
    """The error for an exception from ``ase.io.iread`` after ``n_read``
    frames came out, naming the frame that caused it.

    ASE's (ext)xyz reader first scans the whole file for frame offsets, so an
    atom count that does not match the atom lines fails before frame 0 comes
    out; the file is then scanned here to find the frame."""
    kind = type(exc).__name__
    text = ' '.join(str(exc).split())
    if len(text) > 160:
        text = text[:157] + '...'
    if n_read == 0 and kind == 'UnknownFileTypeError':
        return DataError(f'{path}: cannot be read ({kind}: {text})')
    frame, reason = n_read, 'the file may be truncated or malformed'
    if _is_xyz(path, fmt):
        try:
            found = _xyz_layout_problem(path)
        except (OSError, UnicodeDecodeError):
            found = None
        # frames that did come out were read, so only a later one is at fault
        if found is not None and (n_read == 0 or found[0] == n_read):
            frame, reason = found
    return DataError(
        f'{path}, frame {frame}: cannot be read, {reason} ({kind}: {text})'
    )


def _is_xyz(path: str, fmt: Optional[str]) -> bool:
    if fmt is not None:
        return fmt in ('extxyz', 'xyz')
    return path.lower().endswith(('.xyz', '.extxyz'))


def _xyz_columns(comment: str) -> Optional[int]:
    """Columns of an atom line from the comment's Properties (None: plain
    xyz, or not parsable)."""
    from ase.io.extxyz import key_val_str_to_dict

    try:
        props = key_val_str_to_dict(comment).get('Properties')
        if not isinstance(props, str):
            return None
        fields = props.split(':')
        return sum(int(n) for n in fields[2::3])
    except Exception:
        return None


def _xyz_layout_problem(path: str):
    """(frame, what is wrong) for the first frame whose atom count does not
    match its atom lines, or None. Mirrors ASE's frame scan (a blank line ends
    the file, VEC lines may follow the atoms)."""
    with open(path) as f:
        frame, previous = 0, 0
        line = f.readline()
        while line.strip():
            try:
                natoms = int(line)
            except ValueError:
                if frame == 0:
                    return (
                        0,
                        f'its first line {line.strip()[:40]!r} is not an atom count',
                    )
                return frame - 1, (
                    f'its header gives {previous} atoms but more atom lines follow'
                )
            ncols = _xyz_columns(f.readline())
            for k in range(natoms):
                words = f.readline().split()
                if not words:
                    return frame, (
                        f'its header gives {natoms} atoms but the file ends after '
                        f'{k} atom lines (truncated?)'
                    )
                if len(words) == 1 and words[0].isdigit():
                    return frame, (
                        f'its header gives {natoms} atoms but only {k} atom lines '
                        'follow'
                    )
                if ncols is not None and len(words) != ncols:
                    return frame, (
                        f'atom line {k} has {len(words)} columns, its Properties '
                        f'give {ncols}'
                    )
            line = f.readline()
            while line.lstrip().startswith('VEC'):
                line = f.readline()
            previous = natoms
            frame += 1
    return None


def label_frame(
    atoms: Atoms, file: str, index: int, keys: Dict[str, Optional[str]], reader: dict
) -> Frame:
    where = f'{file}, frame {index}'
    calc = atoms.calc
    stored = calc.results if isinstance(calc, SinglePointCalculator) else None
    present: Dict[str, Optional[bool]] = {}
    use_keys: Dict[str, str] = {}
    try:
        for label in LABELS:
            key = keys.get(label)
            if key is None:
                if calc is None:
                    present[label] = False
                elif stored is not None:
                    present[label] = any(n in stored for n in _CALC_NAMES[label])
                else:  # a live calculator: known only once evaluated
                    present[label] = None
                continue
            value = _keyed_label(atoms, key, label, where)
            present[label] = value is not None
            if value is None:
                value = _nan_label(label, len(atoms))
            (atoms.arrays if label == 'force' else atoms.info)[key] = value
            use_keys[f'{label}_key'] = key
        # sevenn's _y_from_calc cannot handle a stored result without energy
        # (it raises); a NaN energy is exactly "absent" in its convention.
        injected = stored is not None and not any(
            n in stored for n in _CALC_NAMES['energy']
        )
        if injected:
            stored['energy'] = np.nan
        try:
            S.set_atoms_labels([atoms], **use_keys)
        finally:
            if injected:
                stored.pop('energy', None)
        _check_label_shapes(atoms, where)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f'{where}: cannot take labels ({type(e).__name__}: {e})'
        ) from e
    frame = Frame(file=file, index=index, atoms=atoms, reader=dict(reader))
    for label in LABELS:
        if present[label] is None:
            present[label] = not np.isnan(frame.label(label)).all()
    frame.present = {k: bool(v) for k, v in present.items()}
    return frame


def _check_label_shapes(atoms: Atoms, where: str) -> None:
    """Labels as numbers of the shapes sevenn's graphs need (a wrong shape
    would otherwise pass every check and fail inside the first epoch)."""
    n = len(atoms)
    expected = {'energy': (), 'force': (n, 3), 'stress': (6,)}
    stores = {'energy': atoms.info, 'force': atoms.arrays, 'stress': atoms.info}
    for label in LABELS:
        key = f'y_{label}'
        raw = stores[label][key]
        name = {'force': 'forces'}.get(label, label)
        try:
            value = np.asarray(raw, dtype=float)
        except (TypeError, ValueError):
            shown = raw if np.ndim(raw) == 0 else np.asarray(raw).ravel()[0]
            raise DataError(f'{where}: {name} {shown!r} is not a number') from None
        if label == 'energy' and value.size == 1:
            value = value.reshape(())
        if value.shape != expected[label]:
            want = {
                'energy': 'one number',
                'force': f'({n}, 3): one 3-vector per atom',
                'stress': '6 values (Voigt) or a 3x3 tensor',
            }[label]
            verb = 'have' if label == 'force' else 'has'
            raise DataError(
                f'{where}: {name} {verb} shape {value.shape}, expected {want}'
            )
        stores[label][key] = float(value) if label == 'energy' else value


def _keyed_label(
    atoms: Atoms, key: str, label: str, where: str
) -> Optional[np.ndarray]:
    """A label named by the user: info/arrays first, then the calculator
    (extxyz moves standard names such as 'energy' there). None if absent."""
    source = atoms.arrays if label == 'force' else atoms.info
    value = source.get(key)
    calc = atoms.calc
    if value is None and calc is not None:
        value = getattr(calc, 'results', {}).get(key)
    if value is None:
        return None
    try:
        value = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise DataError(f'{where}: {label} key {key!r} is not numeric') from None
    shape = value.shape
    if label == 'energy' and value.size == 1:
        return value.reshape(())
    if label == 'force' and shape == (len(atoms), 3):
        return value
    if label == 'stress' and value.size in (6, 9):
        if value.size == 9:
            # _set_atoms_y expects ASE's Voigt order for keyed stress.
            value = full_3x3_to_voigt_6_stress(value.reshape(3, 3))
        return value.reshape(6)
    want = {
        'energy': 'one number',
        'force': f'({len(atoms)}, 3): one 3-vector per atom',
        'stress': '6 values (Voigt) or a 3x3 tensor',
    }[label]
    raise DataError(
        f'{where}: {label} key {key!r} has shape {shape}, expected {want}'
    )


def _nan_label(label: str, n_atoms: int) -> np.ndarray:
    shape = {'energy': (), 'force': (n_atoms, 3), 'stress': (6,)}[label]
    return np.full(shape, np.nan)


def _read_sevenn_graphs(path: str) -> List[Frame]:
    meta_path = path[: -len('.pt')] + '.yaml'
    if not os.path.isfile(meta_path):
        raise DataError(
            f'{path}: sevenn graph file without its metadata {meta_path}; '
            'its cutoff is unknown (copy the whole sevenn_data folder)'
        )
    try:
        with open(meta_path) as f:
            cutoff = float(yaml.safe_load(f)['cutoff'])
        graphs = _load_sevenn_graphs(path, meta_path, cutoff)
    except Exception as e:
        raise DataError(
            f'{path}: cannot be read as a sevenn graph file ({type(e).__name__}: {e})'
        ) from e
    frames = []
    for i, graph in enumerate(graphs):
        frame = Frame(file=path, index=i, graph=graph, cutoff=cutoff)
        frame.present = {k: not np.isnan(frame.label(k)).all() for k in LABELS}
        frames.append(frame)
    return frames


def _load_sevenn_graphs(path: str, meta_path: str, cutoff: float) -> list:
    with warnings.catch_warnings():
        # PyG retries sevenn's pickled graphs without weights_only; harmless.
        warnings.filterwarnings('ignore', message='Weights only load failed')
        folder = os.path.dirname(path)
        if os.path.basename(folder) == 'sevenn_data':
            graphs = S.read_graph_file(path, cutoff)
        else:
            # sevenn only loads '<root>/sevenn_data/<name>.pt'; link it there.
            with tempfile.TemporaryDirectory() as tmp:
                linked = os.path.join(tmp, 'sevenn_data')
                os.makedirs(linked)
                for src in (path, meta_path):
                    os.symlink(src, os.path.join(linked, os.path.basename(src)))
                graphs = S.read_graph_file(
                    os.path.join(linked, os.path.basename(path)), cutoff
                )
    return graphs


# ---- validation ------------------------------------------------------------------
def validate_frames(
    frames: Iterable[Frame],
    species: Optional[Iterable[Union[str, int]]] = None,
    min_distance: float = 0.5,
) -> None:
    """Raise :class:`DataError` listing every unusable frame.

    Checks: a present label with NaN or inf (a label is complete or absent,
    never half NaN), no energy and no force label (nothing to learn), a
    singular periodic cell, atoms closer than ``min_distance`` Å (minimum
    image), and elements outside ``species`` when given.
    """
    frames = list(frames)
    if not frames:
        raise DataError('no structures to validate')
    known = None if species is None else _species_numbers(species)
    problems: List[str] = []
    for frame in frames:
        problems.extend(frame_problems(frame, known, min_distance))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        shown = problems[:_MAX_REPORTED]
        more = len(problems) - len(shown)
        tail = [f'and {more} more'] if more else []
        # one line: the CLI reports errors as one line
        raise DataError(
            f'{len(problems)} problems in the data: ' + '; '.join(shown + tail)
        )


def _species_numbers(species: Iterable[Union[str, int]]) -> set:
    out = set()
    for s in species:
        if isinstance(s, str):
            if s not in atomic_numbers:
                raise DataError(f'unknown element {s!r} in species')
            out.add(atomic_numbers[s])
        else:
            out.add(int(s))
    return out


def frame_problems(frame: Frame, known: Optional[set], min_distance: float):
    where = frame.where
    missing = []
    for label in LABELS:
        value = frame.label(label)
        nan, inf = np.isnan(value), np.isinf(value)
        name = {'force': 'forces'}.get(label, label)
        if inf.any():
            yield (
                f'{where}: {name} contain inf '
                f'({int(inf.sum())} of {value.size} values)'
            )
        if nan.all():
            if frame.present.get(label):
                yield f'{where}: {name} label is present but NaN'
            missing.append(label)
        elif nan.any():
            yield (
                f'{where}: {name} are NaN in {int(nan.sum())} of {value.size} values'
                ' (a label must be complete or absent)'
            )
    if 'energy' in missing and 'force' in missing:
        yield f'{where}: has neither an energy nor a force label (nothing to learn)'
    if frame.atoms is not None:
        singular = _singular_cell(frame.atoms)
        if singular:
            yield f'{where}: {singular}'
    numbers = frame.numbers
    if known is not None:
        unknown = sorted(set(int(z) for z in numbers) - known)
        if unknown:
            names = ', '.join(chemical_symbols[z] for z in unknown)
            allowed = ', '.join(sorted(chemical_symbols[z] for z in known))
            yield (
                f'{where}: contains {names}, which the model does not know '
                f'(species: {allowed})'
            )
    if min_distance > 0:
        close = _closest_pair(frame, min_distance)
        if close is not None:
            i, j, d = close
            pair = (
                f'atom {i} is {d:.2f} Å from its own periodic image'
                if i == j
                else f'atoms {i} and {j} are {d:.2f} Å apart'
            )
            yield f'{where}: {pair} (< {min_distance} Å)'


_SINGULAR_TOL = 1e-6  # Å (singular value) or Å^3 (volume)


def _singular_cell(atoms: Atoms) -> Optional[str]:
    """Why a periodic structure's cell cannot be used (sevenn's graph build
    inverts it), or None."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return None
    from ase.geometry import complete_cell

    cell = np.asarray(atoms.cell.array, dtype=float)
    flags = ''.join('T' if p else 'F' for p in pbc)
    periodic = cell[pbc]
    rank = int(np.sum(np.linalg.svd(periodic, compute_uv=False) > _SINGULAR_TOL))
    if rank < len(periodic):
        return (
            f'its cell is singular (zero volume): {rank} independent cell vectors '
            f'for {len(periodic)} periodic directions (pbc {flags})'
        )
    volume = abs(float(np.linalg.det(complete_cell(cell))))
    if volume < _SINGULAR_TOL:
        return f'its cell is singular (volume {volume:.3g} Å^3, pbc {flags})'
    return None


def _neighbor_list(atoms: Atoms, cutoff: float):
    # matscipy (sevenn's own optional neighbour list) is ~200x faster than
    # ASE on small periodic cells but needs a non-singular cell.
    if atoms.pbc.all():
        try:
            from matscipy.neighbours import neighbour_list

            return neighbour_list('ijd', atoms, cutoff)
        except ImportError:
            pass
    return neighbor_list('ijd', atoms, cutoff)


def _closest_pair(frame: Frame, min_distance: float):
    if frame.atoms is not None:
        try:
            i, j, d = _neighbor_list(frame.atoms, min_distance)
        except Exception:  # e.g. a degenerate periodic cell
            return None
    else:
        # Pre-built graphs hold every pair within the cutoff as an edge.
        vec = _graph_array(frame.graph, 'edge_vec').reshape(-1, 3)
        i, j = frame.graph['edge_index'].cpu().numpy()
        d = np.linalg.norm(vec, axis=1)
        keep = d < min_distance
        i, j, d = i[keep], j[keep], d[keep]
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    return int(min(i[k], j[k])), int(max(i[k], j[k])), float(d[k])


# ---- identity and names ------------------------------------------------------------
HASH_TOLERANCE = 1e-6  # Å: structures this close are the same structure


def frame_hash(frame: Frame) -> int:
    """Identity of a structure: species in order, cell, positions (rounded
    to ``HASH_TOLERANCE``) and pbc, as a signed 64-bit integer."""
    h = hashlib.blake2b(digest_size=8)
    if frame.atoms is not None:
        a = frame.atoms
        parts = [a.numbers, a.positions, a.cell.array, a.pbc]
    else:
        g = frame.graph
        parts = [frame.numbers, _graph_array(g, 'pos'), _graph_array(g, KEY.CELL)]
    for p in parts:
        p = np.asarray(p)
        if np.issubdtype(p.dtype, np.floating):
            p = np.rint(p / HASH_TOLERANCE)
        h.update(np.ascontiguousarray(p, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), 'big', signed=True)


# names under which files often hold a label that sevenn_mf does not read
_LOOKS_LIKE = {
    'force': re.compile(r'forc|grad|^f$|^f_|_f$', re.IGNORECASE),
    'energy': re.compile(r'energ|^e$|^e_|_e$|^etot', re.IGNORECASE),
}
_NOT_CANDIDATES = {'numbers', 'positions', 'y_force', 'y_energy', 'y_stress'}


def label_candidates(frame: Frame) -> Dict[str, List[str]]:
    """Keys of a frame that look like an energy (info, a number) or forces
    (arrays, one 3-vector per atom) under a name that was not read as one."""
    out: Dict[str, List[str]] = {'energy': [], 'force': []}
    if frame.atoms is None:
        return out
    a = frame.atoms
    for k, v in a.arrays.items():
        if k in _NOT_CANDIDATES or not _LOOKS_LIKE['force'].search(k):
            continue
        if np.shape(v) == (len(a), 3) and np.asarray(v).dtype.kind in 'fi':
            out['force'].append(k)
    for k, v in a.info.items():
        if k in _NOT_CANDIDATES or not _LOOKS_LIKE['energy'].search(k):
            continue
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            out['energy'].append(k)
    return out


# ---- files ---------------------------------------------------------------------
def file_digest(path: str) -> str:
    """sha256 of a file's bytes (keys caches, stores and method runs to their
    inputs' content)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


# ---- writing ---------------------------------------------------------------------
def write_extxyz(path: str, atoms_list: List[Atoms]) -> None:
    """Write structures (with their calculator's labels) to an extxyz file,
    atomically; a file whose content would not change is left as it is (its
    modification time too), so content-keyed caches stay valid."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.extxyz')
    os.close(fd)
    try:
        ase.io.write(tmp, list(atoms_list), format='extxyz')
        if os.path.isfile(path) and filecmp.cmp(path, tmp, shallow=False):
            os.unlink(tmp)
        else:
            publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
