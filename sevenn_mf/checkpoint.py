"""Checkpoints: sevenn's own file format with our keys in its config.

A sevenn_mf checkpoint is a sevenn checkpoint (``model_state_dict``,
``config``, optimizer/scheduler state, ``epoch``) whose config also holds
``fidelity_layer_mode`` and ``fidelities``. Any source that sevenn can load
is accepted: our checkpoints, sevenn's native multi-modal ones (read as
``onehot`` models, their weights unchanged), plain single-fidelity ones and
pretrained names such as ``7net-0`` or ``7net-mf-0``.

Every file is read through :func:`read_checkpoint_file`, which says what is
wrong with one that is not a readable checkpoint (empty, truncated, a
TorchScript or other foreign file, an unknown dict, a config lacking keys) in
one :class:`CheckpointError` line naming the file.

A written file's state dict has the layout of *this* sevenn's builder: sevenn
converts the weights of checkpoints older than 0.11 on loading (renamed
modules, sorted convolution instructions, flipped Wigner-3j signs), keyed on
the config's ``version``. :func:`save_checkpoint` therefore stamps the running
sevenn's version, with the old-version config entries made explicit, so that
no loader converts the already converted weights a second time.
"""

from __future__ import annotations

import copy
import os
import pathlib
import tempfile
import zipfile
from datetime import datetime
from typing import Any, Dict, List, Optional, Union

import sevenn
import sevenn.scripts.backward_compatibility as compat
import sevenn.util as sevenn_util
import torch
from packaging.version import InvalidVersion, Version
from sevenn.nn.sequential import AtomGraphSequential

from . import _sevenn as S
from ._sevenn import KEY
from .data.files import publish
from .model import build_model, fidelity_names

PathLike = Union[str, pathlib.Path]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


# config keys sevenn's loader reads before it fills in defaults (its config
# routine, patch_old_config, init_shift_scale): without them it fails with a
# bare KeyError/TypeError
REQUIRED_CONFIG_KEYS = (
    'version',
    KEY.CUTOFF,
    KEY.CUTOFF_FUNCTION,
    KEY.TYPE_MAP,
    KEY.NUM_SPECIES,
    KEY.SHIFT,
    KEY.SCALE,
    KEY.TRAIN_SHIFT_SCALE,
)
REQUIRED_MODAL_KEYS = (
    KEY.MODAL_MAP,
    KEY.USE_MODAL_WISE_SHIFT,
    KEY.USE_MODAL_WISE_SCALE,
)
# sevenn converts the weights of checkpoints older than this on loading
_CONVERTED_BELOW = Version('0.11.0')
_EXPORT_MARK = 'sevenn_mf_fidelity'  # config key written by deploy.export only
_TRAINING_KEYS = ('optimizer_state_dict', 'scheduler_state_dict', 'epoch')


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ''
    # torch's state-dict errors put the useful part on the second line
    if text.startswith('Error(s) in loading state_dict') and len(lines) > 1:
        text = lines[1]
    text = text.rstrip('.')
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def _looks_like_text(head: bytes) -> bool:
    if not head or b'\0' in head:
        return False
    try:
        head.decode('utf-8')
    except UnicodeDecodeError:
        return False
    return True


