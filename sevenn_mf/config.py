"""Read a sevenn-style YAML (model / train / data) with the sevenn_mf keys.

sevenn's own parser validates and default-fills every section (our keys are
registered with it by :mod:`sevenn_mf._sevenn`). Two ways to name data:

* ``data.databases``: a list of databases, each with a fidelity (ours);
* sevenn's multi-modal ``load_*_path`` lists of ``{data_modality, file_list,
  data_weight}`` dicts (as in sevenn's ``multi_modal.yaml`` preset), which
  are translated into databases with fidelity = modality.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import sevenn
import yaml
from sevenn.parse_input import init_data_config, init_model_config, init_train_config

from . import _sevenn as S
from ._sevenn import CONST, KEY
from .coupling import KEYS as COUPLING_KEYS
from .data.sampler import SAMPLING_KEYS, check_sampling
from .finetune import check_reference_options


class ConfigError(ValueError):
    pass


SECTIONS = ('model', 'train', 'data')

# ---- the keys a YAML may name ------------------------------------------------------
# Known keys: sevenn's own tables (defaults and conditions, which also hold the
# keys sevenn_mf registers in _sevenn._register_config_keys), the few keys
# sevenn's parser handles outside them, the method keys below and the options
# of NESTED_KEYS. Any other key stops the run, with the closest known key.

# train-section keys of sevenn_mf.analysis.methods (a YAML with any of them is
# run as a method by ``sevenn_mf train``; they never reach sevenn's parser)
METHOD_KEYS = (
    'method',
    'hf_fidelity',
    'transfer',
    'delta',
    'mf',
    'min_epoch_length',
)
TRANSFER_KEYS = (
    'pretrain_epochs',
    'finetune_epochs',
    'finetune_lr',
    'shared_lr_factor',
)
DELTA_KEYS = ('paired_files', 'lf_fidelity', 'lf_epochs', 'delta_epochs', 'scale')
MF_KEYS = (
    'init',
    'lf_epochs',
    'lr',
    'early_stopping',
    'paired',
    'restarts',
    'freeze_shared',
)
MF_INITS = ('scratch', 'lf')

# Options whose value is a mapping, and the sub-keys each takes. This is the
# table to extend when an option with sub-keys is added: (section, key) ->
# sub-keys. The option is then a known key of its section and an unknown
# sub-key stops the run (closest one suggested) before anything is read. Its
# values are checked by its entry in VALUE_CHECKS, if it has one (or by its
# own module). A new top-level key must also be registered with sevenn's
# parser (_sevenn._register_config_keys): one that sevenn's parser would drop
# is refused by config_from_dict.
NESTED_KEYS: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ('data', S.SAMPLING): SAMPLING_KEYS,
    ('train', 'transfer'): TRANSFER_KEYS,
    ('train', 'delta'): DELTA_KEYS,
    ('train', 'mf'): MF_KEYS,
    ('train', KEY.CONTINUE): tuple(CONST.DEFAULT_TRAINING_CONFIG[KEY.CONTINUE]),
    # coupled fidelity heads (sevenn_mf.coupling)
    ('train', 'coupling'): COUPLING_KEYS,
    # early stopping on the best_fidelity validation loss (sevenn_mf.train)
    ('train', 'early_stopping'): ('patience', 'min_delta', 'monitor'),
}

# keys sevenn 0.13's parser handles outside its tables (the model-section ones
# after the first are deprecated: sevenn converts or drops them with a warning)
_SEVENN_EXTRA = {
    'model': (
        KEY.CHEMICAL_SPECIES,
        KEY.AVG_NUM_NEIGH,
        KEY.TRAIN_AVG_NUM_NEIGH,
        KEY.OPTIMIZE_BY_REDUCE,
    ),
    'train': (KEY.DEVICE,),
    'data': (),
}
_SEVENN_DROPS = {KEY.AVG_NUM_NEIGH, KEY.TRAIN_AVG_NUM_NEIGH, KEY.OPTIMIZE_BY_REDUCE}

# sevenn keys that sevenn_mf does not read (its data layer and run loop replace
# sevenn's): accepted at sevenn's default value, refused otherwise with what to
# use instead, since they would be silently ignored
_GRAPHS = 'sevenn_mf builds and caches the graphs itself (<working dir>/graph_cache)'
_READER = (
    'sevenn_mf reads databases[].files with ase.io.read (or sevenn .pt graphs); '
    'reader options go in databases[].reader'
)
_REPLAY = (
    "sevenn's reEWC rehearsal is not used; replay old data with a database of "
    'the old fidelity and data.sampling {mode: explicit, ratios: ...}'
)
NOT_READ: Dict[str, Dict[str, str]] = {
    'train': {
        KEY.CONTINUE: 'continue a killed run with `sevenn_mf train --resume`; '
        'fine-tune a checkpoint with train.pretrained',
        KEY.CSV_LOG: 'sevenn_mf writes metrics.csv (and sevenn lc.csv) in the '
        'working directory',
        KEY.DEFAULT_MODAL: 'name the fidelity where the model is used '
        '(fidelity=..., --fidelity)',
        KEY.USE_TESTSET: 'evaluate test structures with `sevenn_mf evaluate`',
    },
    'data': {
        KEY.RATIO: 'give a database validation: {ratio: r}',
        KEY.DTYPE: _GRAPHS,
        KEY.DATA_FORMAT: _READER,
        KEY.DATA_FORMAT_ARGS: _READER,
        KEY.SAVE_DATASET: _GRAPHS,
        KEY.SAVE_BY_LABEL: _GRAPHS,
        KEY.SAVE_BY_TRAIN_VALID: _GRAPHS,
        KEY.PREPROCESS_NUM_CORES: 'use data.preprocess_workers '
        '(with data.storage: lmdb)',
        KEY.COMPUTE_STATISTICS: 'shift/scale are computed from the training '
        'data (data.shift, data.scale)',
        KEY.DATASET_TYPE: _GRAPHS,
        KEY.REHEARSAL: _REPLAY,
        KEY.MEM_BATCH_SIZE: _REPLAY,
        KEY.MEM_RATIO: _REPLAY,
    },
}
# the value at which they are accepted (sevenn's default; `continue` never:
# sevenn itself cannot parse its default)
_NOT_READ_DEFAULT = {
    KEY.USE_TESTSET: False,
    KEY.DEFAULT_MODAL: None,
    KEY.CONTINUE: object(),
}

# what a database entry and a sevenn multi-modal load_*_path entry hold
_DATABASE_SUBKEYS = {
    'weight': ('energy', 'force', 'stress'),
    'validation': ('ratio', 'seed', 'files'),
}
_NATIVE_ENTRY_KEYS = ('data_modality', 'file_list', 'data_weight')


def _tables(section: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    S.install_hooks()  # sevenn_mf's keys are in sevenn's tables from then on
    return {
        'model': (
            CONST.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG,
            CONST.MODEL_CONFIG_CONDITION,
        ),
        'train': (CONST.DEFAULT_TRAINING_CONFIG, CONST.TRAINING_CONFIG_CONDITION),
        'data': (CONST.DEFAULT_DATA_CONFIG, CONST.DATA_CONFIG_CONDITION),
    }[section]


def known_keys(section: str) -> Set[str]:
    """The keys sevenn 0.13 or sevenn_mf reads in a YAML section (besides
    sevenn's ``load_*_path`` keys in ``data``)."""
    defaults, conditions = _tables(section)
    keys = set(defaults) | set(conditions) | set(_SEVENN_EXTRA[section])
    keys |= {k for sec, k in NESTED_KEYS if sec == section}
    if section == 'train':
        keys |= set(METHOD_KEYS)
    return keys


def _is_load_path(key: str) -> bool:
    return key.startswith('load_') and key.endswith('_path')


def _closest(key: Any, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _unknown_key(where: str, key: Any, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    hint = _closest(key, known)
    if not hint and len(known) <= 12:
        hint = f' (known: {", ".join(known)})'
    return ConfigError(f'{where}: unknown key {key!r}{hint}')


def _unknown_section_key(section: str, key: Any) -> ConfigError:
    for other in SECTIONS:
        if other != section and key in known_keys(other):
            return ConfigError(
                f'{section}: unknown key {key!r} ({key!r} belongs in section {other})'
            )
    return _unknown_key(section, key, known_keys(section))


def _check_sub_keys(where: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value is None or isinstance(value, bool):  # e.g. coupling: true
        return
    if not isinstance(value, dict):
        raise ConfigError(
            f'{where} must be a mapping with keys {", ".join(allowed)}, '
            f'got {value!r}'
        )
    for k in value:
        if k not in allowed:
            raise _unknown_key(where, k, allowed)


def _check_databases(entries: Any) -> None:
    from .data.databases import ALLOWED_KEYS

    if not isinstance(entries, list):
        return  # the data layer says what a databases list is
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        where = f'data.databases[{i}]' + (
            f" ('{entry['name']}')" if entry.get('name') else ''
        )
        for k in entry:
            if k not in ALLOWED_KEYS:
                raise _unknown_key(where, k, ALLOWED_KEYS)
        for k, allowed in _DATABASE_SUBKEYS.items():
            if isinstance(entry.get(k), dict):
                _check_sub_keys(f'{where}.{k}', entry[k], allowed)


def _check_native_entries(key: str, entries: Any) -> None:
    if not isinstance(entries, list):
        return
    for i, e in enumerate(entries):
        if isinstance(e, dict):
            _check_sub_keys(f'data.{key}[{i}]', e, _NATIVE_ENTRY_KEYS)
            if isinstance(e.get('data_weight'), dict):
                _check_sub_keys(
                    f'data.{key}[{i}].data_weight',
                    e['data_weight'],
                    _DATABASE_SUBKEYS['weight'],
                )


def _type_error(section: str, key: str, value: Any, default: Any, cond: Any):
    """A value of the wrong type, where sevenn's parser would cast it (4.5 ->
    4 for an int, 'false' -> True for a bool, a string -> its characters for a
    list)."""
    if value == default or not isinstance(cond, type):
        return None
    if cond is bool:
        ok = isinstance(value, bool)
    elif cond is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif cond is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, str):  # sevenn reads '1e-3' (YAML gives a string)
            try:
                float(value)
                ok = True
            except ValueError:
                ok = False
    else:
        ok = isinstance(value, cond)
    if ok:
        return None
    names = {bool: 'true or false', int: 'an integer', float: 'a number'}
    names.update({list: 'a list', dict: 'a mapping', str: 'a string'})
    return ConfigError(
        f'{section}.{key} must be {names.get(cond, cond.__name__)}, got {value!r}'
    )


def check_keys(raw: Dict[str, Any], source: Optional[str] = None) -> None:
    """Every key of a YAML (its ``model``/``train``/``data`` mappings) is one
    that sevenn 0.13 or sevenn_mf reads, sub-keys included, and the typed
    ones have their type. Raises :class:`ConfigError` naming the section and
    key (and ``source``, the YAML file) and suggesting the closest valid key."""
    try:
        _check_keys(raw)
    except ConfigError as exc:
        if source:
            raise ConfigError(f'{source}: {exc}') from None
        raise


def _check_keys(raw: Dict[str, Any]) -> None:
    for section in SECTIONS:
        sec = raw.get(section)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise ConfigError(f'section {section} must be a mapping, got {sec!r}')
        known = known_keys(section)
        defaults, conditions = _tables(section)
        for key, value in sec.items():
            if section == 'data' and isinstance(key, str) and _is_load_path(key):
                _check_native_entries(key, value)
                continue
            if key not in known:
                raise _unknown_section_key(section, key)
            err = _type_error(
                section, key, value, defaults.get(key), conditions.get(key)
            )
            if err is not None:
                raise err
        for (s, key), allowed in NESTED_KEYS.items():
            if s == section and key in sec:
                _check_sub_keys(f'{section}.{key}', sec[key], allowed)
        for key, hint in NOT_READ.get(section, {}).items():
            default = _NOT_READ_DEFAULT.get(key, defaults.get(key))
            if key in sec and sec[key] != default:
                raise ConfigError(
                    f'{section}.{key}: a sevenn option that sevenn_mf does not '
                    f'read (it would be ignored): {hint}'
                )
    device = (raw.get('train') or {}).get(KEY.DEVICE)
    if device is not None:
        import torch

        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(
                f'train.device {device!r} is not a torch device '
                '(e.g. cpu, cuda, cuda:1)'
            ) from None
    data = raw.get('data') or {}
    _check_databases(data.get(S.DATABASES))
    _check_reference_structure(data.get(S.REFERENCE_ENERGIES))


def _check_reference_structure(refs: Any) -> None:
    """``reference_energies``: {fidelity: {element: eV} or fit_to_pretrained}
    (the fidelity names are checked against the databases' later)."""
    from ase.data import atomic_numbers, chemical_symbols

    if refs is None:
        return
    if not isinstance(refs, dict):
        raise ConfigError(
            'data.reference_energies must be a mapping {fidelity: {element: eV}}, '
            f'got {refs!r}'
        )
    for fid, per_element in refs.items():
        if not isinstance(per_element, dict):
            continue  # a string: check_reference_options
        for el, e in per_element.items():
            where = f'data.reference_energies.{fid}'
            if not isinstance(el, str) or el not in atomic_numbers or el == 'X':
                same_case = [
                    s for s in chemical_symbols[1:] if s.lower() == str(el).lower()
                ]
                hint = (
                    f" (did you mean '{same_case[0]}'?)"
                    if same_case
                    else _closest(el, chemical_symbols[1:])
                )
                raise ConfigError(f'{where}: {el!r} is not an element{hint}')
            if (
                not isinstance(e, (int, float))
                or isinstance(e, bool)
                or not math.isfinite(e)
            ):
                raise ConfigError(f'{where}.{el} must be a number (eV), got {e!r}')


# ---- values --------------------------------------------------------------------
def _databases_well_formed(config: Dict[str, Any]) -> bool:
    """Whether every database entry is a mapping with a fidelity name: the
    options that refer to databases are checked against them only then (the
    data layer reports a malformed entry, naming it)."""
    entries = config.get(S.DATABASES)
    return isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get('fidelity'), str) and e['fidelity']
        for e in entries
    )


def _database_fidelities(config: Dict[str, Any]) -> List[str]:
    out: List[str] = []
    for db in config.get(S.DATABASES) or []:
        f = db.get('fidelity') if isinstance(db, dict) else None
        if isinstance(f, str) and f not in out:
            out.append(f)
    return out


def _training_database_names(config: Dict[str, Any]) -> Optional[List[str]]:
    """Names of the databases with training structures, as the data layer
    will name them (None when the list is not well-formed: the data layer
    reports that)."""
    entries = config.get(S.DATABASES) or []
    if not all(isinstance(e, dict) for e in entries):
        return None
    if not all(e.get('name') for e in entries):
        from .data.databases import parse_databases  # default names: file stems

        specs = parse_databases(list(entries), config.get('_base_dir', '.'))
        return [s.name for s in specs if s.role != 'valid']
    return [str(e['name']) for e in entries if e.get('role', 'train') != 'valid']


def _check_sampling(value: Any, config: Dict[str, Any]) -> None:
    names = None
    explicit = isinstance(value, dict) and value.get('mode') == 'explicit'
    if explicit and _databases_well_formed(config):
        names = _training_database_names(config)
    check_sampling(value, names)


# Value checks of options, run on the parsed (flat) config before anything is
# read: (section, key) -> check(value, config) raising ValueError. Options
# added to NESTED_KEYS put their value check here.
VALUE_CHECKS: Dict[Tuple[str, str], Callable[[Any, Dict[str, Any]], None]] = {
    ('data', S.SAMPLING): _check_sampling,
}


def _int_at_least(config: Dict[str, Any], where: str, key: str, low: int) -> None:
    v = config.get(key)
    if v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        what = 'a positive integer' if low == 1 else f'an integer >= {low}'
        raise ConfigError(f'{where}.{key} must be {what}, got {v!r}')


def _number_at_least(config: Dict[str, Any], where: str, key: str) -> None:
    v = config.get(key)
    if v is None:
        return
    try:
        ok = not isinstance(v, bool) and math.isfinite(float(v)) and float(v) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f'{where}.{key} must be a number >= 0, got {v!r}')


