"""Fine-tuning a pretrained potential into a multi-fidelity model.

Training-YAML keys (train section unless noted):

``pretrained: SOURCE``
    A checkpoint file (relative to the YAML) or a pretrained name (``7net-0``,
    ``7net-mf-0``). The model is :func:`sevenn_mf.convert.convert`-ed from it:
    architecture, species, cutoff, energy shifts/scale and conv denominator
    come from the checkpoint; the YAML model section's architecture keys are
    ignored (a note lists the ones given). Honoured from the YAML model
    section: ``fidelity_layer_mode``, ``train_shift_scale``,
    ``train_denominator`` and, for a single-fidelity source, the
    ``use_modal_*`` positions. The data-derived statistics (``shift``,
    ``scale``, ``conv_denominator``) are the checkpoint's too.
``pretrained_fidelity: NAME``
    The name of a single-fidelity source's fidelity (default ``pbe``
    with a note); for a multi-fidelity source, the fidelity that new ones
    copy by default.
``pretrained_add: {NEW: FROM}``
    New fidelities and the existing one each starts as a copy of. A database
    fidelity that the checkpoint lacks and that is not listed here is added
    from ``pretrained_fidelity`` (or the checkpoint's first fidelity).
``fit_new_references: true`` / data ``reference_energies: {NAME: fit_to_pretrained}``
    Per-element energy references of the new fidelities (or of the named
    ones) fitted to the pretrained model's predictions: with E_pred the
    converted model's energy of each training structure of that fidelity (a
    new fidelity is a copy of its FROM fidelity, so this is FROM's
    prediction), least squares E_label - E_pred = sum_Z n_Z d_Z and d is
    added to the fidelity's shift. Numeric ``reference_energies`` entries
    replace the shift of the elements they name.
``freeze_shared: true``
    Only fidelity-dependent parameters and the per-fidelity energy references
    train. In onehot mode the fidelity columns share the ``linear.weight``
    tensor with the shared paths: a gradient mask and a restore after each
    optimizer step keep the shared entries fixed exactly (also under weight
    decay).
``shared_lr_factor: 0.1``
    Shared parameters train with lr x factor (a separate optimizer parameter
    group; the scheduler scales both groups alike). Shared entries of onehot
    fidelity tensors get their optimizer update scaled by the factor after each
    step, which for SGD/Adam/AdamW equals a step with lr x factor.
Replay
    A database of the pretraining fidelity next to the new data, with
    ``data.sampling: {mode: explicit, ratios: {db_name: r, ...}}``
    (:class:`sevenn_mf.data.sampler.DatabaseSampler`) keeps the old fidelity
    from drifting.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from ase.data import chemical_symbols
from torch_geometric.loader import DataLoader

from . import _sevenn as S
from ._sevenn import CONST, KEY
from .convert import convert
from .data.references import (
    fit_energy_scale,
    fit_reference_energies,
    reach_note,
    reference_energy,
    scale_reach,
)
from .model import (
    build_model,
    fidelity_layers,
    fidelity_parameter_names,
    model_device,
    per_fidelity_scale,
)
from .nn.fidelity_linear import instruction_map

FIT_TO_PRETRAINED = 'fit_to_pretrained'
DEFAULT_SOURCE_FIDELITY = 'pbe'
_TRAIN_DENOMINATOR = (
    KEY.TRAIN_DENOMINTAOR
)  # (sic, sevenn's name) 'train_denominator'
# YAML model keys applied to a pretrained model (training choices, not architecture)
HONOURED_MODEL_KEYS = (
    S.FIDELITY_LAYER_MODE,
    KEY.TRAIN_SHIFT_SCALE,
    _TRAIN_DENOMINATOR,
)
# config keys taken from the converted checkpoint besides the model section
_MODEL_LIKE_KEYS = (
    KEY.CHEMICAL_SPECIES,
    KEY.NUM_SPECIES,
    KEY.TYPE_MAP,
    KEY.SHIFT,
    KEY.SCALE,
    KEY.CONV_DENOMINATOR,
    KEY.USE_MODAL_WISE_SHIFT,
    KEY.USE_MODAL_WISE_SCALE,
    KEY.USE_MODALITY,
    KEY.MODAL_MAP,
    KEY.NUM_MODALITIES,
    KEY.MODEL_TYPE,
)
USER_MODEL_KEYS = '_user_model_keys'  # model keys the YAML named (set by config.py)


class FinetuneError(ValueError):
    pass


# ---- pretrained model + config ---------------------------------------------------
def check_reference_options(config: Dict[str, Any]) -> None:
    refs = config.get(S.REFERENCE_ENERGIES) or {}
    fits = [f for f, v in refs.items() if isinstance(v, str)]
    for f in fits:
        if refs[f] != FIT_TO_PRETRAINED:
            raise FinetuneError(
                f'data.reference_energies.{f}: expected a mapping '
                f'{{element: eV}} or {FIT_TO_PRETRAINED!r}'
            )
    if (fits or config.get(S.FIT_NEW_REFERENCES)) and not config.get(S.PRETRAINED):
        raise FinetuneError(
            f'{FIT_TO_PRETRAINED} / train.fit_new_references needs '
            'train.pretrained (a model to fit against)'
        )


def _database_fidelities(config: Dict[str, Any]) -> List[str]:
    out: List[str] = []
    for db in config.get(S.DATABASES) or []:
        f = db.get('fidelity') if isinstance(db, dict) else None
        if f and f not in out:
            out.append(str(f))
    return out


def _source_path(source: str, base_dir: str) -> str:
    local = os.path.join(base_dir, os.path.expanduser(source))
    return local if os.path.isfile(local) else source


def load_pretrained(
    config: Dict[str, Any], log: Callable[[str], None] = print
) -> Tuple[torch.nn.Module, Dict[str, Any], List[str]]:
    """Convert ``train.pretrained`` for this run: (model, merged config, names
    of the fidelities added to the checkpoint's).

    The merged config is the YAML's with the model taken from the checkpoint,
    ready for :func:`sevenn_mf.data.dataset.prepare_data` (the cutoff for the graphs,
    the species to validate against, the statistics already set)."""
    from .checkpoint import Checkpoint

    check_reference_options(config)
    base_dir = config.get('_base_dir', os.getcwd())
    cp = Checkpoint(_source_path(config[S.PRETRAINED], base_dir))
    existing = cp.fidelities
    src_fid = config.get(S.PRETRAINED_FIDELITY)
    if not existing and not src_fid:
        src_fid = DEFAULT_SOURCE_FIDELITY
        log(
            f'train.pretrained_fidelity not given: the fidelity of single-fidelity '
            f'{config[S.PRETRAINED]} is called {src_fid!r}'
        )
    have = list(existing) or [src_fid]
    add: Dict[str, Optional[str]] = {
        str(k): (None if v is None else str(v))
        for k, v in (config.get(S.PRETRAINED_ADD) or {}).items()
    }
    wanted = list(config.get(S.FIDELITIES) or []) or _database_fidelities(config)
    for f in wanted:
        if f not in have and f not in add:
            add[f] = None  # from pretrained_fidelity or the first one
    mode = config.get(S.FIDELITY_LAYER_MODE) or 'onehot'
    positions = None
    if not existing:
        positions = {k: bool(config.get(k, False)) for k in S.POSITION_FLAGS}
    model, mcfg = convert(
        cp,
        source_fidelity=src_fid,
        add=add,
        mode=mode,
        positions=positions,
        # a fine-tune may add fidelity radial networks to any source
        radial=True if config.get(S.FIDELITY_RADIAL) else None,
    )
    log(
        f'pretrained {config[S.PRETRAINED]} ({cp.kind}, {cp.path}) -> fidelities '
        + ', '.join(
            f'{n}' + (f' (from {add[n] or src_fid or have[0]})' if n in add else '')
            for n in mcfg[S.FIDELITIES]
        )
        + f', {mcfg[S.FIDELITY_LAYER_MODE]} mode'
    )

    user_keys = set(config.get(USER_MODEL_KEYS) or [])
    ignored = sorted(
        k
        for k in user_keys
        - set(HONOURED_MODEL_KEYS)
        - set(S.POSITION_FLAGS)
        - {S.FIDELITIES}
        if k in CONST.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG
        or k == KEY.CHEMICAL_SPECIES
    )
    if existing:
        ignored += sorted(user_keys & set(S.MODAL_POSITION_KEYS))
    if ignored:
        log(
            'note: model section keys ignored, the architecture comes from the '
            'pretrained checkpoint: ' + ', '.join(ignored)
        )

    merged = copy.deepcopy(config)
    for k in list(CONST.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG) + list(
        _MODEL_LIKE_KEYS
    ):
        if k in HONOURED_MODEL_KEYS or k not in mcfg:
            continue
        merged[k] = copy.deepcopy(mcfg[k])
    for k in S.POSITION_FLAGS:
        merged[k] = bool(mcfg.get(k, False))
    for k in (KEY.TRAIN_SHIFT_SCALE, _TRAIN_DENOMINATOR):
        merged[k] = bool(config.get(k, False))
    merged[S.FIDELITIES] = list(mcfg[S.FIDELITIES])
    merged[S.FIDELITY_LAYER_MODE] = mcfg[S.FIDELITY_LAYER_MODE]
    added = [n for n in mcfg[S.FIDELITIES] if n not in existing]
    if not existing:
        added = [n for n in added if n != src_fid]
    return model, merged, added


@torch.no_grad()
def _shift_to_config(model: torch.nn.Module, config: Dict[str, Any]) -> None:
    from sevenn.nn.scale import get_resolved_shift_scale

    shift, _ = get_resolved_shift_scale(
        model._modules['rescale_atomic_energy'],
        config[KEY.TYPE_MAP],
        config[KEY.MODAL_MAP],
    )
    config[KEY.SHIFT] = shift


def predict_energies(
    model: torch.nn.Module, graphs: List[Any], batch_size: int = 8
) -> np.ndarray:
    """Total energies of ``graphs`` at their own fidelity (model in eval mode)."""
    was_training = model.training
    model.eval()
    model.set_is_batch_data(True)
    out = []
    device = model_device(model)
    for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False):
        res = model(batch.to(device))
        out.append(res[KEY.PRED_TOTAL_ENERGY].detach().reshape(-1).double().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.no_grad()
def _add_to_shift(
    model: torch.nn.Module,
    config: Dict[str, Any],
    fid: str,
    delta: Dict[str, float],
    replace: bool = False,
) -> None:
    rescale = model._modules['rescale_atomic_energy']
    if not getattr(rescale, 'use_modal_wise_shift', False):
        raise FinetuneError('per-fidelity references need use_modal_wise_shift')
    f = config[KEY.MODAL_MAP][fid]
    type_map = config[KEY.TYPE_MAP]
    for el, d in delta.items():
        z = chemical_symbols.index(el)
        if z not in type_map:
            raise FinetuneError(
                f'reference energy for {el}: not a species of the pretrained model'
            )
        if replace:
            rescale.shift[f, type_map[z]] = float(d)
        else:
            rescale.shift[f, type_map[z]] += float(d)


def _training_energy_graphs(data, fid: str, max_structures: int) -> List[Any]:
    graphs = [
        g for db in data.databases if db.spec.fidelity == fid for g in db.train
    ]
    graphs = [g for g in graphs if np.isfinite(float(g[KEY.ENERGY]))]
    if len(graphs) > max_structures:  # a few coefficients: a sample suffices
        pick = np.linspace(0, len(graphs) - 1, max_structures).round().astype(int)
        graphs = [graphs[i] for i in pick]
    return graphs


def fit_references(
    model: torch.nn.Module,
    config: Dict[str, Any],
    data,
    fidelities: List[str],
    log: Callable[[str], None] = print,
    max_structures: int = 200,
) -> Dict[str, Dict[str, float]]:
    """Refit the per-element shift of ``fidelities`` to the model's residuals on
    their training structures (in place on model and config); returns the
    corrections per fidelity. At most ``max_structures`` (evenly spaced) are
    predicted per fidelity."""
    done = {}
    for fid in fidelities:
        graphs = _training_energy_graphs(data, fid, max_structures)
        if not graphs:
            log(f'reference fit ({fid}): no labelled training energies, skipped')
            continue
        pred = predict_energies(model, graphs, int(config.get(KEY.BATCH_SIZE, 8)))
        items = [
            SimpleNamespace(
                numbers=g[KEY.ATOMIC_NUMBERS].cpu().numpy(),
                energy=float(g[KEY.ENERGY]) - p,
                forces=None,
            )
            for g, p in zip(graphs, pred)
        ]
        n_atoms = np.array([len(it.numbers) for it in items], dtype=float)
        present = sorted(
            {chemical_symbols[int(z)] for it in items for z in it.numbers}
        )
        delta = fit_reference_energies(items, present)
        _add_to_shift(model, config, fid, delta)
        residual = np.array([it.energy for it in items])
        # the shift adds delta[el] per atom, so the refit's error needs no
        # second pass through the model
        moved = np.array([reference_energy(delta, it.numbers) for it in items])
        before = np.abs(residual) / n_atoms
        err = np.abs(residual - moved) / n_atoms
        log(
            f'reference fit ({fid}) to the pretrained predictions on {len(graphs)} '
            'structures: '
            + ', '.join(f'{el} {d:+.4f}' for el, d in delta.items())
            + f' eV; energy MAE {1000 * before.mean():.1f} -> '
            f'{1000 * err.mean():.1f} meV/atom'
        )
        done[fid] = delta
    _shift_to_config(model, config)
    return done


class ScaleFitError(FinetuneError):
    pass


def fit_scale(
    model: torch.nn.Module,
    config: Dict[str, Any],
    data,
    fidelities: List[str],
    log: Callable[[str], None] = print,
    max_structures: int = 400,
    anchor: Optional[str] = None,
) -> Dict[str, Any]:
    """``train.coupling.scale: fitted``: give each of ``fidelities`` its own
    energy scale and refit its element references, both by least squares to
    its training labels against the model's predictions at that head now
    (in place on the model; returns the config that rebuilds it).

    Per structure ``s`` of ``n_s`` atoms, ``E_s / n_s = a * N_s / n_s +
    sum_Z (n_sZ / n_s) r_Z``, where ``N_s`` is the head's energy beyond its
    references; ``a`` multiplies the head's scale, ``r`` replaces its
    references. Meant for a head that starts as a trained head's copy
    (``pretrained_add`` / ``train.mf.init: lf``): ``a`` is then how much
    stiffer the labels' energy surface is than that head's. With ``anchor``
    the log also says how far the anchor's training energies reach beyond
    the fitted structures, and what the scale's standard error means there
    (:func:`sevenn_mf.data.references.scale_reach`)."""
    config = per_fidelity_scale(model, config)
    rescale = model._modules['rescale_atomic_energy']
    type_map = config[KEY.TYPE_MAP]
    batch = int(config.get(KEY.BATCH_SIZE, 8))

    def own_energy(fid: str, numbers) -> np.ndarray:
        """Each structure's sum of the ``fid`` head's element references."""
        shift = rescale.shift[config[KEY.MODAL_MAP][fid]].detach().double().cpu()
        shift = shift.numpy()
        return np.array(
            [shift[[type_map[int(x)] for x in z]].sum() for z in numbers]
        )

    pool = _training_energy_graphs(data, anchor, max_structures) if anchor else []
    # the anchor's labels beyond its references: the zero of the head's net
    # energy at the start, which is the anchor head's copy
    pool_numbers = [g[KEY.ATOMIC_NUMBERS].cpu().numpy().astype(int) for g in pool]
    pool_net = (
        np.array([float(g[KEY.ENERGY]) for g in pool])
        - own_energy(anchor, pool_numbers)
        if pool
        else None
    )
    for fid in fidelities:
        f = config[KEY.MODAL_MAP][fid]
        graphs = _training_energy_graphs(data, fid, max_structures)
        if len(graphs) < 3:
            raise ScaleFitError(
                f'train.coupling.scale: fitted needs energy labels of {fid!r} '
                f'(found {len(graphs)} training structures with one)'
            )
        pred = predict_energies(model, graphs, batch)
        numbers = [g[KEY.ATOMIC_NUMBERS].cpu().numpy().astype(int) for g in graphs]
        n = np.array([len(z) for z in numbers], dtype=float)
        own = own_energy(fid, numbers)
        label = np.array([float(g[KEY.ENERGY]) for g in graphs])
        species = sorted({int(x) for z in numbers for x in z})
        try:
            a, se = fit_energy_scale(numbers, label, pred - own)
        except ValueError as exc:
            raise ScaleFitError(
                f'train.coupling.scale: fitted, the {fid!r} labels against the '
                f'head at the start: {exc} (the head must start trained)'
            ) from None
        items = [
            SimpleNamespace(numbers=z, energy=e - a * (p - o), forces=None)
            for z, e, p, o in zip(numbers, label, pred, own)
        ]
        refs = fit_reference_energies(items, [chemical_symbols[z] for z in species])
        with torch.no_grad():
            rescale.scale[f] *= a
        _add_to_shift(model, config, fid, refs, replace=True)
        # the head's energies now, without a second pass: its energy beyond
        # the references is scaled by a, and the references are the new ones
        new_own = [reference_energy(refs, z) for z in numbers]
        after = a * (pred - own) + np.array(new_own)
        reach = ''
        if pool_net is not None:
            r = scale_reach(numbers, pred - own, pool_numbers, pool_net)
            reach = f'; the {anchor} training structures reach ' + reach_note(se, r)
        log(
            f'energy scale fit ({fid}): x{a:.4f} ± {se:.4f} of the head at the '
            f'start, with its references, on {len(graphs)} structures; energy '
            f'MAE {1000 * np.mean(np.abs(label - pred) / n):.2f} -> '
            f'{1000 * np.mean(np.abs(label - after) / n):.2f} meV/atom{reach}'
        )
    _shift_to_config(model, config)
    return per_fidelity_scale(model, config)


def finetune_model(
    model: torch.nn.Module,
    config: Dict[str, Any],
    data,
    added: List[str],
    log: Callable[[str], None] = print,
) -> torch.nn.Module:
    """After :func:`prepare_data`: user references and reference fits applied,
    and the model rebuilt from the final config (checks they agree)."""
    refs = config.get(S.REFERENCE_ENERGIES) or {}
    for fid, v in refs.items():
        if isinstance(v, dict):
            _add_to_shift(
                model, config, fid, {k: float(e) for k, e in v.items()}, replace=True
            )
    _shift_to_config(model, config)
    to_fit = [f for f, v in refs.items() if v == FIT_TO_PRETRAINED]
    if config.get(S.FIT_NEW_REFERENCES):
        to_fit += [
            f for f in added if f not in to_fit and not isinstance(refs.get(f), dict)
        ]
    if to_fit:
        fit_references(model, config, data, to_fit, log)
    final = build_model(config)
    final.load_state_dict(model.state_dict(), strict=True)
    return final


# ---- optimizer: frozen / slower shared weights ------------------------------------
def onehot_shared_masks(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """For each onehot fidelity layer: ``{'<layer>.linear.weight': mask}``, True
    on the entries of the shared paths (False on the fidelity one-hot paths)."""
    masks = {}
    for name, layer in fidelity_layers(model).items():
        if not layer.is_onehot:
            continue
        w = layer.linear.weight
        mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        i_modal = len(layer.irreps_in)
        for (i_in, _), (off, n, _) in instruction_map(layer.linear).items():
            if i_in == i_modal:
                mask[off : off + n] = False
        masks[f'{name}.linear.weight'] = mask.reshape(w.shape)
    return masks


class SharedEntryScaler:
    """Scales the optimizer update of some entries of some tensors: after each
    step, ``p[mask] = old + factor * (new - old)`` (restore when factor is 0)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        entries: List[Tuple[torch.nn.Parameter, torch.Tensor]],
        factor: float,
    ) -> None:
        self.entries = entries
        self.factor = float(factor)
        self._saved: List[torch.Tensor] = []
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, optimizer, args, kwargs) -> None:
        self._saved = [p.detach().clone() for p, _ in self.entries]

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        for (p, mask), old in zip(self.entries, self._saved):
            new = old + self.factor * (p - old) if self.factor else old
            p.copy_(torch.where(mask, new, p))
        self._saved = []


