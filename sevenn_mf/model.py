"""Build multi-fidelity SevenNet models through sevenn's own builder, and fold
them to plain single-fidelity SevenNet models."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from sevenn.model_build import build_E3_equivariant_model
from sevenn.nn.scale import get_resolved_shift_scale
from sevenn.nn.sequential import AtomGraphSequential

from . import _sevenn as S
from ._sevenn import KEY
from .nn.fidelity_linear import FidelityLinear
from .nn.fidelity_radial import FidelityRadialNet

# modality keys that a plain (single-fidelity) sevenn config must not carry
_MODAL_ONLY_KEYS = (
    KEY.MODAL_MAP,
    KEY.NUM_MODALITIES,
    S.FIDELITIES,
    S.FIDELITY_LAYER_MODE,
    S.FIDELITY_RADIAL,
)


class FidelityError(ValueError):
    pass


def fidelity_names(config: Dict[str, Any]) -> List[str]:
    """Fidelity names in index order ([] for a single-fidelity model)."""
    if not config.get(KEY.USE_MODALITY, False):
        return []
    modal_map = config.get(KEY.MODAL_MAP) or {}
    return [k for k, _ in sorted(modal_map.items(), key=lambda kv: kv[1])]


# the fidelity a plain checkpoint written by sevenn_mf export was folded from
EXPORTED_FIDELITY = 'sevenn_mf_fidelity'


def resolve_fidelity(
    config: Dict[str, Any], fidelity: Optional[str]
) -> Optional[str]:
    """The fidelity name to evaluate, or a clear error listing the valid ones.

    A name is never ignored: a model accepts only its own fidelities. One with
    a single fidelity also takes None (= that one). A plain sevenn model
    (7net-0, any single-modal checkpoint) has no fidelity input: it takes only
    None, or, when sevenn_mf exported it from one fidelity, that name; both
    give None (nothing to select)."""
    names = fidelity_names(config)
    if not names:
        own = config.get(EXPORTED_FIDELITY)
        if fidelity is None or (own and fidelity == own):
            return None
        which = f' (exported from fidelity {own!r})' if own else ''
        raise FidelityError(
            f'fidelity {fidelity!r} given, but this is a single-fidelity model '
            f'without fidelity names{which}: leave the fidelity out'
        )
    if fidelity is None and len(names) == 1:
        return names[0]
    if fidelity is None:
        raise FidelityError(
            f'this model has several fidelities; choose one with fidelity=... '
            f'(valid: {", ".join(names)})'
        )
    if fidelity not in names:
        if len(names) == 1:
            raise FidelityError(
                f'unknown fidelity {fidelity!r}: this single-fidelity model has '
                f'only {names[0]!r} (valid: {names[0]})'
            )
        raise FidelityError(
            f'unknown fidelity {fidelity!r} (valid: {", ".join(names)})'
        )
    return fidelity


def set_fidelities(
    config: Dict[str, Any], fidelities: Sequence[str], mode: str
) -> Dict[str, Any]:
    """Write the fidelity keys into a sevenn config (in place; also returned)."""
    fidelities = list(fidelities)
    if len(set(fidelities)) != len(fidelities):
        raise FidelityError(f'duplicate fidelity names in {fidelities}')
    if not fidelities:
        raise FidelityError('at least one fidelity is needed')
    if mode not in S.LAYER_MODES:
        raise FidelityError(f'fidelity_layer_mode must be one of {S.LAYER_MODES}')
    config[S.FIDELITIES] = fidelities
    config[S.FIDELITY_LAYER_MODE] = mode
    config[KEY.USE_MODALITY] = True
    config[KEY.MODAL_MAP] = {name: i for i, name in enumerate(fidelities)}
    config[KEY.NUM_MODALITIES] = len(fidelities)
    config.setdefault(KEY.USE_MODAL_WISE_SHIFT, False)
    config.setdefault(KEY.USE_MODAL_WISE_SCALE, False)
    return config


def build_model(config: Dict[str, Any]) -> AtomGraphSequential:
    """sevenn's builder; the fidelity layers come in through the hook."""
    S.install_hooks()
    return build_E3_equivariant_model(copy.deepcopy(config))


def fidelity_layers(model: torch.nn.Module) -> Dict[str, FidelityLinear]:
    return {k: m for k, m in model._modules.items() if isinstance(m, FidelityLinear)}


def fidelity_radial_nets(model: torch.nn.Module) -> Dict[str, FidelityRadialNet]:
    """{'<convolution>.weight_nn': its fidelity radial network}."""
    return {
        f'{k}.weight_nn': m.weight_nn
        for k, m in model._modules.items()
        if isinstance(getattr(m, 'weight_nn', None), FidelityRadialNet)
    }


def fidelity_parameter_names(model: torch.nn.Module) -> List[str]:
    """Parameters that differ between fidelities (fidelity layers' and radial
    networks' own, and the per-fidelity energy references)."""
    names = []
    for k, m in fidelity_layers(model).items():
        names += [f'{k}.{p}' for p in m.fidelity_parameters()]
    for k, m in fidelity_radial_nets(model).items():
        names += [f'{k}.{p}' for p in m.fidelity_parameters()]
    rescale = model._modules.get('rescale_atomic_energy')
    if rescale is not None and getattr(rescale, 'use_modal_wise_shift', False):
        names.append('rescale_atomic_energy.shift')
    if rescale is not None and getattr(rescale, 'use_modal_wise_scale', False):
        names.append('rescale_atomic_energy.scale')
    return names


