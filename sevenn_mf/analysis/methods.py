"""Ways to use scarce high-fidelity (HF) data, trained from one YAML.

The input is an ordinary sevenn_mf training YAML whose databases carry
fidelities. One fidelity is the HF one (``train.hf_fidelity``, default
``train.best_fidelity``); every other database is low fidelity (LF).
``train.method`` (or ``sevenn_mf train --method``) picks what is trained:

``hf-only``
    The HF databases alone: a single-fidelity model (kept as a one-fidelity
    sevenn_mf model whose fidelity is the HF name).
``transfer``
    Stage ``lf``: the LF databases alone. Stage ``finetune``: continue from
    the best LF checkpoint on the HF databases (the HF fidelity is added as a
    copy of the LF one; its element references are refitted to the
    pretrained predictions, since the HF energy zero differs). Options in
    ``train.transfer``: ``pretrain_epochs``, ``finetune_epochs``,
    ``finetune_lr``, ``shared_lr_factor``.
``delta``
    Stage ``lf``: model A on the LF databases. Stage ``delta``: model B on
    HF - LF differences (energy and, where both exist, forces) of the HF
    structures, whose LF labels come from ``train.delta.paired_files`` and
    are matched by ``atoms.info['set']`` and ``['index']``. Prediction at HF
    is A(LF) + B. Options in ``train.delta``: ``paired_files`` (required),
    ``lf_fidelity``, ``lf_epochs``, ``delta_epochs``, ``scale`` (``fixed``,
    the default, or ``fitted``: B learns HF - a LF and A is replaced by a
    copy scaled by a, fitted to the paired training energies,
    :func:`sevenn_mf.analysis.delta.fit_delta_scale`).
``mf``, ``mf-onehot``, ``mf-indexed``
    Every database together, one multi-fidelity model (``mf`` keeps the
    YAML's ``fidelity_layer_mode``), with the YAML's ``train.coupling``
    (coupled fidelity heads, :mod:`sevenn_mf.coupling`).
    ``train.mf: {init: lf}`` starts that model from the LF model of
    ``transfer`` and ``delta`` (stage ``lf``, shared with them) instead of
    from scratch: every fidelity head begins as the LF one (the HF element
    references refitted to its predictions, as in ``transfer``), then all
    databases train together. Options: ``init`` (``scratch``, the default,
    or ``lf``), ``lf_epochs``, ``lr`` (the multi-fidelity stage's learning
    rate, default ``optim_param.lr``: a model started from the LF one is
    fine-tuned, and Adam's first steps at a from-scratch rate undo its fit),
    ``early_stopping`` (that stage's, default ``train.early_stopping``:
    started from the LF model, the LF validation loss hardly moves while the
    HF head learns, so ``monitor: best`` watches the HF validation loss),
    ``restarts`` (k: that stage k times with seeds ``random_seed`` + 1000 r,
    keeping the one whose heads fit the HF structures best,
    :mod:`sevenn_mf.analysis.restarts`),
    ``freeze_shared`` (``true``, with ``init: lf``: that stage trains only
    the fidelity-dependent weights and references, :func:`sevenn_mf.train.freeze_shared`;
    the shared layers stay the LF model's),
    ``paired`` (``true``: the HF structures' LF labels from
    ``train.delta.paired_files`` join that stage as one more LF database,
    so the heads' gap is seen where both labels exist, not only through the
    LF head's own errors; a learning curve's HF subset takes its partners).
``mf-transfer``
    ``mf`` (with its ``train.mf``), then stage ``finetune``: that model
    fine-tuned on the HF databases alone, as ``transfer`` fine-tunes its LF
    model (``train.transfer`` options). The HF head may then move away from
    the LF one where only LF data is (the PBE head is not trained any more):
    a hybrid that gives up the coupled heads for the last step.
``mf-uncoupled``
    Multi-fidelity training as it was before coupled heads, for comparison:
    the YAML without ``train.coupling`` and with sevenn's fidelity-dependent
    positions (self-interaction intro / outro and output block) and one-hot
    layers; its ``train.mf`` applies.

``train.min_epoch_length: M`` makes a stage whose training set is smaller
than M (and whose own ``data.sampling`` draws fewer) draw M structures per
epoch (repeating the set; sevenn_mf's ``temperature`` sampler with T = 1), so
that small HF sets get as many
optimizer steps as the LF ones instead of a handful.

Every stage is an ordinary :func:`sevenn_mf.train.train` run in its own
folder with a ``stage.json`` (fingerprint of its config and input files,
status, time). A finished stage with the same fingerprint is reused, which is
what makes learning curves resumable and lets ``transfer`` and ``delta`` share
one LF model. The result of a method is ``model.json``: the checkpoint(s) and
fidelity(ies) whose predictions, summed, are the HF prediction
(:mod:`sevenn_mf.analysis.predict`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from ..config import DELTA_KEYS, METHOD_KEYS, MF_INITS, MF_KEYS, TRANSFER_KEYS
from .delta import (
    DELTA_FIDELITY,
    delta_databases,
    fit_delta_scale,
    hf_pairs,
    paired_lf_databases,
    scaled_checkpoint,
)
from .restarts import hf_frames_and_partners

METHODS = (
    'hf-only',
    'transfer',
    'delta',
    'mf',
    'mf-uncoupled',
    'mf-onehot',
    'mf-indexed',
    'mf-transfer',
)
MF_METHODS = ('mf', 'mf-uncoupled', 'mf-onehot', 'mf-indexed')
# fidelity-dependent positions of multi-fidelity training before coupled heads
# (sevenn's MF-0 preset; sevenn_mf's default until measured otherwise)
LEGACY_POSITIONS = (
    'use_modal_self_inter_intro',
    'use_modal_self_inter_outro',
    'use_modal_output_block',
)
POSITION_KEYS = LEGACY_POSITIONS + ('use_modal_node_embedding', 'fidelity_radial')
# train-section keys read here (METHOD_KEYS; removed before sevenn's parser
# sees the YAML), TRANSFER_KEYS and DELTA_KEYS: defined with the other known
# keys in sevenn_mf.config
MODEL_JSON = 'model.json'
STAGE_JSON = 'stage.json'


class MethodError(ValueError):
    pass


# ---- input ----------------------------------------------------------------------
@dataclass
class MethodInput:
    """A training YAML split into sevenn_mf's sections and the method options."""

    raw: Dict[str, Any]  # model / train / data, without METHOD_KEYS
    base_dir: str
    method: Optional[str] = None
    hf_fidelity: Optional[str] = None
    transfer: Dict[str, Any] = field(default_factory=dict)
    delta: Dict[str, Any] = field(default_factory=dict)
    mf: Dict[str, Any] = field(default_factory=dict)
    min_epoch_length: Optional[int] = None
    path: Optional[str] = None
    _species: Optional[List[str]] = None

    # -- databases -----------------------------------------------------------------
    @property
    def databases(self) -> List[Dict[str, Any]]:
        return list((self.raw.get('data') or {}).get('databases') or [])

    @property
    def hf_databases(self) -> List[Dict[str, Any]]:
        return [
            db for db in self.databases if db.get('fidelity') == self.hf_fidelity
        ]

    @property
    def lf_databases(self) -> List[Dict[str, Any]]:
        return [
            db for db in self.databases if db.get('fidelity') != self.hf_fidelity
        ]

    @property
    def lf_fidelities(self) -> List[str]:
        out: List[str] = []
        for db in self.lf_databases:
            if db['fidelity'] not in out:
                out.append(db['fidelity'])
        return out

    def with_hf_files(self, files: Dict[str, List[str]]) -> MethodInput:
        """A copy whose HF databases read ``files[db name]`` (absolute paths)."""
        new = copy.deepcopy(self)
        for db in new.raw['data']['databases']:
            if db.get('fidelity') == self.hf_fidelity:
                db['files'] = list(files[db['name']])
        return new

    def species(self) -> List[str]:
        """Every element of every database and paired file (one type map for
        all stages, so that the parts of a delta model agree)."""
        if self._species is None:
            from ase.data import chemical_symbols

            from ..data.databases import read_frames

            numbers = set()
            for _, frames in _frames_of(self.databases, self.base_dir):
                for fr in frames:
                    numbers.update(int(z) for z in fr.numbers)
            for f in self.paired_files():
                for fr in read_frames(f):
                    numbers.update(int(z) for z in fr.numbers)
            self._species = sorted(chemical_symbols[z] for z in numbers)
        return list(self._species)

    def paired_files(self) -> List[str]:
        files = self.delta.get('paired_files') or []
        if isinstance(files, str):
            files = [files]
        return [
            os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(f)))
            for f in files
        ]