def _check_zip(path: str, size: int) -> None:
    """torch.save (and TorchScript) files are zip archives: a truncated one
    lacks its central directory, which zipfile sees before torch does."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        raise CheckpointError(
            f'{path}: truncated or half-written file ({size:,} bytes, the end '
            'of its zip archive is missing): write or copy it again'
        ) from None
    if any('/code/' in n or n.endswith('/constants.pkl') for n in names):
        raise CheckpointError(
            f'{path}: a TorchScript file (a deployed model for LAMMPS), not a '
            'checkpoint: give the .pth checkpoint it was deployed from'
        )
    if not any(n.endswith('/data.pkl') or n == 'data.pkl' for n in names):
        raise CheckpointError(
            f'{path}: a zip archive but not a PyTorch file: not a checkpoint'
        )


def _load_failure(path: str, exc: Exception, head: bytes) -> CheckpointError:
    if _looks_like_text(head):
        return CheckpointError(f'{path}: a text file, not a checkpoint')
    if isinstance(exc, EOFError) or 'truncated' in str(exc):
        return CheckpointError(
            f'{path}: truncated or half-written file (it ends before its '
            'data does): write or copy it again'
        )
    if head[:1] == b'\x80' and 'magic number' in str(exc):
        return CheckpointError(
            f'{path}: a Python pickle not written by torch.save: not a checkpoint'
        )
    return CheckpointError(
        f'{path}: not a checkpoint, torch.load cannot read it ({_first_line(exc)})'
    )


def _check_contents(path: str, obj: Any) -> Dict[str, Any]:
    if isinstance(obj, torch.jit.ScriptModule):
        raise CheckpointError(
            f'{path}: a TorchScript file (a deployed model for LAMMPS), not a '
            'checkpoint: give the .pth checkpoint it was deployed from'
        )
    if isinstance(obj, torch.nn.Module):
        raise CheckpointError(
            f'{path}: a pickled {type(obj).__name__} object, not a checkpoint '
            '(a sevenn checkpoint is a dict with model_state_dict and config)'
        )
    if not isinstance(obj, dict):
        raise CheckpointError(
            f'{path}: holds a {type(obj).__name__}, not a checkpoint (a sevenn '
            'checkpoint is a dict with model_state_dict and config)'
        )
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f'{path}: a bare state dict (weights without a config), not a '
            'checkpoint: a sevenn checkpoint is a dict with model_state_dict '
            'and config'
        )
    missing = [k for k in ('model_state_dict', 'config') if k not in obj]
    if missing:
        keys = ', '.join(map(str, list(obj)[:8])) or 'none'
        raise CheckpointError(
            f'{path}: unknown format, a dict without {" and ".join(missing)} '
            f'(its keys: {keys}); a sevenn checkpoint has model_state_dict and '
            'config'
        )
    state, config = obj['model_state_dict'], obj['config']
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f'{path}: model_state_dict is empty or not a dict')
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path}: model_state_dict holds non-tensor values')
    if not isinstance(config, dict) or not config:
        raise CheckpointError(f'{path}: config is empty or not a dict')
    required = list(REQUIRED_CONFIG_KEYS)
    if config.get(KEY.USE_MODALITY, False):
        required += REQUIRED_MODAL_KEYS
    lacking = [k for k in required if k not in config]
    if lacking:
        raise CheckpointError(
            f'{path}: config lacks required key(s) {", ".join(lacking)}'
        )
    version = config['version']
    try:
        parsed = Version(str(version))
    except InvalidVersion:
        raise CheckpointError(
            f'{path}: config version {version!r} is not a version number'
        ) from None
    if _EXPORT_MARK in config and parsed < _CONVERTED_BELOW:
        raise CheckpointError(
            f'{path}: exported by an earlier sevenn_mf that kept the source '
            f'version {version} although the weights were already converted, '
            'so every loader converts them again (a wrong potential): export '
            'it again from its source'
        )
    return obj


def read_checkpoint_file(path: PathLike) -> Dict[str, Any]:
    """The dict stored in a checkpoint file, checked to be a sevenn checkpoint;
    otherwise a :class:`CheckpointError` that says what the file is."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(512)
    except OSError as exc:
        raise CheckpointError(
            f'{path}: cannot read it ({exc.strerror or exc})'
        ) from None
    if size == 0:
        raise CheckpointError(
            f'{path}: empty file (0 bytes), not a checkpoint (a run killed while '
            'writing it, or a failed copy?)'
        )
    if head[:4] == b'PK\x03\x04':
        _check_zip(path, size)
    try:
        obj = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as exc:  # torch/pickle raise anything on a foreign file
        raise _load_failure(path, exc, head) from None
    return _check_contents(path, obj)


