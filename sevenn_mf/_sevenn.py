"""The one place where sevenn_mf touches sevenn internals.

Everything sevenn-specific that is not a public, documented API lives here:
the extra config keys, the model-builder hook, the version guard, and thin
wrappers around the private sevenn helpers other modules need (label
conversion, reading sevenn's graph files, the pretrained-name lookup without
its download). sevenn's key and default tables (``sevenn._keys``,
``sevenn._const``) are re-exported as ``KEY`` and ``CONST``. Other modules
import these names from here instead of reaching into sevenn themselves, so a
new sevenn release means reviewing this file only (tests/test_architecture.py
keeps it that way).

The hooks are installed once, at import of :mod:`sevenn_mf`, and are inert for
configs that do not ask for fidelity layers: a plain SevenNet model or a native
multi-modal one builds exactly as without sevenn_mf.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from typing import Any, Dict, Optional

import sevenn

# Versions whose internals (builder layer names, IrrepsLinear attributes,
# ModalWiseRescale, Trainer/processing_epoch_v2 signatures, the private helpers
# wrapped below) were read and tested.
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


# before any internal is imported: an untested sevenn fails here, with this
# message, not with whatever ImportError its changed internals would give
check_sevenn_version()

import sevenn._const as CONST  # noqa: E402
import sevenn._keys as KEY  # noqa: E402
import sevenn.model_build as _model_build  # noqa: E402
import sevenn.util as _sevenn_util  # noqa: E402
from sevenn.nn.convolution import IrrepsConvolution  # noqa: E402
from sevenn.nn.linear import IrrepsLinear  # noqa: E402
from sevenn.train.dataload import _set_atoms_y  # noqa: E402
from sevenn.train.graph_dataset import SevenNetGraphDataset  # noqa: E402

# ---- config keys -----------------------------------------------------------
# Model section. ``fidelity_layer_mode`` switches the builder hook on; the
# positions reuse sevenn's own ``use_modal_*`` keys and the fidelity order is
# sevenn's ``_modal_map`` (name -> index), so sevenn's calculator, inference
# and deploy machinery keep working on our models.
FIDELITY_LAYER_MODE = 'fidelity_layer_mode'  # 'onehot' | 'indexed' | None
FIDELITIES = 'fidelities'  # list of names; index = position
# per-fidelity last layer of every convolution's radial network (sevenn_mf's
# position, not sevenn's: sevenn_mf.nn.fidelity_radial)
FIDELITY_RADIAL = 'fidelity_radial'
# train section
BEST_FIDELITY = 'best_fidelity'
FREEZE_SHARED = 'freeze_shared'
SHARED_LR_FACTOR = 'shared_lr_factor'
PRETRAINED = 'pretrained'  # checkpoint path or pretrained name to fine-tune
PRETRAINED_FIDELITY = 'pretrained_fidelity'
PRETRAINED_ADD = 'pretrained_add'  # {new fidelity: existing one it starts from}
FIT_NEW_REFERENCES = 'fit_new_references'
COUPLING = 'coupling'  # coupled fidelity heads (sevenn_mf.coupling)
EARLY_STOPPING = 'early_stopping'  # {patience, min_delta} (sevenn_mf.train)
EMA_DECAY = 'ema_decay'  # weight average for validation/checkpoints (sevenn_mf.ema)
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
# every fidelity-dependent position a config can switch on (the linear ones
# above, and the radial networks)
POSITION_FLAGS = tuple(MODAL_POSITION_KEYS) + (FIDELITY_RADIAL,)


def _mode_ok(v: Any) -> bool:
    return v is None or v in LAYER_MODES


def _register_config_keys() -> None:
    """Make sevenn's config parser accept, validate and save our keys."""
    model_keys = {
        FIDELITY_LAYER_MODE: (None, _mode_ok),
        FIDELITIES: ([], list),
        FIDELITY_RADIAL: (False, bool),
    }
    train_keys = {
        BEST_FIDELITY: (None, lambda v: v is None or isinstance(v, str)),
        FREEZE_SHARED: (False, bool),
        SHARED_LR_FACTOR: (1.0, float),
        PRETRAINED: (None, lambda v: v is None or isinstance(v, str)),
        PRETRAINED_FIDELITY: (None, lambda v: v is None or isinstance(v, str)),
        PRETRAINED_ADD: ({}, lambda v: isinstance(v, dict)),
        FIT_NEW_REFERENCES: (False, bool),
        COUPLING: ({}, lambda v: isinstance(v, (dict, bool))),
        EARLY_STOPPING: ({}, lambda v: isinstance(v, dict)),
        EMA_DECAY: (
            0.0,
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        ),
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
            CONST.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG,
            CONST.MODEL_CONFIG_CONDITION,
        ),
        (
            train_keys,
            CONST.DEFAULT_TRAINING_CONFIG,
            CONST.TRAINING_CONFIG_CONDITION,
        ),
        (data_keys, CONST.DEFAULT_DATA_CONFIG, CONST.DATA_CONFIG_CONDITION),
    ):
        for k, (default, condition) in keys.items():
            defaults.setdefault(k, default)
            cond.setdefault(k, condition)