def _check_method(method: Optional[str]) -> None:
    if method is not None and method not in METHODS:
        raise MethodError(
            f'unknown method {method!r}; choose one of {", ".join(METHODS)}'
        )


def method_input_from_dict(
    raw: Dict[str, Any], base_dir: str = '.', path: Optional[str] = None
) -> MethodInput:
    from ..config import check_keys

    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise MethodError('expected a mapping with sections model/train/data')
    check_keys(raw, path)  # every key known, with a suggestion for a typo
    for sec in ('model', 'train', 'data'):
        raw[sec] = dict(raw.get(sec) or {})
    train = raw['train']
    opts = {k: train.pop(k) for k in METHOD_KEYS if k in train}
    method = opts.get('method')
    _check_method(method)
    hf = opts.get('hf_fidelity') or train.get('best_fidelity')
    transfer = dict(opts.get('transfer') or {})
    delta = dict(opts.get('delta') or {})
    mf = dict(opts.get('mf') or {})
    for name, d, allowed in (
        ('transfer', transfer, TRANSFER_KEYS),
        ('delta', delta, DELTA_KEYS),
        ('mf', mf, MF_KEYS),
    ):
        bad = sorted(set(d) - set(allowed))
        if bad:
            raise MethodError(
                f'train.{name}: unknown key(s) {bad}; allowed: {", ".join(allowed)}'
            )
    if mf.get('init', 'scratch') not in MF_INITS:
        raise MethodError(
            f'train.mf.init must be one of {", ".join(MF_INITS)}, got {mf["init"]!r}'
        )
    lr = mf.get('lr')
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0
    ):
        raise MethodError(f'train.mf.lr must be a positive number, got {lr!r}')
    if mf.get('early_stopping') is not None:
        from ..train import early_stopping_settings

        try:
            early_stopping_settings(
                {'early_stopping': mf['early_stopping']}, best_loader='(checked)'
            )
        except ValueError as exc:
            raise MethodError(str(exc).replace('train.', 'train.mf.')) from None
    if not isinstance(mf.get('paired', False), bool):
        raise MethodError(
            f'train.mf.paired must be true or false, got {mf["paired"]!r}'
        )
    if not isinstance(mf.get('freeze_shared', False), bool):
        raise MethodError(
            f'train.mf.freeze_shared must be true or false, got {mf["freeze_shared"]!r}'
        )
    if mf.get('freeze_shared') and mf.get('init', 'scratch') != 'lf':
        raise MethodError(
            'train.mf.freeze_shared: true needs train.mf.init: lf (the shared '
            "weights it holds fixed are the LF model's; from scratch they would "
            'stay random)'
        )
    if delta.get('scale', 'fixed') not in ('fixed', 'fitted'):
        raise MethodError(
            f'train.delta.scale must be fixed or fitted, got {delta["scale"]!r}'
        )
    k = mf.get('restarts', 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MethodError(f'train.mf.restarts must be a positive integer, got {k!r}')
    mel = opts.get('min_epoch_length')
    if mel is not None and (not isinstance(mel, int) or mel < 1):
        raise MethodError(
            f'train.min_epoch_length must be a positive integer, got {mel!r}'
        )
    return MethodInput(
        raw=raw,
        base_dir=os.path.abspath(base_dir),
        method=method,
        hf_fidelity=hf,
        transfer=transfer,
        delta=delta,
        mf=mf,
        min_epoch_length=mel,
        path=path,
    )


def read_method_input(path: str) -> MethodInput:
    from ..config import read_sections

    path = os.path.abspath(path)
    raw = read_sections(path, MethodError)
    return method_input_from_dict(raw, os.path.dirname(path), path)


def yaml_has_method(path: str) -> bool:
    """Whether a YAML names ``train.method`` (then ``sevenn_mf train`` runs it
    through this module)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return (
        isinstance(raw, dict)
        and isinstance(raw.get('train'), dict)
        and any(k in raw['train'] for k in METHOD_KEYS)
    )


def _validate(mi: MethodInput, method: str) -> None:
    if not mi.hf_fidelity:
        raise MethodError(
            'which fidelity is the high one? set train.hf_fidelity '
            '(or train.best_fidelity)'
        )
    fids = sorted({db.get('fidelity') for db in mi.databases})
    if not mi.hf_databases:
        raise MethodError(
            f"no database has the HF fidelity '{mi.hf_fidelity}' "
            f'(fidelities: {", ".join(map(str, fids))})'
        )
    if method != 'hf-only' and not mi.lf_databases:
        raise MethodError(
            f'method {method} needs low-fidelity databases besides '
            f"the HF ones ('{mi.hf_fidelity}')"
        )
    mf_stage = method in MF_METHODS + ('mf-transfer',)
    needs = None  # what reads the paired files
    if method == 'delta':
        needs = 'method delta'
    elif mf_stage and mi.mf.get('paired'):
        needs = 'train.mf.paired'
    if needs and not mi.paired_files():
        raise MethodError(
            f'{needs} needs train.delta.paired_files: the LF '
            'labels of the HF structures (matched by set and index)'
        )
    # the restarts' gap criterion reads the paired files' LF fidelity too:
    # an ambiguous one stops the run here, not after the LF stage
    if needs or (mf_stage and mi.mf.get('restarts', 1) > 1 and mi.paired_files()):
        # and every HF structure's partner, so that a missing or mismatched
        # one stops the run here, not after the LF stage has trained
        hf_frames_and_partners(mi, _delta_lf_fidelity(mi))


def _delta_lf_fidelity(mi: MethodInput) -> str:
    lf = mi.delta.get('lf_fidelity')
    if lf is None:
        if len(mi.lf_fidelities) != 1:
            raise MethodError(
                'several LF fidelities: name the one the paired files '
                'hold in train.delta.lf_fidelity '
                f'({", ".join(mi.lf_fidelities)})'
            )
        return mi.lf_fidelities[0]
    if lf not in mi.lf_fidelities:
        raise MethodError(
            f"train.delta.lf_fidelity '{lf}' is not an LF database "
            f'fidelity ({", ".join(mi.lf_fidelities)})'
        )
    return lf


# ---- stages -----------------------------------------------------------------------
def _referenced_files(obj: Any, base_dir: str) -> List[str]:
    out = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _referenced_files(v, base_dir)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _referenced_files(v, base_dir)
    elif isinstance(obj, str) and len(obj) < 4096:
        p = os.path.join(base_dir, os.path.expanduser(obj))
        if os.path.isfile(p):
            out.append(os.path.abspath(p))
    return out


def fingerprint(raw: Dict[str, Any], base_dir: str) -> str:
    """Of a stage: its config and the contents of every file it names."""
    from ..data.databases import file_digest

    h = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode())
    for p in sorted(set(_referenced_files(raw, base_dir))):
        h.update(file_digest(p).encode())
    return h.hexdigest()


@dataclass
class StageResult:
    name: str
    directory: str
    checkpoint: str
    seconds: float  # wall time of its training (when it ran)
    trained_now: bool  # False: reused a finished stage


def _write_json(path: str, obj: Any) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_stage(
    name: str,
    raw: Dict[str, Any],
    base_dir: str,
    stage_dir: str,
    resume: bool = False,
    screen: bool = True,
    graph_cache: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Train one stage in ``stage_dir``, or reuse it when it already finished
    with the same fingerprint. An interrupted stage continues with ``resume``."""
    from ..config import config_from_dict
    from ..train import LAST, train

    stage_dir = os.path.abspath(stage_dir)
    fp = fingerprint(raw, base_dir)
    meta_path = os.path.join(stage_dir, STAGE_JSON)
    meta = _read_json(meta_path)
    started = meta is not None and (
        meta.get('status') == 'done' or os.path.isfile(os.path.join(stage_dir, LAST))
    )
    if meta is not None and meta.get('fingerprint') != fp and started:
        raise MethodError(
            f'{stage_dir} holds a {meta.get("name")} stage of a different input '
            '(config or data changed); use another working directory'
        )
    if (
        meta is not None
        and meta.get('status') == 'done'
        and os.path.isfile(meta.get('checkpoint', ''))
    ):
        log(f'[{name}] finished before, reused: {meta["checkpoint"]}')
        return StageResult(
            name,
            stage_dir,
            meta['checkpoint'],
            float(meta.get('seconds', 0.0)),
            False,
        )
    last = os.path.join(stage_dir, LAST)
    cont = os.path.isfile(last)
    if cont and not resume:
        raise FileExistsError(
            f'{stage_dir} holds an unfinished {name} stage; use '
            '--resume to continue it or choose another directory'
        )
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, 'input.yaml'), 'w') as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    spent = float(meta.get('seconds', 0.0)) if (meta and cont) else 0.0
    _write_json(
        meta_path,
        {
            'name': name,
            'fingerprint': fp,
            'status': 'running',
            'base_dir': base_dir,
            'seconds': spent,
        },
    )
    config = config_from_dict(raw, base_dir)
    if graph_cache:
        config['graph_cache_dir'] = graph_cache
    log(f'[{name}] training in {stage_dir}' + (' (resumed)' if cont else ''))
    t0 = time.time()
    ckpt = train(config, stage_dir, resume=cont, screen=screen)
    seconds = spent + time.time() - t0
    _write_json(
        meta_path,
        {
            'name': name,
            'fingerprint': fp,
            'status': 'done',
            'base_dir': base_dir,
            'checkpoint': ckpt,
            'seconds': seconds,
        },
    )
    log(f'[{name}] done in {seconds:.0f} s: {ckpt}')
    return StageResult(name, stage_dir, ckpt, seconds, True)