def read_training_state(path: PathLike) -> Dict[str, Any]:
    """A checkpoint to resume training from (``train --resume``): checked like
    any checkpoint, and it must hold the optimizer, scheduler and epoch."""
    cp = read_checkpoint_file(path)
    lacking = [k for k in _TRAINING_KEYS if cp.get(k) is None]
    if lacking:
        raise CheckpointError(
            f'{path}: not a training checkpoint, it lacks '
            f'{", ".join(lacking)}: cannot resume from it'
        )
    return cp


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file (other spelling, symlink, hard link)."""
    a, b = str(a), str(b)
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting(source: PathLike, output: PathLike) -> None:
    """Refuse an output that would overwrite the input checkpoint."""
    if same_file(source, output):
        raise CheckpointError(
            f'{output}: the output is the input checkpoint ({source}): '
            'write to another file'
        )


def _resolve_source(source: PathLike) -> str:
    source = str(source)
    if os.path.isfile(source):
        return source
    if os.path.exists(source):
        raise CheckpointError(f'{source} is not a file')
    try:
        path = S.pretrained_path(source)
    except S.NotLocal as exc:
        raise CheckpointError(_offline_message(source, exc.path, exc.url)) from None
    except FileNotFoundError as exc:
        raise CheckpointError(_offline_message(source, str(exc), None)) from None
    except ValueError:
        names = ', '.join(sevenn_util.get_available_pretrained_models())
        raise CheckpointError(
            f'{source!r} is neither a checkpoint file nor a pretrained name '
            f'(pretrained: {names})'
        ) from None
    if not os.path.isfile(path):
        raise CheckpointError(_offline_message(source, path, None))
    return path


def _offline_message(name: str, path: str, url: Optional[str]) -> str:
    cache = path.replace(S.install_prefix(), os.path.expanduser('~/.cache/sevennet'))
    where = f'from {url} ' if url else ''
    return (
        f'pretrained checkpoint {name!r} is not shipped inside the sevenn wheel '
        'and sevenn_mf does not download it. Download it '
        f'{where}on a machine with network access and either put it at '
        f'{cache} (where sevenn looks for it; the name then works) or pass the '
        'local .pth file path instead of the name.'
    )


class Checkpoint:
    """A loaded checkpoint of any kind, seen as a sevenn_mf model."""

    def __init__(self, source: PathLike) -> None:
        self.source = str(source)
        self.path = _resolve_source(source)
        read_checkpoint_file(self.path)  # a clear error for a foreign file
        S.install_hooks()
        self._cp = sevenn_util.load_checkpoint(self.path)
        try:
            config = self._cp.config
        except Exception as exc:  # sevenn's config routine on an odd config
            raise CheckpointError(
                f'{self.path}: sevenn cannot read its config ({_first_line(exc)})'
            ) from None
        if config.get(KEY.USE_MODALITY, False) and not config.get(
            S.FIDELITY_LAYER_MODE
        ):
            # sevenn-native multi-modal: its layers are our onehot layers
            self.kind = 'native_multimodal'
            names = fidelity_names(config)
            config[S.FIDELITY_LAYER_MODE] = 'onehot'
            config[S.FIDELITIES] = names
            config[KEY.NUM_MODALITIES] = len(names)
        elif config.get(S.FIDELITY_LAYER_MODE):
            self.kind = 'sevenn_mf'
        else:
            self.kind = 'plain'
        self.config: Dict[str, Any] = config

    # -- contents --------------------------------------------------------------
    @property
    def fidelities(self) -> List[str]:
        return fidelity_names(self.config)

    @property
    def layer_mode(self) -> Optional[str]:
        return self.config.get(S.FIDELITY_LAYER_MODE) if self.fidelities else None

    @property
    def species(self) -> List[str]:
        from ase.data import chemical_symbols

        return [chemical_symbols[z] for z in self.config[KEY.TYPE_MAP]]

    @property
    def cutoff(self) -> float:
        return float(self.config[KEY.CUTOFF])

    @property
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        return self._cp.model_state_dict

    @property
    def optimizer_state_dict(self):
        return self._cp.optimizer_state_dict

    @property
    def scheduler_state_dict(self):
        return self._cp.scheduler_state_dict

    @property
    def epoch(self) -> Optional[int]:
        return self._cp.epoch

    @property
    def raw(self) -> Dict[str, Any]:
        """Everything stored in the file (for resuming)."""
        return read_checkpoint_file(self.path)

    @property
    def training_state(self) -> Dict[str, Any]:
        """What sevenn_mf training stored beside sevenn's entries (best
        value, early stopping, the run's fingerprint, the fidelity-gap range
        on the high-fidelity training structures); {} for other files."""
        if not hasattr(self, '_training_state'):
            self._training_state = dict(self.raw.get('sevenn_mf') or {})
        return self._training_state

    @property
    def gap_range(self) -> Optional[Dict[str, Any]]:
        return self.training_state.get('gap_range')

    def build_model(self) -> AtomGraphSequential:
        try:
            model = build_model(self.config)
            state = compat.patch_state_dict_if_old(
                self.model_state_dict, self.config, model
            )
            missing, unexpected = model.load_state_dict(state, strict=False)
        except CheckpointError:
            raise
        except Exception as exc:  # a config sevenn's builder cannot follow
            raise CheckpointError(
                f'{self.path}: the model its config describes cannot take its '
                f'weights ({_first_line(exc)})'
            ) from None
        if missing or unexpected:
            raise CheckpointError(
                f'{self.path}: checkpoint does not match the model it describes '
                f'(missing: {missing[:5]}, unexpected: {unexpected[:5]})'
            )
        return model

    def info(self) -> str:
        model = self.build_model()
        n_param = sum(p.numel() for p in model.parameters())
        rows = [
            ('file', self.path),
            ('kind', self.kind),
            ('fidelities', ', '.join(self.fidelities) or '(single fidelity)'),
            ('layer mode', self.layer_mode or '-'),
            (
                'fidelity positions',
                ', '.join(k for k in S.POSITION_FLAGS if self.config.get(k)) or '-',
            ),
            ('species', ', '.join(self.species)),
            ('cutoff', f'{self.cutoff:g} Å'),
            ('parameters', f'{n_param:,}'),
            ('epoch', str(self.epoch)),
            ('sevenn version', str(self.config.get('version'))),
        ]
        width = max(len(k) for k, _ in rows)
        return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def load_checkpoint(source: PathLike) -> Checkpoint:
    return Checkpoint(source)


def list_fidelities(source: PathLike) -> List[str]:
    """Fidelity names of a checkpoint or pretrained name ([] if single-fidelity)."""
    return Checkpoint(source).fidelities


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save that never leaves a half-written file at ``path``: a killed
    process leaves either the old file or the new one."""
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=d, prefix='.' + os.path.basename(path), suffix='.tmp'
    )
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_saves(folder: PathLike) -> List[str]:
    """Delete what :func:`atomic_torch_save` leaves when its process is
    killed mid-write (SIGKILL runs no cleanup): the hidden ``.<name>*.tmp``
    beside each ``.pth``. The ``.pth`` files themselves are whole either way.
    For a run's owner only (a resume), never while another process writes
    there. Returns the removed paths."""
    import glob

    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(folder), '.*.pth*.tmp')):
        os.unlink(tmp)
        removed.append(tmp)
    return removed


def save_checkpoint(
    path: PathLike, model: torch.nn.Module, config: Dict[str, Any], **extra: Any
) -> None:
    """Write a checkpoint sevenn's loaders understand (atomically).

    ``model`` is built by this sevenn, so its state dict has this sevenn's
    layout whatever checkpoint it was loaded from: the file gets this sevenn's
    version. The config entries sevenn derives from an old version on loading
    (``patch_old_config``: ``_normalize_sph``, ``conv_denominator``, ...) are
    made explicit first, since the new version no longer implies them.
    """
    config = copy.deepcopy(config)
    if config.get('version') and Version(str(config['version'])) < Version(
        sevenn.__version__
    ):
        config = compat.patch_old_config(config)  # idempotent
    config['version'] = sevenn.__version__
    config.setdefault(KEY.MODEL_TYPE, 'E3_equivariant_model')
    cp = {
        'model_state_dict': model.state_dict(),
        'optimizer_state_dict': None,
        'scheduler_state_dict': None,
        'time': datetime.now().strftime('%Y-%m-%d %H:%M'),
        'hash': os.urandom(16).hex(),
        'config': config,
        'epoch': 0,
    }
    cp.update(extra)
    atomic_torch_save(cp, path)
