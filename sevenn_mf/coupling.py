"""Coupled fidelity heads: training penalties that tie every fidelity head to
an *anchor* head (usually the plentiful low-fidelity one) where only the
anchor has labels.

Without them, nothing in the loss constrains what a high-fidelity (HF) head
does on structures that only low-fidelity (LF) data covers, and its
fidelity-dependent parameters drift there: a bias exactly in the region
multi-fidelity training exists for. Two kinds of coupling, as ``train.coupling``
options (weights are multipliers of the same criterion as sevenn's own loss
terms, e.g. Huber, so ``energy: 1`` weighs like an energy label):

* **function space** (``energy``, ``force``, ``stress``): on a ``fraction`` of
  the training batches, the anchor-fidelity structures are also evaluated at
  each coupled head, in the same forward pass (unlabelled copies in the batch,
  :mod:`sevenn_mf.data.cross_fidelity`). Penalised is the part of the
  head - anchor difference that is not smooth: the spread of the per-atom
  energy gap (net of the two fidelities' element references:
  :func:`sevenn_mf.gap.net_atomic_energy`) among the batch's structures of one
  composition (``energy_within: composition``, the default; ``batch``
  compares all of them, which also flattens how the gap changes between
  compositions), and the size of the force (and,
  for structures with an anchor stress label, stress) difference. The anchor's
  predictions are the target, and the penalty's gradient goes to the coupled
  head's own fidelity-dependent parameters only: the HF head learns to follow
  the anchor where only the anchor has labels, while neither the anchor head
  nor the shared representation is pulled towards a fit of the HF head. A
  structure labelled at one fidelity then teaches every head.
* **parameter space** (``parameter``, a number or ``{fidelity: number}``): an
  L2 penalty, the mean over entries, on the fidelity-dependent parameters'
  deviation from the anchor's: ``indexed`` layers ΔW_f - ΔW_a and Δb_f - Δb_a;
  ``onehot`` layers the fidelity's one-hot weight columns minus the anchor's;
  fidelity radial networks (``fidelity_radial``) ΔW_f - ΔW_a.
  ``parameter_positions`` scales each position's squared deviations in that
  mean (e.g. ``{output_block: 0.1}``), so the L2 can be loose where the gap
  may depend on the environment and tight elsewhere.

With ``scale: fitted`` each coupled head gets its own energy scale (sevenn's
``use_modal_wise_scale``: one number per fidelity, the same for every
element), fitted once when training starts from a trained model: by least
squares, together with the head's element references, to the head's own
training labels against its predictions then (at the start the new head is
the anchor's copy: :func:`sevenn_mf.finetune.fit_scale`). The function-space
penalties then compare the heads' energies and forces each divided by its own
scale, so a head may be a uniformly stiffer or softer copy of the anchor
without penalty. Between methods that differ in how stiff bonds are
(CCSD(T) against PBE) the gap grows with the distortion energy, and a penalty
on its spread pins the high-fidelity head to the anchor's curvature exactly
where it has no labels. (Learning the scale by gradient instead was tried:
with Adam, a scale is a lever on the mean energy of the labelled structures
as much as on their spread, and it drifted the wrong way; see
docs/benchmarks.md, round 15.)

The per-fidelity energy references never enter a penalty. Folding, deploy and
export are unchanged: coupling only changes what is learned (a fitted scale
folds into the plain model's scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ._sevenn import KEY, modal_position
from .data.cross_fidelity import pairs_in_batch
from .gap import RESCALE, atom_fidelities, net_atomic_energy
from .model import fidelity_layers, fidelity_radial_nets
from .nn.fidelity_linear import instruction_map

COUPLING = 'coupling'  # train-section key
FUNCTION_WEIGHTS = ('energy', 'force', 'stress')
KEYS = (
    'anchor',
    'fidelities',
    'parameter',
    'energy',
    'force',
    'stress',
    'fraction',
    'energy_within',
    'parameter_positions',
    'scale',
)
# whether the coupled heads' energy scale is the anchor's or fitted at the start
SCALES = ('fixed', 'fitted')
# which structures' per-atom gaps the energy term compares: those of one
# composition (default), or every structure of the batch
ENERGY_WITHIN = ('composition', 'batch')
_WITHIN_WORDS = {'composition': 'each composition', 'batch': 'the batch'}
# Coupling is off unless train.coupling is given; given (``coupling: true``
# or a mapping), the options default to the measured recipe (extrapolation
# validation on the InGaN and ethanol training pools, docs/benchmarks.md):
# function space on half the batches, energy and force weight 1; the
# parameter penalty stays off (it was not part of that selection).
DEFAULTS = {
    'anchor': None,
    'fidelities': None,
    'parameter': 0.0,
    'energy': 1.0,
    'force': 1.0,
    'stress': 0.0,
    'fraction': 0.5,
    'energy_within': 'composition',
    'parameter_positions': None,
    'scale': 'fixed',
}
# multipliers of the parameter L2 per fidelity-dependent position (sevenn's
# use_modal_* names, and fidelity_radial's networks); 1 where not given
POSITIONS = (
    'node_embedding',
    'self_inter_intro',
    'self_inter_outro',
    'output_block',
    'radial',
)
_TO_KBAR = 1602.1766208  # eV/Å^3 -> kbar, as sevenn's stress loss


class CouplingError(ValueError):
    pass


@dataclass
class CouplingSettings:
    anchor: str
    fidelities: List[str]
    parameter: Dict[str, float] = field(default_factory=dict)
    energy: float = 0.0
    force: float = 0.0
    stress: float = 0.0
    fraction: float = 1.0
    energy_within: str = 'composition'
    parameter_positions: Dict[str, float] = field(default_factory=dict)
    scale: str = 'fixed'

    @property
    def fitted_scale(self) -> bool:
        return self.scale == 'fitted'

    @property
    def function_space(self) -> bool:
        return any(getattr(self, k) > 0 for k in FUNCTION_WEIGHTS)

    @property
    def parameter_space(self) -> bool:
        return any(v > 0 for v in self.parameter.values())

    @property
    def active(self) -> bool:
        return self.function_space or self.parameter_space or self.fitted_scale

    def describe(self) -> str:
        parts = []
        if self.function_space:
            parts.append(
                f'function space on {self.anchor} structures (energy {self.energy:g} '
                f'within {_WITHIN_WORDS[self.energy_within]}, '
                f'force {self.force:g}, stress {self.stress:g}; '
                f'{self.fraction:g} of the batches)'
            )
        if self.parameter_space:
            at = ', '.join(
                f'{k} x{m:g}' for k, m in self.parameter_positions.items() if m != 1
            )
            parts.append(
                'parameter L2 '
                + ', '.join(f'{f} {w:g}' for f, w in self.parameter.items() if w > 0)
                + (f' ({at})' if at else '')
            )
        if self.fitted_scale:
            parts.append('energy scale of each coupled head fitted at the start')
        return (
            f'coupled heads {", ".join(self.fidelities)} -> anchor {self.anchor}: '
            + '; '.join(parts)
        )


def _number(raw: Dict[str, Any], key: str, low: float = 0.0) -> float:
    value = raw.get(key, DEFAULTS[key])
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CouplingError(
            f'train.coupling.{key} must be a number, got {raw.get(key)!r}'
        ) from None
    if not math.isfinite(value) or value < low:
        raise CouplingError(
            f'train.coupling.{key} must be >= {low:g}, got {value!r}'
        )
    return value


def _positions(raw: Any) -> Dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CouplingError(
            'train.coupling.parameter_positions must be a mapping of position '
            f'to multiplier ({", ".join(POSITIONS)}), got {raw!r}'
        )
    unknown = sorted(set(raw) - set(POSITIONS))
    if unknown:
        raise CouplingError(
            f'train.coupling.parameter_positions: unknown position(s) {unknown}; '
            f'allowed: {", ".join(POSITIONS)}'
        )
    return {
        k: _number({'parameter_positions': raw[k]}, 'parameter_positions')
        for k in POSITIONS
        if k in raw
    }


def position_of(name: str) -> str:
    """The fidelity-dependent position (a :data:`POSITIONS` name) of a
    fidelity layer or radial network named as in the model."""
    if name.endswith('.weight_nn'):
        return 'radial'
    flag = modal_position(name)
    if flag is None:
        raise CouplingError(f'{name!r} is at no known fidelity-dependent position')
    return flag.replace('use_modal_', '')


def check_options(raw: Any, fidelities: Optional[Sequence[str]] = None) -> None:
    """Validate ``train.coupling`` before any data is read (names against the
    databases' fidelities when given)."""
    settings_from(raw, list(fidelities) if fidelities else None, {}, check_only=True)


def settings_from(
    raw: Any,
    fidelities: Optional[List[str]],
    n_structures: Dict[str, int],
    check_only: bool = False,
) -> Optional[CouplingSettings]:
    """The run's settings (None when no coupling is asked for).
    ``n_structures``: training structures per fidelity (the default anchor
    is the fidelity with the most)."""
    if raw is None or raw is False or raw == {}:
        return None
    if raw is True:
        raw = {}
    elif not isinstance(raw, dict):
        raise CouplingError(
            f'train.coupling must be true or a mapping of options, got {raw!r}'
        )
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise CouplingError(
            f'train.coupling: unknown key(s) {unknown}; allowed: {", ".join(KEYS)}'
        )
    weights = {k: _number(raw, k) for k in FUNCTION_WEIGHTS}
    fraction = _number(raw, 'fraction')
    if not 0 < fraction <= 1:
        raise CouplingError(
            f'train.coupling.fraction must be in (0, 1], got {fraction}'
        )
    within = raw.get('energy_within', DEFAULTS['energy_within'])
    if within not in ENERGY_WITHIN:
        raise CouplingError(
            f'train.coupling.energy_within must be one of '
            f'{", ".join(ENERGY_WITHIN)}, got {within!r}'
        )
    scale = raw.get('scale', DEFAULTS['scale'])
    if scale not in SCALES:
        raise CouplingError(
            f'train.coupling.scale must be one of {", ".join(SCALES)}, got {scale!r}'
        )
    anchor = raw.get('anchor')
    listed = raw.get('fidelities')
    if listed is not None and (
        not isinstance(listed, list) or not all(isinstance(f, str) for f in listed)
    ):
        raise CouplingError(
            f'train.coupling.fidelities must be a list of names, got {listed!r}'
        )
    param_raw = raw.get('parameter', DEFAULTS['parameter'])
    if isinstance(param_raw, dict):
        for f in param_raw:
            _number({'parameter': param_raw[f]}, 'parameter')
    positions = _positions(raw.get('parameter_positions'))
    if fidelities is None:  # names cannot be checked yet
        return None
    if anchor is None:
        if not n_structures:
            if check_only:
                anchor = fidelities[0]
            else:
                raise CouplingError('train.coupling: no training structures')
        else:
            anchor = max(fidelities, key=lambda f: n_structures.get(f, 0))
    for name, what in [(anchor, 'anchor')] + [
        (f, 'fidelities') for f in listed or []
    ]:
        if name not in fidelities:
            raise CouplingError(
                f"train.coupling.{what}: '{name}' is not a fidelity of this run "
                f'({", ".join(fidelities)})'
            )
    coupled = [f for f in (listed or fidelities) if f != anchor]
    if isinstance(param_raw, dict):
        bad = sorted(set(param_raw) - set(coupled))
        if bad:
            raise CouplingError(
                f'train.coupling.parameter names {bad}, which are not coupled '
                f'fidelities ({", ".join(coupled)})'
            )
        parameter = {
            f: _number({'parameter': param_raw[f]}, 'parameter')
            if f in param_raw
            else 0.0
            for f in coupled
        }
    else:
        value = _number(raw, 'parameter')
        parameter = {f: value for f in coupled}
    settings = CouplingSettings(
        anchor,
        coupled,
        parameter,
        fraction=fraction,
        energy_within=within,
        parameter_positions=positions,
        scale=scale,
        **weights,
    )
    if not coupled and settings.active:
        raise CouplingError(
            f'train.coupling: no fidelity to couple to the anchor {anchor!r}'
        )
    return settings if settings.active else None


class CouplingWarning(UserWarning):
    pass


# sevenn's output block is two linear layers with no activation between them,
# so a one-hot fidelity input there adds the same energy to every atom
_LINEAR_READOUT = ('reduce_input_to_hidden', 'reduce_hidden_to_energy')


def heads_differ_by_constant(model) -> bool:
    """True when the model's heads can differ only by a constant energy per
    atom (one-hot fidelity layers in the output block alone): no force gap,
    no spread of the per-atom gap, so the function-space penalties are zero."""
    layers = fidelity_layers(model)
    return bool(layers) and all(
        layer.is_onehot and name in _LINEAR_READOUT for name, layer in layers.items()
    )


def inert_warning(settings: CouplingSettings, model) -> Optional[str]:
    """The message when a coupling option has nothing to act on."""
    msgs = []
    if settings.function_space and heads_differ_by_constant(model):
        msgs.append(
            'train.coupling: with one-hot fidelity layers in the output block only, '
            'the heads differ by a constant energy per atom, so the function-space '
            'penalties are zero; to let the high-fidelity head learn a '
            'geometry-dependent difference, add fidelity-dependent layers '
            '(use_modal_self_inter_intro / _outro) or use fidelity_layer_mode: indexed'
        )
    if settings.parameter_space and settings.parameter_positions:
        present = {position_of(name) for name, _, _ in _parameter_slices(model)}
        absent = sorted(set(settings.parameter_positions) - present)
        if absent:
            msgs.append(
                f'train.coupling.parameter_positions names {absent}, where this '
                f'model has no fidelity-dependent parameters (it has: '
                f'{", ".join(sorted(present)) or "none"}); those multipliers do nothing'
            )
    return '; '.join(msgs) or None


# ---- the penalties -----------------------------------------------------------
def _parameter_slices(model) -> List[Tuple[str, torch.nn.Parameter, Any]]:
    """(layer name, parameter, how to take fidelity f's entries)."""
    out = []
    for name, layer in fidelity_layers(model).items():
        if layer.is_onehot:
            i_modal = len(layer.irreps_in)
            spans = [
                (off, n)
                for (i_in, _), (off, n, _) in instruction_map(layer.linear).items()
                if i_in == i_modal
            ]
            out.append(
                (name, layer.linear.weight, ('onehot', layer.num_fidelities, spans))
            )
        else:
            out.append((name, layer.delta_weight, ('rows',)))
            out.append((name, layer.delta_bias, ('rows',)))
    for name, net in fidelity_radial_nets(model).items():
        out.append((name, net.delta_weight, ('rows',)))
    return out


def _fidelity_entries(param: torch.Tensor, how, f: int) -> torch.Tensor:
    if how[0] == 'rows':
        return param[f].reshape(-1)
    _, n_fid, spans = how
    parts = [param[off : off + n].reshape(n_fid, -1)[f] for off, n in spans]
    return torch.cat(parts) if parts else param.new_zeros(0)


def composition_groups(batch, structures: Sequence[int]) -> torch.Tensor:
    """Group number of each of ``structures`` (indices into the batch) by
    reduced composition (Ga2N2 and Ga4N4 are one group).

    Why by composition: the per-element references take up the part of the
    gap that is linear in composition; what remains between compositions
    (e.g. the bowing of a functional's mixing energy, r2SCAN vs PBE in InGaN)
    is physics the high-fidelity labels of other compositions may teach, not
    noise, so it is not penalised."""
    z = batch[KEY.ATOMIC_NUMBERS].reshape(-1)
    ptr = torch.cumsum(batch[KEY.NUM_ATOMS].reshape(-1), 0).tolist()
    start = [0] + ptr[:-1]
    keys: Dict[Tuple[int, ...], int] = {}
    out = []
    for s in structures:
        zs, counts = torch.unique(z[start[s] : ptr[s]], return_counts=True)
        g = math.gcd(*counts.tolist())
        key = tuple(zs.tolist()) + tuple(c // g for c in counts.tolist())
        out.append(keys.setdefault(key, len(keys)))
    return torch.tensor(out, dtype=torch.long)


def atom_scales(batch, model) -> torch.Tensor:
    """Each atom's energy scale at its structure's fidelity (N,)."""
    types = batch[KEY.ATOM_TYPE].reshape(-1)
    return model._modules[RESCALE].scale[atom_fidelities(batch), types]


class CouplingLoss:
    """A loss term in sevenn's sense (``trainer.loss_functions`` entries have
    ``get_loss(batch, model)`` and ``name``): the coupling penalties of one
    training batch. ``last`` holds the latest term values for the log."""

    name = 'Coupling'
    ignore_unlabeled = True

    def __init__(
        self, settings: CouplingSettings, config: Dict[str, Any], criterion
    ):
        self.settings = settings
        self.criterion = criterion
        modal = config[KEY.MODAL_MAP]
        self.anchor = modal[settings.anchor]
        self.targets = {modal[f]: f for f in settings.fidelities}
        self.param_weight = {
            modal[f]: w for f, w in settings.parameter.items() if w > 0
        }
        self.positions = settings.parameter_positions
        self.sums = {k: 0.0 for k in ('parameter',) + FUNCTION_WEIGHTS}
        self.steps = 0
        # the terms the settings switch on, logged each epoch even when zero
        # (an epoch may have drawn no batch with copies)
        self.terms = ['parameter'] * settings.parameter_space + [
            k for k in FUNCTION_WEIGHTS if getattr(settings, k) > 0
        ]

    def _crit(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(self.criterion(x, torch.zeros_like(x)))

    def parameter_penalty(self, model) -> Optional[torch.Tensor]:
        if not self.param_weight:
            return None
        total = None
        for f, w in self.param_weight.items():
            sq, n = 0.0, 0
            for name, p, how in _parameter_slices(model):
                d = (
                    _fidelity_entries(p, how, f)
                    - _fidelity_entries(p, how, self.anchor).detach()
                )
                # the mean runs over every entry whatever the multipliers, so
                # that multipliers of 1 are the plain penalty
                m = (
                    self.positions.get(position_of(name), 1.0)
                    if self.positions
                    else 1.0
                )
                sq = sq + m * (d * d).sum()
                n += d.numel()
            if n:
                term = w * sq / n
                total = term if total is None else total + term
        return total

    def function_penalty(self, batch, model) -> Dict[str, torch.Tensor]:
        pairs = pairs_in_batch(batch)
        if not pairs:
            return {}
        # read once as Python numbers: on a GPU every int() of a tensor element
        # is a device sync, and the loops below index per structure
        ptr = torch.cumsum(batch[KEY.NUM_ATOMS].reshape(-1), 0).tolist()
        start = [0] + ptr[:-1]
        net = net_atomic_energy(batch, model)
        dev = net.device  # index tensors made here go where the batch is (GPU)
        modal = batch[KEY.MODAL_TYPE].reshape(-1).tolist()
        force = batch[KEY.PRED_FORCE] if self.settings.force > 0 else None
        stress = batch[KEY.PRED_STRESS] if self.settings.stress > 0 else None
        if self.settings.fitted_scale:
            # each head in its own units: a uniform stiffening is no gap
            per_atom_scale = atom_scales(batch, model).detach()
            net = net / per_atom_scale
            if force is not None:
                force = force / per_atom_scale.unsqueeze(-1)
            if stress is not None:
                stress = (
                    stress / per_atom_scale[torch.tensor(start, device=dev)][:, None]
                )

        def nodes(structures):
            return torch.cat(
                [torch.arange(start[s], ptr[s], device=dev) for s in structures]
            )

        terms: Dict[str, List[torch.Tensor]] = {k: [] for k in FUNCTION_WEIGHTS}
        for f in self.targets:
            sel = [
                (c, o) for c, o in pairs if modal[c] == f and modal[o] == self.anchor
            ]
            if not sel:
                continue
            node_c = nodes([c for c, _ in sel])
            node_o = nodes([o for _, o in sel])
            owner = torch.cat(
                [
                    torch.full((ptr[c] - start[c],), k, device=dev)
                    for k, (c, _) in enumerate(sel)
                ]
            )
            n_atoms = torch.bincount(owner, minlength=len(sel)).to(net.dtype)
            diff = net[node_c] - net[node_o].detach()
            per_atom = torch.zeros(len(sel), dtype=net.dtype, device=dev).index_add(
                0, owner, diff
            )
            per_atom = per_atom / n_atoms
            if self.settings.energy > 0:
                spread = self._gap_spread(per_atom, batch, [o for _, o in sel])
                if spread is not None:
                    terms['energy'].append(self._crit(spread))
            if self.settings.force > 0:
                fd = force[node_c] - force[node_o].detach()
                terms['force'].append(self._crit(fd))
            if self.settings.stress > 0:
                stressed = [
                    (c, o)
                    for c, o in sel
                    if bool(torch.isfinite(batch[KEY.STRESS][o]).all())
                ]
                if stressed:
                    cs = torch.tensor([c for c, _ in stressed], device=dev)
                    os_ = torch.tensor([o for _, o in stressed], device=dev)
                    sd = stress[cs] - stress[os_].detach()
                    terms['stress'].append(self._crit(sd * _TO_KBAR))
        return {k: torch.stack(v).mean() for k, v in terms.items() if v}

    def _gap_spread(self, per_atom, batch, structures) -> Optional[torch.Tensor]:
        """Each structure's per-atom gap minus the mean of its group: the
        structures of the same (reduced) composition, or the whole batch.
        Only groups of two or more count; None when there is none."""
        if self.settings.energy_within == 'batch':
            groups = torch.zeros(len(structures), dtype=torch.long)
        else:
            groups = composition_groups(batch, structures)
        groups = groups.to(per_atom.device)
        size = torch.bincount(groups).to(per_atom.dtype)
        mean = torch.zeros_like(size).index_add(0, groups, per_atom) / size
        keep = size[groups] > 1
        if not bool(keep.any()):
            return None
        return (per_atom - mean[groups])[keep]

    def _own_parameters(self, model) -> List[Tuple[torch.nn.Parameter, Any]]:
        """(parameter, entry mask or None) of the coupled heads' own
        fidelity-dependent parameters."""
        out = []
        for _, p, how in _parameter_slices(model):
            if not p.requires_grad:
                continue
            if how[0] == 'rows':
                mask = torch.zeros_like(p, dtype=torch.bool)
                mask[list(self.targets)] = True
            else:
                flat = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                _, n_fid, spans = how
                for off, n in spans:
                    rows = flat[off : off + n].view(n_fid, -1)
                    rows[list(self.targets)] = True
                mask = flat.view(p.shape)
            out.append((p, mask))
        return out

    def get_loss(self, batch, model=None) -> Optional[torch.Tensor]:
        """The parameter penalty (returned: sevenn adds it to the loss) and
        the function-space penalty, whose gradient is put on the coupled
        heads' own fidelity-dependent parameters here (accumulated into their
        ``.grad``, to which sevenn's backward then adds): the penalty moves
        the high-fidelity head towards the anchor's behaviour, never the
        shared representation or the anchor towards a fit of it."""
        model = getattr(model, 'module', model)  # DDP
        total = self.parameter_penalty(model)
        if total is not None:
            self.sums['parameter'] += float(total.detach())
        function = None
        for k, v in self.function_penalty(batch, model).items():
            w = getattr(self.settings, k)
            self.sums[k] += float(v.detach())
            function = w * v if function is None else function + w * v
        if function is not None and function.requires_grad:
            own = self._own_parameters(model)
            grads = torch.autograd.grad(
                function, [p for p, _ in own], retain_graph=True, allow_unused=True
            )
            with torch.no_grad():
                for (p, mask), g in zip(own, grads):
                    if g is None:
                        continue
                    g = torch.where(mask, g, torch.zeros_like(g))
                    p.grad = g if p.grad is None else p.grad + g
        self.steps += 1
        return total

    def epoch_means(self) -> Dict[str, float]:
        """Mean penalty values (before weights) over the steps since the last
        call; resets."""
        n = max(self.steps, 1)
        out = {k: v / n for k, v in self.sums.items() if k in self.terms}
        self.sums = {k: 0.0 for k in self.sums}
        self.steps = 0
        return out


def coupling_targets(
    settings: CouplingSettings,
) -> Tuple[List[str], Dict[str, List[int]]]:
    """Target fidelities of the batch copies and, per source fidelity, which
    copy numbers (1..K) its structures get (anchor structures, at each coupled
    head)."""
    targets = list(settings.fidelities)
    return targets, {settings.anchor: list(range(1, len(targets) + 1))}