# ---- building the stage configs ---------------------------------------------------
_FRAME_CACHE: Dict[Tuple[str, float], Any] = {}


def _frames_of(databases: Sequence[Dict[str, Any]], base_dir: str):
    """(spec, frames) of each database (file reads are cached per process)."""
    from ..data.databases import parse_databases, read_frames

    out = []
    for spec in parse_databases(list(databases), base_dir):
        key = (
            json.dumps([spec.files, spec.reader], sort_keys=True, default=str),
            tuple(os.path.getmtime(f) for f in spec.files),
        )
        if key not in _FRAME_CACHE:
            _FRAME_CACHE[key] = read_frames(spec)
        out.append((spec, _FRAME_CACHE[key]))
    return out


def _n_training(spec, frames) -> int:
    n = len(frames)
    v = spec.validation or {}
    if v.get('ratio'):
        n_valid = int(round(v['ratio'] * n))
        if n >= 2:
            n_valid = min(max(n_valid, 1), n - 1)
        n -= n_valid
    return n


def energy_only_scale(frames) -> float:
    """A scale for a model trained on energies only (no force RMS to take):
    the spread of the total energies left after a per-element linear fit, per
    sqrt(atom). 1.0 when that cannot be estimated."""
    from ase.data import chemical_symbols

    from ..data.references import fit_reference_energies, reference_energy

    frames = [f for f in frames if np.isfinite(f.energy)]
    if len(frames) < 3:
        return 1.0
    species = sorted({chemical_symbols[int(z)] for f in frames for z in f.numbers})
    try:
        refs = fit_reference_energies(frames, species)
    except Exception:
        return 1.0
    resid = np.array([f.energy - reference_energy(refs, f.numbers) for f in frames])
    natoms = np.mean([len(f.numbers) for f in frames])
    s = float(np.std(resid) / np.sqrt(natoms))
    return s if np.isfinite(s) and s > 1e-4 else 1.0


