"""What a resumed run must share with the run it continues.

``--resume`` continues the trajectory of a killed run exactly, which only
means something when the model, the data and the training settings are the
run's own. Each checkpoint stores the run's *fingerprint* (its input config,
with every database file replaced by the sha256 of its content); on resume
the fingerprint of the new input is compared with it and any difference
stops the run with a diff, before anything is built.

Allowed to change on resume (they do not change what is being trained):

* ``train.epoch`` (more, or fewer, epochs) and ``train.per_epoch``;
* ``train.early_stopping`` (patience, min_delta);
* ``train.device``, ``train.num_workers``, ``data.preprocess_workers``,
  ``data.graph_store_dir`` and the graph cache location.

Everything else (architecture, fidelities, databases and their files,
weights, splits, sampling, batch size, optimizer, scheduler, loss, coupling,
seed) must match.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from . import _sevenn as S
from ._sevenn import KEY
from .data.databases import file_digest

SAFE_KEYS = frozenset(
    {
        KEY.EPOCH,
        KEY.PER_EPOCH,
        S.EARLY_STOPPING,
        KEY.DEVICE,
        KEY.NUM_WORKERS,
        S.PREPROCESS_WORKERS,
        S.GRAPH_STORE_DIR,
        'graph_cache_dir',
        # bookkeeping, not settings
        'when',
        'version',
        '_base_dir',
        '_user_model_keys',
        KEY.IS_DDP,
        KEY.DDP_BACKEND,
        KEY.LOCAL_RANK,
        KEY.RANK,
        KEY.WORLD_SIZE,
    }
)


class ResumeMismatch(ValueError):
    pass


def _with_digests(value: Any, base_dir: str) -> Any:
    """Database file paths -> [path, content digest] (so an edited file is a
    change even under the same name)."""
    if isinstance(value, dict):
        return {k: _with_digests(v, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_digests(v, base_dir) for v in value]
    if isinstance(value, str) and len(value) < 4096:
        path = os.path.join(base_dir, os.path.expanduser(value))
        if os.path.isfile(path):
            return [value, file_digest(path)]
    return value


def fingerprint(config: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a training config that define the run (JSON-able)."""
    base = config.get('_base_dir', os.getcwd())
    out = {}
    for k in sorted(config):
        if k in SAFE_KEYS:
            continue
        v = config[k]
        if k == S.DATABASES:
            v = _with_digests(v, base)
        out[k] = json.loads(json.dumps(v, default=repr))
    return out


def differences(stored: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    out = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k, '<absent>'), current.get(k, '<absent>')
        if a != b:
            if k == S.DATABASES:
                out.append(f'{k}: the databases or their files changed')
            else:
                out.append(f'{k}: {_short(a)} -> {_short(b)}')
    return out


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, default=repr)
    return s if len(s) <= n else s[: n - 3] + '...'


def check_resume(stored: Dict[str, Any], config: Dict[str, Any], path: str) -> None:
    """Raise :class:`ResumeMismatch` listing what differs from the run that
    wrote ``path`` (a checkpoint written before fingerprints is accepted)."""
    if not stored:
        return
    diff = differences(stored, fingerprint(config))
    if diff:
        raise ResumeMismatch(
            f'--resume: {path} belongs to a run with different settings; '
            + '; '.join(diff[:6])
            + (f'; and {len(diff) - 6} more' if len(diff) > 6 else '')
            + '. Only train.epoch, per_epoch, early_stopping, device and worker '
            'counts may change on resume: restore the input, or start a new run '
            '(train.pretrained fine-tunes from this checkpoint).'
        )