# ---- model builder hook ------------------------------------------------------
_native_patch_modality = _model_build.patch_modality


def modal_position(name: str) -> Optional[str]:
    """The ``use_modal_*`` flag whose position the layer ``name`` (as sevenn
    names it) is at, or None."""
    for flag, suffix in MODAL_POSITION_KEYS.items():
        if suffix == 'reduce_input_to_hidden':
            if name == suffix:
                return flag
        elif name.endswith(suffix) and not name.startswith('ghost_'):
            return flag
    return None


def _is_fidelity_position(name: str, config: Dict[str, Any]) -> bool:
    flag = modal_position(name)
    return flag is not None and bool(config.get(flag, False))


def patch_fidelity_layers(layers, config: Dict[str, Any]):
    """Replacement for sevenn's ``patch_modality`` (looked up at build time).

    With ``fidelity_layer_mode`` set, the chosen IrrepsLinear layers become
    FidelityLinear; otherwise sevenn's own modality patch runs unchanged.
    """
    mode = config.get(FIDELITY_LAYER_MODE)
    if not mode or not config.get(KEY.USE_MODALITY, False):
        if config.get(FIDELITY_RADIAL) and config.get(KEY.USE_MODALITY, False):
            raise ValueError(
                f'{FIDELITY_RADIAL}: true needs {FIDELITY_LAYER_MODE} '
                f"(onehot or indexed); sevenn's own multi-modal models have no "
                'fidelity-dependent radial networks'
            )
        return _native_patch_modality(layers, config)
    if _fidelity_layer is None:
        raise RuntimeError('sevenn_mf hooks installed without a fidelity layer')
    n_fid = len(config[KEY.MODAL_MAP])
    for name, module in list(layers.items()):
        if isinstance(module, IrrepsLinear) and _is_fidelity_position(name, config):
            layers[name] = _fidelity_layer(module, n_fid, mode)
    if config.get(FIDELITY_RADIAL):
        layers = _patch_radial(layers, n_fid)
    return layers


def _patch_radial(layers, n_fid: int):
    """Every convolution's radial network built per fidelity, reading the
    edge embedding with the edge's fidelity appended (a module inserted after
    sevenn's edge embedding)."""
    if _fidelity_radial is None:
        raise RuntimeError('sevenn_mf hooks installed without a radial network')
    radial_cls, edge_module, edge_key = _fidelity_radial
    convs = [m for m in layers.values() if isinstance(m, IrrepsConvolution)]
    if not convs or 'edge_embedding' not in layers:
        raise ValueError(
            f'{FIDELITY_RADIAL}: no convolution to make fidelity-dependent'
        )
    for conv in convs:
        if conv.weight_nn is not None:  # sevenn builds them lazily (0.13)
            raise SevennVersionError(
                'sevenn built the convolution before the builder hook ran'
            )
        conv.weight_nn_cls = functools.partial(radial_cls, num_fidelities=n_fid)
        conv.key_weight_input = edge_key
    out = []
    for name, module in layers.items():
        out.append((name, module))
        if name == 'edge_embedding':
            out.append(('edge_fidelity', edge_module(n_fid)))
    return OrderedDict(out)