def stage_raw(
    mi: MethodInput,
    databases: Sequence[Dict[str, Any]],
    *,
    best_fidelity: str,
    epochs: Optional[int] = None,
    mode: Optional[str] = None,
    lr: Optional[float] = None,
    train_extra: Optional[Dict[str, Any]] = None,
    base_dir: Optional[str] = None,
    coupling: bool = False,
) -> Dict[str, Any]:
    """The training YAML (as a dict) of one stage."""
    import warnings

    base_dir = base_dir or mi.base_dir
    raw = copy.deepcopy(mi.raw)
    model, train, data = raw['model'], raw['train'], raw['data']
    if not coupling:  # coupled heads belong to the multi-fidelity stage only
        train.pop('coupling', None)
    data['databases'] = copy.deepcopy(list(databases))
    fids = {db['fidelity'] for db in databases}
    train['best_fidelity'] = best_fidelity
    if epochs is not None:
        train['epoch'] = int(epochs)
        sp = train.get('scheduler_param')
        if (
            str(train.get('scheduler', '')).lower() == 'linearlr'
            and isinstance(sp, dict)
            and 'total_iters' in sp
        ):
            sp['total_iters'] = int(epochs)
    if lr is not None:
        train['optim_param'] = dict(train.get('optim_param') or {}, lr=float(lr))
    if train_extra:
        train.update(copy.deepcopy(train_extra))
    if mode is not None:
        model['fidelity_layer_mode'] = mode
    if len(fids) == 1:
        # one fidelity, one head: where the heads of a multi-fidelity model
        # would differ does not apply, so single-fidelity stages (hf-only, the
        # LF model of transfer and delta, delta's correction) are built with
        # sevenn_mf's defaults and do not change when the MF recipe does
        for k in POSITION_KEYS + ('fidelity_layer_mode',):
            model.pop(k, None)
    chem = model.get('chemical_species', 'auto')
    if isinstance(chem, str) and chem.lower() == 'auto':
        model['chemical_species'] = mi.species()
    refs = data.get('reference_energies')
    if isinstance(refs, dict):
        data['reference_energies'] = {k: v for k, v in refs.items() if k in fids}
    names = {db['name'] for db in databases}
    sampling = data.get('sampling')
    if (
        isinstance(sampling, dict)
        and isinstance(sampling.get('ratios'), dict)
        and set(sampling['ratios']) != names
    ):
        data.pop('sampling')  # the YAML's ratios name databases this stage lacks
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        frames = _frames_of(databases, base_dir)
    n_train = sum(_n_training(s, f) for s, f in frames)
    kept = data.get('sampling') or {}
    if (
        mi.min_epoch_length
        and n_train < mi.min_epoch_length
        and int(kept.get('epoch_length') or 0) < mi.min_epoch_length
    ):  # the YAML's own sampling, when it draws enough, is kept
        data['sampling'] = {
            'mode': 'temperature',
            'temperature': 1.0,
            'epoch_length': int(mi.min_epoch_length),
        }
    if data.get('scale', 'force_rms') == 'force_rms' and not train.get('pretrained'):
        has_forces = any(fr.present.get('force') for _, fs in frames for fr in fs)
        if not has_forces:
            data['scale'] = energy_only_scale([fr for _, fs in frames for fr in fs])
    return raw