def _check_best_fidelity(config: Dict[str, Any]) -> None:
    target = config.get(S.BEST_FIDELITY)
    if not target:
        return
    fids = _database_fidelities(config)
    if target not in fids:
        raise ConfigError(
            f'train.best_fidelity {target!r} is not the fidelity of any database'
            f'{_closest(target, fids)} (fidelities: {", ".join(fids)})'
        )
    entries = [
        e
        for e in config.get(S.DATABASES) or []
        if isinstance(e, dict) and e.get('fidelity') == target
    ]
    if not any(e.get('role') == 'valid' or e.get('validation') for e in entries):
        raise ConfigError(
            f'train.best_fidelity {target!r}: no database of that fidelity has '
            'validation data (give one validation: {ratio: r} or '
            '{files: [...]}, or add one with role: valid)'
        )


def _check_reference_names(config: Dict[str, Any]) -> None:
    refs = config.get(S.REFERENCE_ENERGIES) or {}
    _check_reference_structure(refs)
    known = _database_fidelities(config) + list(config.get(S.FIDELITIES) or [])
    if config.get(S.PRETRAINED):
        add = config.get(S.PRETRAINED_ADD) or {}
        known += [str(k) for k in add] + [str(v) for v in add.values() if v]
        if config.get(S.PRETRAINED_FIDELITY):
            known.append(str(config[S.PRETRAINED_FIDELITY]))
    for fid in refs:
        if fid not in known:
            raise ConfigError(
                f'data.reference_energies: {fid!r} is not a fidelity of the '
                f'databases{_closest(fid, known)} (fidelities: '
                f'{", ".join(dict.fromkeys(known))})'
            )