# (sevenn's IrrepsLinear, number of fidelities, mode) -> the layer replacing it;
# registered by sevenn_mf/__init__.py (FidelityLinear.from_irreps_linear), so
# that this module does not import the layer that imports it
_fidelity_layer = None
# (radial network class, edge-fidelity module class, its data key); registered
# the same way (sevenn_mf.nn.fidelity_radial)
_fidelity_radial = None


def install_hooks(fidelity_layer=None, fidelity_radial=None) -> None:
    global _fidelity_layer, _fidelity_radial
    if fidelity_layer is not None:
        _fidelity_layer = fidelity_layer
    if fidelity_radial is not None:
        _fidelity_radial = tuple(fidelity_radial)
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
    if not getattr(CONST.model_defaults, '_sevenn_mf', False):
        CONST.model_defaults = _model_defaults_on_a_copy


_sevenn_model_defaults = CONST.model_defaults


def _model_defaults_on_a_copy(config: Dict[str, Any]) -> Dict[str, Any]:
    """sevenn 0.13's ``model_defaults`` pops the readout-FCN keys from the
    global default model config whenever a checkpoint without an FCN readout
    is loaded, so every config parsed later in the same process lacks them:
    a run's fingerprint then depends on whether the process had loaded a
    checkpoint before (a learning curve's second run could not be resumed in
    a new process). Same result, the global table left as it was."""
    saved = dict(CONST.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG)
    try:
        return dict(_sevenn_model_defaults(config))
    finally:
        CONST.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG.update(saved)


_model_defaults_on_a_copy._sevenn_mf = True  # type: ignore[attr-defined]


def is_fidelity_config(config: Dict[str, Any]) -> bool:
    return bool(config.get(FIDELITY_LAYER_MODE)) and bool(
        config.get(KEY.USE_MODALITY, False)
    )


# ---- private sevenn helpers, wrapped -------------------------------------------
def set_atoms_labels(atoms_list, **label_keys) -> None:
    """sevenn's own label conversion (``y_energy``/``y_force``/``y_stress`` in
    sevenn's units, Voigt order and sign), so that labels match sevenn's
    predictions exactly."""
    _set_atoms_y(atoms_list, **label_keys)


def read_graph_file(path: str, cutoff: float) -> list:
    """The graphs of a sevenn ``sevenn_data/<name>.pt`` file (its loader)."""
    return SevenNetGraphDataset._read_graph_dataset(path, cutoff, log=False)


def install_prefix() -> str:
    """Where sevenn's pretrained checkpoints live inside the installation."""
    return CONST._prefix


class NotLocal(Exception):
    """A pretrained name whose checkpoint sevenn would have to download."""

    def __init__(self, path: str, url: str) -> None:
        super().__init__(path)
        self.path, self.url = path, url


def pretrained_path(name: str) -> str:
    """sevenn's name -> path lookup, without its download.

    ``sevenn.util.pretrained_name_to_path`` downloads checkpoints that the
    wheel does not ship, and ``download_checkpoint`` creates their directory
    inside site-packages before the HTTP request, so an offline attempt leaves
    empty directories in the installation. The download function is replaced
    for the duration of the lookup: a checkpoint that is not on disk raises
    :class:`NotLocal`, and nothing is written anywhere.
    """

    def _refuse(path: str, url: str) -> str:
        raise NotLocal(path, url)

    saved = _sevenn_util.download_checkpoint
    _sevenn_util.download_checkpoint = _refuse
    try:
        return _sevenn_util.pretrained_name_to_path(name)
    finally:
        _sevenn_util.download_checkpoint = saved


# ---- sevenn's log ------------------------------------------------------------------
def open_log_file():
    """The file sevenn's Logger writes to now: None when no Logger exists,
    none is open, or on a rank other than 0. Never creates the Logger (a
    process-wide singleton that keeps the arguments of its first creation)."""
    from sevenn.logger import Logger, Singleton

    logger = Singleton._instances.get(Logger)
    return getattr(logger, 'logfile', None) if logger is not None else None