# ---- methods --------------------------------------------------------------------
@dataclass
class MethodResult:
    method: str
    hf_fidelity: str
    parts: List[Tuple[str, str]]  # (checkpoint, fidelity): HF prediction = sum
    stages: List[StageResult]
    directory: str

    @property
    def seconds_now(self) -> float:
        return sum(s.seconds for s in self.stages if s.trained_now)

    @property
    def seconds_total(self) -> float:
        return sum(s.seconds for s in self.stages)

    def to_json(self) -> Dict[str, Any]:
        d = self.directory

        def rel(p):
            return os.path.relpath(p, d)

        return {
            'method': self.method,
            'hf_fidelity': self.hf_fidelity,
            'parts': [{'checkpoint': rel(c), 'fidelity': f} for c, f in self.parts],
            'stages': [
                {
                    'name': s.name,
                    'directory': rel(s.directory),
                    'checkpoint': rel(s.checkpoint),
                    'seconds': round(s.seconds, 2),
                    'trained_now': s.trained_now,
                }
                for s in self.stages
            ],
            'note': 'HF prediction = sum over parts of checkpoint at fidelity',
        }


def lf_stage(mi: MethodInput, epochs: Optional[int]) -> Tuple[str, Dict[str, Any]]:
    raw = stage_raw(
        mi, mi.lf_databases, best_fidelity=mi.lf_fidelities[0], epochs=epochs
    )
    return 'lf', raw