def _check_statistics_options(config: Dict[str, Any]) -> None:
    if config.get(S.PRETRAINED):
        return  # shift and scale come from the checkpoint
    shift, scale = config.get(KEY.SHIFT), config.get(KEY.SCALE)
    if isinstance(shift, str) and shift != 'elemwise_reference_energies':
        raise ConfigError(
            f'data.shift {shift!r}: sevenn_mf fits per-fidelity element '
            "references: use 'elemwise_reference_energies' or give numbers"
        )
    if isinstance(scale, str) and scale != 'force_rms':
        raise ConfigError(f"data.scale {scale!r}: use 'force_rms' or a number")


def _check_torch_options(config: Dict[str, Any], training: bool) -> None:
    """Optimizer, scheduler and loss names, and their parameters against the
    torch classes sevenn builds them with (a misspelt parameter would be a
    TypeError once the model is built); with ``training``, also that the
    required ones are given (sevenn's default scheduler, exponentiallr,
    needs a gamma it does not have)."""
    from sevenn.train.optim import loss_dict, optim_dict, scheduler_dict

    for name_key, param_key, table, skip in (
        (KEY.OPTIMIZER, KEY.OPTIM_PARAM, optim_dict, {'params'}),
        (KEY.SCHEDULER, KEY.SCHEDULER_PARAM, scheduler_dict, {'optimizer'}),
        (KEY.LOSS, KEY.LOSS_PARAM, loss_dict, set()),
    ):
        name = config.get(name_key)
        if name is None:
            continue
        if not isinstance(name, str) or name.lower() not in table:
            raise ConfigError(
                f'train.{name_key}: unknown {name!r}{_closest(name, table)} '
                f'(choose one of {", ".join(table)})'
            )
        params = config.get(param_key) or {}
        if not isinstance(params, dict):
            raise ConfigError(f'train.{param_key} must be a mapping, got {params!r}')
        cls = table[name.lower()]
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            continue
        args = {n: p for n, p in sig.parameters.items() if n not in skip}
        needed = [
            n
            for n, p in args.items()
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and n not in params
        ]
        if needed and training:
            raise ConfigError(
                f'train.{param_key}: {cls.__name__} needs '
                f'{", ".join(map(repr, needed))} (train.{name_key}: {name})'
            )
        for k, v in params.items():
            if k not in args:
                raise ConfigError(
                    f'train.{param_key}: {k!r} is not an argument of '
                    f'{cls.__name__}{_closest(k, args)} (arguments: '
                    f'{", ".join(args)})'
                )
            default = args[k].default
            numeric = isinstance(default, (int, float)) and not isinstance(
                default, bool
            )
            if numeric and isinstance(v, str):
                raise ConfigError(
                    f'train.{param_key}.{k} must be a number, got the string '
                    f'{v!r} (YAML reads 1e-3 as a string: write 1.0e-3)'
                )


