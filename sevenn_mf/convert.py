"""Turn pretrained SevenNet checkpoints into sevenn_mf models, and add,
rename or drop fidelities of multi-fidelity ones.

* **single-fidelity source** (``7net-0``, any plain SevenNet checkpoint): the
  model is rebuilt with fidelity layers at the chosen positions (sevenn's
  ``use_modal_self_inter_intro/outro`` and ``use_modal_output_block`` by
  default); every fidelity layer is initialised from the plain layer's weights
  (:meth:`FidelityLinear.load_plain`), so *every* fidelity computes exactly the
  original model, and every fidelity gets the original per-element shift.
* **multi-fidelity source** (``7net-mf-0``, sevenn-native multi-modal or
  sevenn_mf checkpoints): fidelities are renamed, added (a copy of an existing
  fidelity: its one-hot weight column or its ``delta_*`` rows, and its shift
  row) and dropped. In ``onehot`` mode the fidelity one-hot is an extra
  ``F x 0e`` input block of the e3nn ``Linear``; e3nn normalises each path by
  the fan-in of its output, so a change of F rescales every path into the
  scalar outputs: weights are moved path by path with the ratio of path
  weights, and the computed function of each kept fidelity does not change.

Operations run in the order rename -> add -> drop, then the layer mode is
changed if asked (onehot -> indexed is exact; indexed -> onehot needs
fidelity-independent path weights).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sevenn
import torch
from sevenn.nn.scale import get_resolved_shift_scale
from sevenn.nn.sequential import AtomGraphSequential

from . import _sevenn as S
from ._sevenn import KEY
from .checkpoint import Checkpoint, refuse_overwriting, save_checkpoint
from .model import (
    FidelityError,
    build_model,
    convert_layer_mode,
    fidelity_layers,
    fidelity_names,
    fidelity_radial_nets,
    set_fidelities,
)
from .nn.fidelity_linear import FidelityLinear, instruction_map

# fidelity positions when a single-fidelity model is converted (sevenn's MF-0)
DEFAULT_POSITIONS = {
    KEY.USE_MODAL_NODE_EMBEDDING: False,
    KEY.USE_MODAL_SELF_INTER_INTRO: True,
    KEY.USE_MODAL_SELF_INTER_OUTRO: True,
    KEY.USE_MODAL_OUTPUT_BLOCK: True,
}
_RESCALE = 'rescale_atomic_energy'


class ConvertError(ValueError):
    pass


# ---- which fidelity comes from where ---------------------------------------------
def plan_fidelities(
    existing: Sequence[str],
    add: Optional[Dict[str, Optional[str]]] = None,
    rename: Optional[Dict[str, str]] = None,
    drop: Optional[Sequence[str]] = None,
    default_from: Optional[str] = None,
) -> Tuple[List[str], List[int]]:
    """New fidelity names and, for each, the index of the existing fidelity it
    is a copy of. Order: rename, add, drop. A FROM or DROP name may be given
    by its old or its new name; an ADD without FROM copies ``default_from``
    (default: the first existing fidelity)."""
    existing = list(existing)
    add, rename, drop = dict(add or {}), dict(rename or {}), list(drop or [])
    for old in rename:
        if old not in existing:
            raise ConvertError(
                f'cannot rename {old!r}: no such fidelity '
                f'(fidelities: {", ".join(existing)})'
            )
    names = [rename.get(n, n) for n in existing]
    if len(set(names)) != len(names):
        raise ConvertError(f'renaming gives duplicate fidelity names: {names}')
    src = list(range(len(existing)))

    def lookup(name: str, what: str) -> int:
        if name in names:
            return names.index(name)
        if name in rename and rename[name] in names:
            return names.index(rename[name])
        raise ConvertError(
            f'{what}: no fidelity {name!r} (fidelities: {", ".join(names)})'
        )

    for new, frm in add.items():
        if new in names:
            raise ConvertError(f'cannot add {new!r}: the model already has it')
        frm = frm or default_from or names[0]
        i = lookup(frm, f'add {new}={frm}')
        names.append(new)
        src.append(src[i])
    for name in drop:
        i = lookup(name, f'drop {name}')
        del names[i], src[i]
    if not names:
        raise ConvertError('dropping every fidelity leaves no model')
    return names, src


# ---- layer remapping --------------------------------------------------------------
@torch.no_grad()
def remap_layer(
    old: FidelityLinear, new: FidelityLinear, src: Sequence[int]
) -> Dict[str, torch.Tensor]:
    """State dict of ``new`` (F' fidelities, same irreps and mode as ``old``)
    whose fidelity j computes what fidelity ``src[j]`` of ``old`` computes."""
    if (
        old.mode != new.mode
        or old.irreps_in != new.irreps_in
        or old.irreps_out != new.irreps_out
    ):
        raise ConvertError('remap_layer needs layers of the same irreps and mode')
    state = {k: v.clone() for k, v in new.state_dict().items()}
    idx = torch.as_tensor(list(src), dtype=torch.long)
    if not old.is_onehot:
        state['weight'] = old.weight.detach().clone()
        state['bias'] = old.bias.detach().clone()
        state['delta_weight'] = old.delta_weight.detach()[idx].clone()
        state['delta_bias'] = old.delta_bias.detach()[idx].clone()
        return state
    w_old = old.linear.weight.detach()
    w_new = torch.zeros(
        new.linear.weight_numel, dtype=w_old.dtype, device=w_old.device
    )
    old_map = instruction_map(old.linear)
    i_modal = len(old.irreps_in)  # the appended F x 0e block
    for key, (d_off, d_n, d_pw) in instruction_map(new.linear).items():
        s_off, s_n, s_pw = old_map[key]
        block = w_old[s_off : s_off + s_n] * (s_pw / d_pw)
        if key[0] == i_modal:  # one row per fidelity
            block = block.reshape(old.num_fidelities, -1)[idx].reshape(-1)
        assert block.numel() == d_n
        w_new[d_off : d_off + d_n] = block
    state['linear.weight'] = w_new
    if old.shared_biases:
        state['linear.bias'] = old.linear.bias.detach().clone()
    return state


def _resolved_shift_scale(model: AtomGraphSequential, config: Dict[str, Any]):
    modal_map = config.get(KEY.MODAL_MAP) if config.get(KEY.USE_MODALITY) else None
    return get_resolved_shift_scale(
        model._modules[_RESCALE], config[KEY.TYPE_MAP], modal_map
    )


def _per_fidelity(
    value, old_names: Sequence[str], names: Sequence[str], src: Sequence[int]
) -> Dict[str, Any]:
    """{new name: value of its source fidelity}; a shared value is copied."""
    if isinstance(value, dict):
        return {n: copy.deepcopy(value[old_names[s]]) for n, s in zip(names, src)}
    return {n: copy.deepcopy(value) for n in names}


def _assemble(
    model: AtomGraphSequential,
    new_model: AtomGraphSequential,
    layer_states: Dict[str, Dict[str, torch.Tensor]],
) -> None:
    """Load ``new_model`` with the remapped fidelity layers, its own (already
    remapped, built from the config) rescale module and every other tensor
    copied from ``model``."""
    old = model.state_dict()
    state = new_model.state_dict()
    for k in state:
        layer = k.split('.', 1)[0]
        if layer in layer_states:
            state[k] = layer_states[layer][k.split('.', 1)[1]]
        elif layer == _RESCALE:
            continue
        elif k in old and old[k].shape == state[k].shape:
            state[k] = old[k].clone()
        else:
            raise ConvertError(
                f'parameter {k} has no counterpart in the source '
                f'model ({tuple(old[k].shape) if k in old else "absent"}'
                f' vs {tuple(state[k].shape)})'
            )
    leftover = [
        k
        for k in old
        if k.split('.', 1)[0] not in layer_states
        and not k.startswith(_RESCALE + '.')
        and k not in state
    ]
    if leftover:
        raise ConvertError(
            f'source parameters with no place in the new model: {leftover[:5]}'
        )
    new_model.load_state_dict(state, strict=True)


def _rescale_config(
    cfg: Dict[str, Any], model, config, old_names, names, src
) -> None:
    shift, scale = _resolved_shift_scale(model, config)
    cfg[KEY.SHIFT] = _per_fidelity(shift, old_names, names, src)
    cfg[KEY.USE_MODAL_WISE_SHIFT] = True  # every fidelity has its own energy zero
    if isinstance(scale, dict):
        cfg[KEY.SCALE] = _per_fidelity(scale, old_names, names, src)
        cfg[KEY.USE_MODAL_WISE_SCALE] = True
    else:
        cfg[KEY.SCALE] = scale
        cfg[KEY.USE_MODAL_WISE_SCALE] = False


def remap_fidelities(
    model: AtomGraphSequential,
    config: Dict[str, Any],
    names: Sequence[str],
    src: Sequence[int],
) -> Tuple[AtomGraphSequential, Dict[str, Any]]:
    """A multi-fidelity model with fidelities ``names``, fidelity j a copy of
    fidelity ``src[j]`` of ``model`` (same layer mode)."""
    old_names = fidelity_names(config)
    if not old_names or not config.get(S.FIDELITY_LAYER_MODE):
        raise ConvertError('remap_fidelities needs a sevenn_mf model')
    cfg = copy.deepcopy(config)
    set_fidelities(cfg, names, config[S.FIDELITY_LAYER_MODE])
    _rescale_config(cfg, model, config, old_names, names, src)
    new_model = build_model(cfg).to(next(model.parameters()).dtype)
    new_layers = fidelity_layers(new_model)
    old_layers = fidelity_layers(model)
    if set(new_layers) != set(old_layers):
        raise ConvertError('fidelity layer positions differ after rebuilding')
    states = {n: remap_layer(old_layers[n], new_layers[n], src) for n in old_layers}
    if set(fidelity_radial_nets(new_model)) != set(fidelity_radial_nets(model)):
        raise ConvertError('fidelity radial networks differ after rebuilding')
    states.update(_radial_states(model, new_model, src))
    _assemble(model, new_model, states)
    return new_model, cfg


def _with_radial(
    model: AtomGraphSequential, config: Dict[str, Any], radial: bool
) -> Tuple[AtomGraphSequential, Dict[str, Any]]:
    """The same model with fidelity radial networks added (zero deltas: the
    computed function is unchanged)."""
    if not radial:
        raise ConvertError(
            'fidelity radial networks cannot be removed from a multi-fidelity '
            'model (their per-fidelity weights would be lost); fold or export '
            'one fidelity instead'
        )
    cfg = copy.deepcopy(config)
    cfg[S.FIDELITY_RADIAL] = True
    new_model = build_model(cfg).to(next(model.parameters()).dtype)
    _assemble(model, new_model, _radial_states(model, new_model))
    return new_model, cfg


@torch.no_grad()
def _radial_states(
    model: AtomGraphSequential,
    new_model: AtomGraphSequential,
    src: Optional[Sequence[int]] = None,
) -> Dict[str, Dict[str, torch.Tensor]]:
    """State dicts of ``new_model``'s convolutions with fidelity radial
    networks: shared tensors from ``model``, the per-fidelity rows of
    fidelity j those of ``src[j]`` (zero when ``model`` has none: every
    fidelity then computes the plain network)."""
    old = model.state_dict()
    old_nets = fidelity_radial_nets(model)
    idx = None if src is None else torch.as_tensor(list(src), dtype=torch.long)
    out = {}
    for name in fidelity_radial_nets(new_model):
        conv = name.split('.', 1)[0]
        state = {}
        for k, v in new_model._modules[conv].state_dict().items():
            if k == 'weight_nn.delta_weight':
                if name in old_nets and idx is not None:
                    v = old_nets[name].delta_weight.detach()[idx]
                else:
                    v = torch.zeros_like(v)
            elif f'{conv}.{k}' in old and old[f'{conv}.{k}'].shape == v.shape:
                v = old[f'{conv}.{k}']
            else:
                raise ConvertError(f'parameter {conv}.{k} has no counterpart')
            state[k] = v.clone()
        out[conv] = state
    return out


@torch.no_grad()
def from_plain(
    model: AtomGraphSequential,
    config: Dict[str, Any],
    names: Sequence[str],
    mode: str,
    positions: Optional[Dict[str, bool]] = None,
) -> Tuple[AtomGraphSequential, Dict[str, Any]]:
    """A multi-fidelity model whose every fidelity equals the plain ``model``."""
    cfg = copy.deepcopy(config)
    pos = dict(DEFAULT_POSITIONS)
    pos.update(positions or {})
    unknown = set(pos) - set(S.POSITION_FLAGS)
    if unknown:
        raise ConvertError(f'unknown fidelity position keys {sorted(unknown)}')
    if not any(pos.values()):
        raise ConvertError('no fidelity position selected')
    cfg.update(pos)
    set_fidelities(cfg, names, mode)
    shift, scale = _resolved_shift_scale(model, config)
    cfg[KEY.SHIFT] = {n: copy.deepcopy(shift) for n in names}
    cfg[KEY.SCALE] = scale
    cfg[KEY.USE_MODAL_WISE_SHIFT] = True
    cfg[KEY.USE_MODAL_WISE_SCALE] = False
    new_model = build_model(cfg).to(next(model.parameters()).dtype)
    old = model.state_dict()
    plain_biases = bool(config.get(KEY.USE_BIAS_IN_LINEAR, False))
    states = {}
    for name, layer in fidelity_layers(new_model).items():
        w = old[f'{name}.linear.weight']
        b = old.get(f'{name}.linear.bias')
        layer.load_plain(w, b if plain_biases else None, plain_biases=plain_biases)
        states[name] = {k: v.clone() for k, v in layer.state_dict().items()}
    states.update(_radial_states(model, new_model))
    _assemble(model, new_model, states)
    return new_model, cfg


# ---- the entry point --------------------------------------------------------------
def convert(
    source: Any,
    source_fidelity: Optional[str] = None,
    add: Optional[Dict[str, Optional[str]]] = None,
    rename: Optional[Dict[str, str]] = None,
    drop: Optional[Sequence[str]] = None,
    mode: Optional[str] = None,
    positions: Optional[Dict[str, bool]] = None,
    radial: Optional[bool] = None,
) -> Tuple[AtomGraphSequential, Dict[str, Any]]:
    """(model, config) of the converted checkpoint (not saved).

    ``source``: checkpoint path, pretrained name or a loaded :class:`Checkpoint`.
    ``source_fidelity``: the name of a single-fidelity source's fidelity
    (required then); for a multi-fidelity source, the fidelity an ``add``
    without FROM copies. ``add``: ``{new: from or None}``; ``rename``:
    ``{old: new}``; ``drop``: names; ``mode``: 'onehot' | 'indexed' (default:
    the source's mode, onehot for a single-fidelity source); ``positions``:
    sevenn's ``use_modal_*`` flags (and ``fidelity_radial``) for a
    single-fidelity source; ``radial``: True adds fidelity radial networks
    (zero per-fidelity weights: nothing computed changes) to a
    multi-fidelity source without them, None keeps the source's.
    """
    if mode is not None and mode not in S.LAYER_MODES:
        raise ConvertError(f'mode must be one of {S.LAYER_MODES}, got {mode!r}')
    cp = source if isinstance(source, Checkpoint) else Checkpoint(source)
    if cp.kind == 'plain' and not source_fidelity:
        raise ConvertError(
            f'{cp.source} is a single-fidelity model: name its fidelity with '
            'source_fidelity (CLI: --source-fidelity, YAML: '
            'train.pretrained_fidelity), e.g. pbe for 7net-0'
        )
    model = cp.build_model()
    if cp.kind == 'plain':
        names, _ = plan_fidelities([source_fidelity], add, rename, drop)
        new_model, cfg = from_plain(
            model, cp.config, names, mode or 'onehot', positions
        )
    else:
        if positions:
            raise ConvertError(
                'fidelity positions can only be chosen when converting '
                'a single-fidelity model'
            )
        existing = cp.fidelities
        if (
            source_fidelity
            and source_fidelity not in existing
            and source_fidelity not in (rename or {}).values()
        ):
            raise ConvertError(
                f'source fidelity {source_fidelity!r} is not in '
                f'{cp.source} (fidelities: {", ".join(existing)})'
            )
        names, src = plan_fidelities(
            existing, add, rename, drop, default_from=source_fidelity
        )
        new_model, cfg = remap_fidelities(model, cp.config, names, src)
        if mode and mode != cfg[S.FIDELITY_LAYER_MODE]:
            try:
                new_model, cfg = convert_layer_mode(new_model, cfg, mode)
            except ValueError as exc:
                raise ConvertError(f'cannot convert to {mode} mode: {exc}') from None
        if radial is not None and radial != bool(cfg.get(S.FIDELITY_RADIAL)):
            new_model, cfg = _with_radial(new_model, cfg, radial)
    # the state dict now has the layout of this sevenn's builder
    cfg['version'] = sevenn.__version__
    cfg[KEY.MODEL_TYPE] = 'E3_equivariant_model'
    new_model.eval()
    return new_model, cfg


def _pairs(
    items: Sequence[str], what: str, need_value: bool
) -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        key, value = key.strip(), value.strip()
        if not key or (sep and not value) or (need_value and not value):
            raise ConvertError(
                f'--{what} {item!r}: expected '
                f'{"OLD=NEW" if need_value else "NEW or NEW=FROM"}'
            )
        if key in out:
            raise ConvertError(f'--{what}: {key!r} given twice')
        out[key] = value or None
    return out


def convert_cli(args) -> str:
    """``sevenn_mf convert``: convert and save; returns the output path."""
    add = _pairs(args.add, 'add', need_value=False)
    rename = {k: str(v) for k, v in _pairs(args.rename, 'rename', True).items()}
    source = Checkpoint(args.source)
    refuse_overwriting(source.path, args.output)
    model, cfg = convert(
        source,
        source_fidelity=args.source_fidelity,
        add=add,
        rename=rename,
        drop=list(args.drop or []),
        mode=args.mode,
    )
    save_checkpoint(args.output, model, cfg)
    return str(args.output)


__all__ = [
    'convert',
    'convert_cli',
    'plan_fidelities',
    'remap_fidelities',
    'remap_layer',
    'from_plain',
    'ConvertError',
    'FidelityError',
]