def _finetune_raw(mi: MethodInput, extra: Dict[str, Any], epochs) -> Dict[str, Any]:
    """The stage that fine-tunes ``extra['pretrained']`` on the HF databases
    alone (``train.transfer`` options)."""
    opt = mi.transfer
    extra = dict(extra)
    if opt.get('shared_lr_factor') is not None:
        extra['shared_lr_factor'] = float(opt['shared_lr_factor'])
    return stage_raw(
        mi,
        mi.hf_databases,
        best_fidelity=mi.hf_fidelity,
        epochs=opt.get('finetune_epochs', epochs),
        lr=opt.get('finetune_lr'),
        train_extra=extra,
    )


def _best_restart(mi, name, raw, stage, working_dir, log) -> StageResult:
    """The MF stage, or with ``train.mf.restarts: k`` the best of k runs of
    it (:mod:`sevenn_mf.analysis.restarts`); its choice in
    ``restarts.json``."""
    from . import restarts as rs

    k = int(mi.mf.get('restarts', 1))
    if k == 1:
        return stage(name, raw)
    lf = _delta_lf_fidelity(mi) if mi.paired_files() else None
    hf_frames, lf_frames = rs.hf_frames_and_partners(mi, lf)
    seed = raw['train'].get('random_seed')
    results, scores = [], []
    for r in range(k):
        raw_r = copy.deepcopy(raw)
        raw_r['train']['random_seed'] = rs.restart_seed(seed, r)
        res = stage(name if r == 0 else f'{name}_r{r}', raw_r)
        score = rs.fit_criterion(
            res.checkpoint, mi.hf_fidelity, hf_frames, lf, lf_frames
        )
        log(
            f'[{name}] restart {r}: {score["name"]} {1000 * score["value"]:.2f} meV/atom'
        )
        results.append(res)
        scores.append(dict(score, stage=os.path.basename(res.directory)))
    best = rs.choose(scores)
    log(f'[{name}] kept restart {best} ({scores[best]["stage"]})')
    _write_json(
        os.path.join(working_dir, 'restarts.json'),
        {'kept': best, 'restarts': scores, 'unit': 'eV/atom'},
    )
    kept = results[best]
    # every restart's training time counts towards the method's cost
    return StageResult(
        name,
        kept.directory,
        kept.checkpoint,
        sum(x.seconds for x in results),
        any(x.trained_now for x in results),
    )