def _refuse_method_keys(train: Dict[str, Any]) -> None:
    present = [k for k in METHOD_KEYS if k in train]
    if present:
        raise ConfigError(
            f'train.{present[0]}: method options are run by `sevenn_mf train` '
            '(sevenn_mf.analysis.methods.train_cli), not by sevenn_mf.train.train'
        )


def check_config(config: Dict[str, Any], training: bool = False) -> None:
    """The values of a parsed (flat) config that sevenn's parser does not
    check, or checks only by casting, and the options that refer to each
    other (best_fidelity and reference_energies to the databases, sampling
    ratios to database names). Cheap (no data file is read): run by
    :func:`config_from_dict` and again at the start of training, before any
    graph is built (``training=True``: also what only training needs, such
    as the scheduler's required parameters). Raises :class:`ConfigError`
    naming the option."""
    for where, key, low in (
        ('train', KEY.EPOCH, 1),
        ('train', KEY.PER_EPOCH, 1),
        ('train', KEY.RANDOM_SEED, 0),
        ('train', KEY.NUM_WORKERS, 0),
        ('data', KEY.BATCH_SIZE, 1),
        ('data', S.PREPROCESS_WORKERS, 1),
    ):
        _int_at_least(config, where, key, low)
    for key in (KEY.FORCE_WEIGHT, KEY.STRESS_WEIGHT, S.SHARED_LR_FACTOR):
        _number_at_least(config, 'train', key)
    if config.get(S.FIDELITY_LAYER_MODE) not in (None, *S.LAYER_MODES):
        raise ConfigError(
            f'model.fidelity_layer_mode must be one of {", ".join(S.LAYER_MODES)}, '
            f'got {config[S.FIDELITY_LAYER_MODE]!r}'
        )
    _refuse_method_keys(config)
    if _databases_well_formed(config):
        _check_best_fidelity(config)
        _check_reference_names(config)
    else:
        _check_reference_structure(config.get(S.REFERENCE_ENERGIES))
    _check_statistics_options(config)
    _check_torch_options(config, training)
    try:
        check_reference_options(config)
        for (_, key), check in VALUE_CHECKS.items():
            if config.get(key) is not None:
                check(config[key], config)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# Fidelity-dependent layers when the YAML names none: SevenNet-MF-0's. The