def per_fidelity_scale(
    model: AtomGraphSequential, config: Dict[str, Any]
) -> Dict[str, Any]:
    """Give every fidelity its own energy scale (sevenn's
    ``use_modal_wise_scale``), each starting at the model's present one; the
    model is changed in place. Returns the config that rebuilds it: sevenn's
    loaders take the scale's shape from the config, so a checkpoint written
    with the old one would not load."""
    rescale = model._modules['rescale_atomic_energy']
    if not getattr(rescale, 'use_modal_wise_scale', True):
        old = rescale.scale.detach()
        n_modal = len(config[KEY.MODAL_MAP])
        rescale.scale = torch.nn.Parameter(
            old.reshape(1, -1).expand(n_modal, -1).clone(),
            requires_grad=rescale.scale.requires_grad,
        )
        rescale.use_modal_wise_scale = True
    config = dict(config)
    _, scale = get_resolved_shift_scale(
        rescale, config[KEY.TYPE_MAP], config[KEY.MODAL_MAP]
    )
    config[KEY.SCALE] = scale
    config[KEY.USE_MODAL_WISE_SCALE] = True
    return config


def scale_energy(
    model: AtomGraphSequential, config: Dict[str, Any], factor: float
) -> Dict[str, Any]:
    """``factor`` times the model's energy at every fidelity (its scale and
    its references, so forces and stress follow), in place; returns the config
    that rebuilds it."""
    rescale = model._modules['rescale_atomic_energy']
    with torch.no_grad():
        rescale.scale.mul_(factor)
        rescale.shift.mul_(factor)
    config = dict(config)
    config[KEY.SHIFT], config[KEY.SCALE] = get_resolved_shift_scale(
        rescale, config.get(KEY.TYPE_MAP), config.get(KEY.MODAL_MAP)
    )
    return config


def convert_layer_mode(
    model: AtomGraphSequential, config: Dict[str, Any], mode: str
) -> Tuple[AtomGraphSequential, Dict[str, Any]]:
    """The same model with its fidelity layers in the other formulation."""
    config = copy.deepcopy(config)
    config[S.FIDELITY_LAYER_MODE] = mode
    new_model = build_model(config)
    state = {k: v for k, v in model.state_dict().items()}
    for name, layer in fidelity_layers(model).items():
        for k in list(state):
            if k.startswith(name + '.'):
                del state[k]
        for k, v in layer.to_mode(mode).state_dict().items():
            state[f'{name}.{k}'] = v
    new_model.load_state_dict(state, strict=True)
    return new_model, config


def plain_config(
    config: Dict[str, Any], rescale: torch.nn.Module, fidelity: Optional[str]
) -> Dict[str, Any]:
    """The sevenn config of the single-fidelity model equal to ``fidelity``."""
    cfg = copy.deepcopy(config)
    if not fidelity_names(config):
        return cfg
    shift, scale = get_resolved_shift_scale(
        rescale, config[KEY.TYPE_MAP], config[KEY.MODAL_MAP]
    )
    cfg[KEY.SHIFT] = shift[fidelity] if isinstance(shift, dict) else shift
    cfg[KEY.SCALE] = scale[fidelity] if isinstance(scale, dict) else scale
    for k in _MODAL_ONLY_KEYS:
        cfg.pop(k, None)
    cfg[KEY.USE_MODALITY] = False
    cfg[KEY.USE_MODAL_WISE_SHIFT] = False
    cfg[KEY.USE_MODAL_WISE_SCALE] = False
    for flag in S.MODAL_POSITION_KEYS:
        cfg[flag] = False
    # folded one-hot columns become biases on the scalar outputs; e3nn's zero
    # biases on the other layers leave them unchanged
    cfg[KEY.USE_BIAS_IN_LINEAR] = True
    return cfg


@torch.no_grad()
def fold(
    model: AtomGraphSequential, config: Dict[str, Any], fidelity: Optional[str]
) -> Tuple[AtomGraphSequential, Dict[str, Any]]:
    """A plain sevenn model (no sevenn_mf layers) equal to ``model`` at
    ``fidelity``; returns (model, its sevenn config)."""
    fidelity = resolve_fidelity(config, fidelity)
    if fidelity is None:
        return model, copy.deepcopy(config)
    f_idx = config[KEY.MODAL_MAP][fidelity]
    rescale = model._modules['rescale_atomic_energy']
    cfg = plain_config(config, rescale, fidelity)
    dtype = next(model.parameters()).dtype
    plain = build_E3_equivariant_model(copy.deepcopy(cfg)).to(dtype)
    src = model.state_dict()
    dst = plain.state_dict()
    layers = fidelity_layers(model)
    assigned = set()
    for name, layer in layers.items():
        w, b = layer.folded_parameters(f_idx)
        dst[f'{name}.linear.weight'] = w.to(dst[f'{name}.linear.weight'].dtype)
        dst[f'{name}.linear.bias'] = b.to(dst[f'{name}.linear.bias'].dtype)
        assigned |= {k for k in dst if k.startswith(name + '.')}
    for name, net in fidelity_radial_nets(model).items():
        key = f'{name}.{net.last_weight_name()}'
        dst[key] = net.folded_last_weight(f_idx).to(dst[key].dtype).clone()
        assigned.add(key)
    for k in ('shift', 'scale'):
        key = f'rescale_atomic_energy.{k}'
        v = src[key]
        dst[key] = (v[f_idx] if v.dim() == 2 else v).clone()
        assigned.add(key)
    for k, v in dst.items():
        if k in assigned:
            continue
        if k in src and src[k].shape == v.shape:
            dst[k] = src[k].clone()
        elif k.endswith('.linear.bias'):
            dst[k] = torch.zeros_like(v)  # biases the multi-fidelity model lacks
        else:
            raise RuntimeError(f'cannot fold parameter {k}: no counterpart')
    plain.load_state_dict(dst, strict=True)
    plain.train(model.training)
    return plain, cfg


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are: batches built on the CPU (our
    DataLoaders) go there before a forward pass."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')