def run_method(
    mi: MethodInput,
    method: Optional[str],
    working_dir: str,
    *,
    resume: bool = False,
    screen: bool = True,
    epochs: Optional[int] = None,
    shared_dir: Optional[str] = None,
    graph_cache: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> MethodResult:
    """Train ``method`` (default ``mi.method``) in ``working_dir``.

    ``shared_dir``: where stages that do not depend on the HF data (the LF
    model of ``transfer`` and ``delta``) live, one folder per fingerprint,
    so that several runs share them; default: inside ``working_dir``.
    """
    method = method or mi.method
    if method is None:
        raise MethodError(
            f'no method: give --method or train.method ({", ".join(METHODS)})'
        )
    _check_method(method)
    _validate(mi, method)
    if epochs is not None:
        mi = copy.deepcopy(mi)
        mi.raw['train']['epoch'] = int(epochs)
    from ..config import config_from_dict

    # every option checked before any folder is made (stages check theirs again)
    config_from_dict(mi.raw, mi.base_dir, source=mi.path)
    working_dir = os.path.abspath(working_dir)
    os.makedirs(working_dir, exist_ok=True)
    hf = mi.hf_fidelity
    E = mi.raw['train'].get('epoch')
    kw = dict(resume=resume, screen=screen, graph_cache=graph_cache, log=log)

    def stage(name, raw, shared=False):
        if shared and shared_dir:
            d = os.path.join(
                shared_dir, f'{name}_{fingerprint(raw, mi.base_dir)[:12]}'
            )
            return run_stage(name, raw, mi.base_dir, d, **dict(kw, resume=True))
        return run_stage(
            name, raw, mi.base_dir, os.path.join(working_dir, name), **kw
        )

    stages: List[StageResult] = []

    def lf_model(epochs) -> str:
        """Train (or reuse) the LF stage shared by transfer, delta and mf
        with init: lf; its checkpoint."""
        _, raw = lf_stage(mi, epochs)
        stages.append(stage('lf', raw, shared=True))
        return stages[-1].checkpoint

    def from_lf(checkpoint: str) -> Dict[str, Any]:
        """Train keys that start a model from the LF checkpoint, the HF
        fidelity a copy of the LF one with its references refitted."""
        return {
            'pretrained': checkpoint,
            'pretrained_add': {hf: mi.lf_fidelities[0]},
            'fit_new_references': True,
        }

    if method == 'hf-only':
        raw = stage_raw(mi, mi.hf_databases, best_fidelity=hf, epochs=E)
        stages.append(stage('hf-only', raw))
        parts = [(stages[-1].checkpoint, hf)]
    elif method in MF_METHODS or method == 'mf-transfer':
        mode = (
            method.split('-')[1] if method in ('mf-onehot', 'mf-indexed') else None
        )
        extra = None
        if mi.mf.get('init') == 'lf':
            # the MF heads start where the LF model's fit ended, not from noise
            extra = from_lf(lf_model(mi.mf.get('lf_epochs', E)))
        if mi.mf.get('early_stopping'):
            extra = dict(extra or {}, early_stopping=mi.mf['early_stopping'])
        if mi.mf.get('freeze_shared'):
            # the MF stage alone: the LF stage it starts from trains everything
            extra = dict(extra or {}, freeze_shared=True)
        databases = mi.databases
        if mi.mf.get('paired'):
            # the HF structures at LF too: where both labels exist the heads'
            # gap is seen directly, not through the LF head's own errors
            databases = databases + paired_lf_databases(
                mi, _delta_lf_fidelity(mi), os.path.join(working_dir, 'paired_data')
            )
        raw = stage_raw(
            mi,
            databases,
            best_fidelity=hf,
            epochs=E,
            mode=mode,
            lr=mi.mf.get('lr'),
            train_extra=extra,
            coupling=method != 'mf-uncoupled',
        )
        if method == 'mf-uncoupled':  # as before coupled heads: sevenn's layers
            raw['model'].update({k: True for k in LEGACY_POSITIONS})
            raw['model']['use_modal_node_embedding'] = False
            raw['model']['fidelity_radial'] = False
            raw['model']['fidelity_layer_mode'] = 'onehot'
        name = 'mf' if method == 'mf-transfer' else method
        stages.append(_best_restart(mi, name, raw, stage, working_dir, log))
        parts = [(stages[-1].checkpoint, hf)]
        if method == 'mf-transfer':
            raw = _finetune_raw(mi, {'pretrained': stages[-1].checkpoint}, E)
            stages.append(stage('finetune', raw))
            parts = [(stages[-1].checkpoint, hf)]
    elif method == 'transfer':
        ckpt = lf_model(mi.transfer.get('pretrain_epochs', E))
        raw = _finetune_raw(mi, from_lf(ckpt), E)
        stages.append(stage('finetune', raw))
        parts = [(stages[-1].checkpoint, hf)]
    elif method == 'delta':
        opt = mi.delta
        lf = _delta_lf_fidelity(mi)
        base = lf_model(opt.get('lf_epochs', E))
        factor = 1.0
        paired = hf_pairs(mi)
        if opt.get('scale', 'fixed') == 'fitted':
            fit = fit_delta_scale(mi, lf, paired)
            factor = fit.a
            base = scaled_checkpoint(
                base, factor, os.path.join(working_dir, 'lf_scaled.pth')
            )
            log(
                f'[delta] energy scale fit: {fit.describe(hf, lf)}; model A '
                f'scaled to {base}'
            )
        dbs = delta_databases(
            mi, lf, os.path.join(working_dir, 'delta_data'), factor, paired
        )
        raw = stage_raw(
            mi,
            dbs,
            best_fidelity=DELTA_FIDELITY,
            epochs=opt.get('delta_epochs', E),
            base_dir=mi.base_dir,
        )
        stages.append(stage('delta', raw))
        parts = [(base, lf), (stages[1].checkpoint, DELTA_FIDELITY)]
    else:  # pragma: no cover
        raise MethodError(method)
    result = MethodResult(method, hf, parts, stages, working_dir)
    _write_json(os.path.join(working_dir, MODEL_JSON), result.to_json())
    return result


def train_cli(
    path: str,
    working_dir: str,
    method: Optional[str] = None,
    resume: bool = False,
    screen: bool = True,
    epochs: Optional[int] = None,
) -> MethodResult:
    mi = read_method_input(path)
    return run_method(
        mi, method, working_dir, resume=resume, screen=screen, epochs=epochs
    )