def configure_optimizer(
    trainer, config: Dict[str, Any], log: Callable[[str], None] = print
) -> None:
    """Rebuild ``trainer.optimizer`` (and scheduler) for ``freeze_shared`` /
    ``shared_lr_factor``; no-op when neither is set."""
    freeze = bool(config.get(S.FREEZE_SHARED, False))
    factor = 0.0 if freeze else float(config.get(S.SHARED_LR_FACTOR, 1.0))
    if not freeze and factor == 1.0:
        return
    if factor < 0:
        raise FinetuneError('train.shared_lr_factor must be >= 0')
    model = getattr(trainer.model, 'module', trainer.model)  # DDP
    fid_names = set(fidelity_parameter_names(model))
    masks = onehot_shared_masks(model)
    fid_params, shared_params, mixed = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in masks:
            fid_params.append(p)
            mixed.append((p, masks[name]))
        elif name in fid_names:
            fid_params.append(p)
        else:
            shared_params.append(p)
    if not fid_params:
        raise FinetuneError('no trainable fidelity-dependent parameters')
    args = dict(config.get(KEY.OPTIM_PARAM) or {})
    opt_cls = type(trainer.optimizer)
    lr = float(args.pop('lr', trainer.optimizer.defaults['lr']))
    groups = [{'params': fid_params, 'lr': lr}]
    if shared_params:
        groups.append({'params': shared_params, 'lr': lr * factor})
    trainer.optimizer = opt_cls(groups, **args)
    if trainer.scheduler is not None:
        trainer.scheduler = type(trainer.scheduler)(
            trainer.optimizer, **dict(config.get(KEY.SCHEDULER_PARAM) or {})
        )
    if mixed:
        if freeze:  # keep the optimizer state of the frozen entries at zero too
            for p, mask in mixed:
                p.register_hook(lambda g, m=mask: g.masked_fill(m, 0.0))
        trainer.shared_entry_scaler = SharedEntryScaler(
            trainer.optimizer, mixed, factor
        )
    n_fid = sum(p.numel() for p in fid_params)
    n_sh = sum(p.numel() for p in shared_params)
    log(
        f'optimizer groups: fidelity-dependent {n_fid:,} parameters at lr {lr:g}; '
        + ('shared frozen' if freeze else f'shared {n_sh:,} at lr {lr * factor:g}')
        + (
            f'; {len(mixed)} onehot tensors with shared entries '
            + ('held fixed' if freeze else f'updated x{factor:g}')
            if mixed
            else ''
        )
    )
