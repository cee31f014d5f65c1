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
import os
import time
from typing import Any, Dict, List, Tuple

import sevenn
import yaml
from sevenn.parse_input import init_data_config, init_model_config, init_train_config

from . import _sevenn as S
from ._sevenn import KEY
from .finetune import check_reference_options


class ConfigError(ValueError):
    pass


_DEFAULT_POSITIONS = (
    KEY.USE_MODAL_SELF_INTER_INTRO,
    KEY.USE_MODAL_SELF_INTER_OUTRO,
    KEY.USE_MODAL_OUTPUT_BLOCK,
)


def _native_modal_databases(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """sevenn multi-modal ``load_*_path`` dict entries -> database entries."""
    out = []
    for key in list(data):
        if not (key.startswith('load_') and key.endswith('_path')):
            continue
        entries = data[key]
        if not isinstance(entries, list) or not any(
            isinstance(e, dict) and 'data_modality' in e for e in entries
        ):
            continue
        role = 'train' if key == 'load_trainset_path' else 'valid'
        set_name = key[len('load_') : -len('_path')]
        data.pop(key)
        for i, e in enumerate(entries):
            if 'data_modality' not in e:
                raise ConfigError(f'{key}[{i}] has no data_modality')
            files, reader = [], {}
            for fe in e.get('file_list', []):
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
    except yaml.YAMLError as exc:
        raise error(f'{path}: not valid YAML ({exc})') from None
    if not isinstance(raw, dict):
        raise error(f'{path}: expected sections model/train/data')
    unknown = set(raw) - {'model', 'train', 'data'}
    if unknown:
        raise error(f'{path}: unknown section(s) {sorted(unknown)}')
    return raw


def load_config(path: str) -> Dict[str, Any]:
    """The flat global config (sevenn style) of a training YAML."""
    path = os.path.abspath(path)
    return config_from_dict(read_sections(path), base_dir=os.path.dirname(path))


def config_from_dict(raw: Dict[str, Any], base_dir: str = '.') -> Dict[str, Any]:
    S.install_hooks()
    raw = copy.deepcopy(raw)
    model_raw = raw.get('model') or {}
    user_model_keys = sorted(model_raw)
    train_raw = raw.get('train') or {}
    data_raw = raw.get('data') or {}

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
    train_raw.setdefault(KEY.USE_WEIGHT, True)
    train_raw[KEY.USE_MODALITY] = True
    data_raw.setdefault(KEY.USE_MODAL_WISE_SHIFT, True)
    data_raw.setdefault(KEY.SHIFT, 'elemwise_reference_energies')

    config: Dict[str, Any] = {
        'version': sevenn.__version__,
        'when': time.ctime(),
        KEY.MODEL_TYPE: 'E3_equivariant_model',
    }
    try:
        config.update(init_model_config(model_raw))
        config.update(init_train_config(train_raw))
        config.update(init_data_config(data_raw))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    config[S.DATABASES] = databases
    config['_base_dir'] = os.path.abspath(base_dir)
    # which model keys the YAML named (a pretrained model ignores architecture)
    config['_user_model_keys'] = user_model_keys
    try:
        check_reference_options(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config[S.FIDELITY_LAYER_MODE] not in S.LAYER_MODES:
        raise ConfigError(
            f'fidelity_layer_mode must be one of {S.LAYER_MODES}, '
            f'got {config[S.FIDELITY_LAYER_MODE]!r}'
        )
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
