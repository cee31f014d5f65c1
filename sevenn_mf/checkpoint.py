"""Checkpoints: sevenn's own file format with our keys in its config.

A sevenn_mf checkpoint is a sevenn checkpoint (``model_state_dict``,
``config``, optimizer/scheduler state, ``epoch``) whose config also holds
``fidelity_layer_mode`` and ``fidelities``. Any source that sevenn can load
is accepted: our checkpoints, sevenn's native multi-modal ones (read as
``onehot`` models, their weights unchanged), plain single-fidelity ones and
pretrained names such as ``7net-0`` or ``7net-mf-0``.
"""

from __future__ import annotations

import copy
import os
import pathlib
import tempfile
from datetime import datetime
from typing import Any, Dict, List, Optional, Union

import sevenn
import sevenn.scripts.backward_compatibility as compat
import sevenn.util as sevenn_util
import torch
from sevenn.nn.sequential import AtomGraphSequential

from . import _sevenn as S
from ._sevenn import KEY
from .model import build_model, fidelity_names

PathLike = Union[str, pathlib.Path]


class CheckpointError(ValueError):
    pass


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
        S.install_hooks()
        self._cp = sevenn_util.load_checkpoint(self.path)
        config = self._cp.config
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
        return torch.load(self.path, map_location='cpu', weights_only=False)

    def build_model(self) -> AtomGraphSequential:
        model = build_model(self.config)
        state = compat.patch_state_dict_if_old(
            self.model_state_dict, self.config, model
        )
        missing, unexpected = model.load_state_dict(state, strict=False)
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
                ', '.join(k for k in S.MODAL_POSITION_KEYS if self.config.get(k))
                or '-',
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(
    path: PathLike, model: torch.nn.Module, config: Dict[str, Any], **extra: Any
) -> None:
    """Write a checkpoint sevenn's loaders understand (atomically)."""
    config = copy.deepcopy(config)
    config.setdefault('version', sevenn.__version__)
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