# output block alone is not enough: it is two linear layers, so one-hot
# fidelity input there shifts every atom's energy by the same constant, and a
# head can learn no geometry-dependent fidelity difference (nor can coupling
# act on it). Measured in docs/benchmarks.md ("Choosing the recipe").
_DEFAULT_POSITIONS = (
    KEY.USE_MODAL_SELF_INTER_INTRO,
    KEY.USE_MODAL_SELF_INTER_OUTRO,
    KEY.USE_MODAL_OUTPUT_BLOCK,
)


def _native_modal_databases(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """sevenn multi-modal ``load_*_path`` dict entries -> database entries."""
    out = []
    for key in list(data):
        if not _is_load_path(key):
            continue
        entries = data[key]
        if not isinstance(entries, list) or not any(
            isinstance(e, dict) and 'data_modality' in e for e in entries
        ):
            raise ConfigError(
                f"data.{key}: sevenn_mf reads sevenn's multi-modal form "
                '[{data_modality, file_list, data_weight}] or data.databases '
                '(each with a fidelity), not plain file lists'
            )
        role = 'train' if key == 'load_trainset_path' else 'valid'
        set_name = key[len('load_') : -len('_path')]
        data.pop(key)
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or 'data_modality' not in e:
                raise ConfigError(f'data.{key}[{i}] has no data_modality')
            files, reader = [], {}
            for fe in e.get('file_list', []):
                if not isinstance(fe, dict) or 'file' not in fe:
                    raise ConfigError(
                        f'data.{key}[{i}].file_list: each entry is {{file: path, '
                        f'...reader options}}, got {fe!r}'
                    )
                fe = dict(fe)
                files.append(fe.pop('file'))
                reader.update(fe)
            db = {
                'name': f'{set_name}_{e["data_modality"]}',
                'fidelity': e['data_modality'],
                'files': files,
                'role': role,
            }
            if reader:
                db['reader'] = reader
            if 'data_weight' in e:
                db['weight'] = e['data_weight']
            out.append(db)
    return out


def read_sections(path: str, error: type = ConfigError) -> Dict[str, Any]:
    """The raw model/train/data sections of a YAML file; a missing file, bad
    YAML or unknown section raises ``error`` naming the file."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise error(f'{path}: no such file') from None
    except IsADirectoryError:
        raise error(f'{path}: a directory, not a YAML file') from None
    except yaml.YAMLError as exc:
        text = ' '.join(str(exc).split())
        raise error(f'{path}: not valid YAML ({text})') from None
    except UnicodeDecodeError:
        raise error(f'{path}: not a text (YAML) file') from None
    if not isinstance(raw, dict):
        raise error(f'{path}: expected sections model/train/data')
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    if unknown:
        raise error(
            f'{path}: unknown section {unknown[0]!r}{_closest(unknown[0], SECTIONS)}'
            ' (sections: model, train, data)'
        )
    return raw


def load_config(path: str) -> Dict[str, Any]:
    """The flat global config (sevenn style) of a training YAML."""
    path = os.path.abspath(path)
    return config_from_dict(
        read_sections(path), base_dir=os.path.dirname(path), source=path
    )


def config_from_dict(
    raw: Dict[str, Any], base_dir: str = '.', source: Optional[str] = None
) -> Dict[str, Any]:
    """The flat config of YAML sections; every key and value is checked here
    (an error names ``source``, the YAML file, and the section and key)."""
    try:
        return _config_from_dict(raw, base_dir)
    except ConfigError as exc:
        if source:
            raise ConfigError(f'{source}: {exc}') from None
        raise


def _config_from_dict(raw: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    S.install_hooks()
    raw = copy.deepcopy(raw)
    for sec in SECTIONS:  # an empty mapping or list option (YAML null) = not given
        if isinstance(raw.get(sec), dict):
            conditions = _tables(sec)[1]
            raw[sec] = {
                k: v
                for k, v in raw[sec].items()
                if v is not None or conditions.get(k) not in (dict, list)
            }
    _check_keys(raw)
    model_raw = raw.get('model') or {}
    user_model_keys = sorted(model_raw)
    train_raw = raw.get('train') or {}
    data_raw = raw.get('data') or {}
    _refuse_method_keys(train_raw)

    databases = list(data_raw.pop(S.DATABASES, []) or [])
    databases += _native_modal_databases(data_raw)
    if not databases:
        raise ConfigError(
            'data.databases is empty: list at least one database with a fidelity'
        )
    if not any(k in model_raw for k in S.MODAL_POSITION_KEYS):
        for k in _DEFAULT_POSITIONS:
            model_raw[k] = True
    model_raw.setdefault(KEY.CHEMICAL_SPECIES, 'auto')
    model_raw.setdefault(S.FIDELITY_LAYER_MODE, 'onehot')
    if KEY.SCHEDULER not in train_raw and KEY.SCHEDULER_PARAM not in train_raw:
        # no schedule asked for: a constant learning rate (sevenn's default,
        # exponentiallr without a gamma, cannot be built)
        train_raw[KEY.SCHEDULER_PARAM] = {'gamma': 1.0}
    train_raw.setdefault(KEY.USE_WEIGHT, True)
    train_raw[KEY.USE_MODALITY] = True
    data_raw.setdefault(KEY.USE_MODAL_WISE_SHIFT, True)
    data_raw.setdefault(KEY.SHIFT, 'elemwise_reference_energies')

    config: Dict[str, Any] = {
        'version': sevenn.__version__,
        'when': time.ctime(),
        KEY.MODEL_TYPE: 'E3_equivariant_model',
    }
    for section, sec_raw, init in (
        ('model', model_raw, init_model_config),
        ('train', train_raw, init_train_config),
        ('data', data_raw, init_data_config),
    ):
        given = [k for k in sec_raw if k not in _SEVENN_DROPS]
        try:
            with warnings.catch_warnings():
                # unknown keys were refused above; a dropped one is caught below
                warnings.filterwarnings('ignore', message='Unexpected .* keys')
                parsed = init(sec_raw)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f'{section}: {exc}') from None
        dropped = [k for k in given if k not in parsed]
        if dropped:
            raise ConfigError(
                f"{section}.{dropped[0]}: sevenn's parser does not keep this key; "
                'register it in sevenn_mf/_sevenn.py (_register_config_keys)'
            )
        config.update(parsed)
    config[S.DATABASES] = databases
    config['_base_dir'] = os.path.abspath(base_dir)
    # which model keys the YAML named (a pretrained model ignores architecture)
    config['_user_model_keys'] = user_model_keys
    check_config(config)
    return config


def split_sections(config: Dict[str, Any]) -> Tuple[Dict, Dict, Dict]:
    """For printing: which keys belong to which YAML section."""
    from ._sevenn import CONST as C

    model = {
        k: v for k, v in config.items() if k in C.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG
    }
    train = {k: v for k, v in config.items() if k in C.DEFAULT_TRAINING_CONFIG}
    data = {k: v for k, v in config.items() if k in C.DEFAULT_DATA_CONFIG}
    return model, train, data
