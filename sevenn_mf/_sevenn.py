"""The one place where sevenn_mf touches sevenn internals.

Everything sevenn-specific that is not a public, documented API lives here:
the extra config keys, the model-builder hook and the version guard. Other
modules import names from here instead of reaching into sevenn themselves, so a
new sevenn release means reviewing this file only.

The hooks are installed once, at import of :mod:`sevenn_mf`, and are inert for
configs that do not ask for fidelity layers: a plain SevenNet model or a native
multi-modal one builds exactly as without sevenn_mf.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import sevenn
import sevenn._const as _const
import sevenn._keys as KEY
import sevenn.model_build as _model_build
from sevenn.nn.linear import IrrepsLinear

# Versions whose internals (builder layer names, IrrepsLinear attributes,
# ModalWiseRescale, Trainer/processing_epoch_v2 signatures) were read and tested.
TESTED_SEVENN_VERSIONS = ('0.13.0',)
_ALLOW_ENV = 'SEVENN_MF_ALLOW_UNTESTED_SEVENN'


class SevennVersionError(ImportError):
    pass


def check_sevenn_version(version: str = sevenn.__version__) -> None:
    if version in TESTED_SEVENN_VERSIONS or os.environ.get(_ALLOW_ENV):
        return
    raise SevennVersionError(
        f'sevenn_mf hooks into sevenn internals and was tested with sevenn '
        f'{", ".join(TESTED_SEVENN_VERSIONS)}, but sevenn {version} is installed. '
        f'Install a tested version (pip install sevenn=={TESTED_SEVENN_VERSIONS[-1]})'
        f' or set {_ALLOW_ENV}=1 to try anyway.'
    )


# ---- config keys -----------------------------------------------------------
# Model section. ``fidelity_layer_mode`` switches the builder hook on; the
# positions reuse sevenn's own ``use_modal_*`` keys and the fidelity order is
# sevenn's ``_modal_map`` (name -> index), so sevenn's calculator, inference
# and deploy machinery keep working on our models.
FIDELITY_LAYER_MODE = 'fidelity_layer_mode'  # 'onehot' | 'indexed' | None
FIDELITIES = 'fidelities'  # list of names; index = position
# train section
BEST_FIDELITY = 'best_fidelity'
FREEZE_SHARED = 'freeze_shared'
SHARED_LR_FACTOR = 'shared_lr_factor'
PRETRAINED = 'pretrained'  # checkpoint path or pretrained name to fine-tune
PRETRAINED_FIDELITY = 'pretrained_fidelity'
PRETRAINED_ADD = 'pretrained_add'  # {new fidelity: existing one it starts from}
FIT_NEW_REFERENCES = 'fit_new_references'
# data section
DATABASES = 'databases'
REFERENCE_ENERGIES = 'reference_energies'
SAMPLING = 'sampling'
STORAGE = 'storage'  # 'memory' | 'lmdb' (sevenn_mf.data.store)
GRAPH_STORE_DIR = (
    'graph_store_dir'  # where lmdb stores live (default <wd>/graph_store)
)
PREPROCESS_WORKERS = 'preprocess_workers'  # processes building graphs
STORAGES = ('memory', 'lmdb')

LAYER_MODES = ('onehot', 'indexed')
MODAL_POSITION_KEYS = {
    KEY.USE_MODAL_NODE_EMBEDDING: 'onehot_to_feature_x',
    KEY.USE_MODAL_SELF_INTER_INTRO: 'self_interaction_1',
    KEY.USE_MODAL_SELF_INTER_OUTRO: 'self_interaction_2',
    KEY.USE_MODAL_OUTPUT_BLOCK: 'reduce_input_to_hidden',
}


def _mode_ok(v: Any) -> bool:
    return v is None or v in LAYER_MODES


def _register_config_keys() -> None:
    """Make sevenn's config parser accept, validate and save our keys."""
    model_keys = {FIDELITY_LAYER_MODE: (None, _mode_ok), FIDELITIES: ([], list)}
    train_keys = {
        BEST_FIDELITY: (None, lambda v: v is None or isinstance(v, str)),
        FREEZE_SHARED: (False, bool),
        SHARED_LR_FACTOR: (1.0, float),
        PRETRAINED: (None, lambda v: v is None or isinstance(v, str)),
        PRETRAINED_FIDELITY: (None, lambda v: v is None or isinstance(v, str)),
        PRETRAINED_ADD: ({}, lambda v: isinstance(v, dict)),
        FIT_NEW_REFERENCES: (False, bool),
    }
    data_keys = {
        DATABASES: ([], list),
        REFERENCE_ENERGIES: ({}, dict),
        SAMPLING: ({}, dict),
        STORAGE: ('memory', lambda v: v in STORAGES),
        GRAPH_STORE_DIR: (None, lambda v: v is None or isinstance(v, str)),
        PREPROCESS_WORKERS: (1, int),
    }
    for keys, defaults, cond in (
        (
            model_keys,
            _const.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG,
            _const.MODEL_CONFIG_CONDITION,
        ),
        (
            train_keys,
            _const.DEFAULT_TRAINING_CONFIG,
            _const.TRAINING_CONFIG_CONDITION,
        ),
        (data_keys, _const.DEFAULT_DATA_CONFIG, _const.DATA_CONFIG_CONDITION),
    ):
        for k, (default, condition) in keys.items():
            defaults.setdefault(k, default)
            cond.setdefault(k, condition)


# ---- model builder hook ------------------------------------------------------
_native_patch_modality = _model_build.patch_modality


def _is_fidelity_position(name: str, config: Dict[str, Any]) -> bool:
    for flag, suffix in MODAL_POSITION_KEYS.items():
        if not config.get(flag, False):
            continue
        if suffix == 'reduce_input_to_hidden':
            if name == suffix:
                return True
        elif name.endswith(suffix) and not name.startswith('ghost_'):
            return True
    return False


def patch_fidelity_layers(layers, config: Dict[str, Any]):
    """Replacement for sevenn's ``patch_modality`` (looked up at build time).

    With ``fidelity_layer_mode`` set, the chosen IrrepsLinear layers become
    FidelityLinear; otherwise sevenn's own modality patch runs unchanged.
    """
    mode = config.get(FIDELITY_LAYER_MODE)
    if not mode or not config.get(KEY.USE_MODALITY, False):
        return _native_patch_modality(layers, config)
    from sevenn_mf.nn.fidelity_linear import FidelityLinear

    n_fid = len(config[KEY.MODAL_MAP])
    for name, module in list(layers.items()):
        if isinstance(module, IrrepsLinear) and _is_fidelity_position(name, config):
            layers[name] = FidelityLinear.from_irreps_linear(module, n_fid, mode)
    return layers


def install_hooks() -> None:
    check_sevenn_version()
    for attr in (
        'patch_modality',
        'patch_modules',
        'build_E3_equivariant_model',
        'init_shift_scale',
    ):
        if not hasattr(_model_build, attr):
            raise SevennVersionError(
                f'sevenn.model_build.{attr} is missing: this sevenn is not one '
                'sevenn_mf can hook into'
            )
    _register_config_keys()
    _model_build.patch_modality = patch_fidelity_layers


def is_fidelity_config(config: Dict[str, Any]) -> bool:
    return bool(config.get(FIDELITY_LAYER_MODE)) and bool(
        config.get(KEY.USE_MODALITY, False)
    )
