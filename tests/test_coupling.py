"""Coupled fidelity heads (sevenn_mf.coupling) and the fidelity-gap monitor
(sevenn_mf.gap): the penalties vanish when the heads agree, their gradients
reach only the parameters they are meant to, batches with copies leave the
data loss unchanged, coupling shrinks the gap where only low-fidelity data
exists, and folding / export / deploy and the gap monitor stay exact."""

import copy

import numpy as np
import pytest
import torch
from ase.io import read, write
from conftest import QUICKSTART_DATA
from helpers import FIDS, calc_results, small_config
from torch_geometric.data import Batch

from sevenn_mf._sevenn import KEY
from sevenn_mf.config import config_from_dict
from sevenn_mf.coupling import (
    CouplingError,
    CouplingLoss,
    composition_groups,
    heads_differ_by_constant,
    inert_warning,
    settings_from,
)
from sevenn_mf.data.cross_fidelity import (
    CrossFidelityBatchSampler,
    CrossFidelityDataset,
    pairs_in_batch,
)
from sevenn_mf.data.databases import read_frames
from sevenn_mf.data.graphs import build_graphs
from sevenn_mf.data.sampler import DatabaseSampler
from sevenn_mf.model import build_model, fidelity_layers, per_fidelity_scale
from sevenn_mf.nn.fidelity_linear import instruction_map

ANCHOR, HF = FIDS  # 'pbe', 'r2scan'


def _huber(x, y):
    return torch.nn.functional.huber_loss(x, y, delta=0.01, reduction='none')


def _settings(**kw):
    raw = dict({'anchor': ANCHOR}, **kw)
    return settings_from(raw, FIDS, {ANCHOR: 10, HF: 2})


def _equal_heads(model):
    """Make every fidelity head compute the anchor's function."""
    with torch.no_grad():
        for layer in fidelity_layers(model).values():
            if layer.is_onehot:
                w = layer.linear.weight
                i_modal = len(layer.irreps_in)
                for (i_in, _), (off, n, _) in instruction_map(layer.linear).items():
                    if i_in == i_modal:
                        rows = w[off : off + n].view(layer.num_fidelities, -1)
                        rows[1:] = rows[0]
            else:
                layer.delta_weight[1:] = layer.delta_weight[0]
                layer.delta_bias[1:] = layer.delta_bias[0]


def _perturb_hf_head(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fidelity_layers(model).values():
            if layer.is_onehot:
                i_modal = len(layer.irreps_in)
                for (i_in, _), (off, n, _) in instruction_map(layer.linear).items():
                    if i_in == i_modal:
                        rows = layer.linear.weight[off : off + n].view(
                            layer.num_fidelities, -1
                        )
                        rows[1] += 0.5 * torch.randn(rows.shape[1], generator=g)
            else:
                layer.delta_weight[1] += 0.1 * torch.randn(
                    layer.delta_weight.shape[1], generator=g
                )
                layer.delta_bias[1] += 0.1 * torch.randn(
                    layer.delta_bias.shape[1], generator=g
                )


def _hf_masks(model):
    """{parameter name: (anchor entries, HF entries)} boolean masks of the
    fidelity-dependent entries, computed from the layer layout."""
    out = {}
    for name, layer in fidelity_layers(model).items():
        if layer.is_onehot:
            w = layer.linear.weight
            masks = [torch.zeros(w.numel(), dtype=torch.bool) for _ in range(2)]
            i_modal = len(layer.irreps_in)
            for (i_in, _), (off, n, _) in instruction_map(layer.linear).items():
                if i_in == i_modal:
                    idx = torch.arange(off, off + n).view(layer.num_fidelities, -1)
                    for f in range(2):
                        masks[f][idx[f]] = True
            out[f'{name}.linear.weight'] = tuple(m.view(w.shape) for m in masks)
        else:
            for p in ('delta_weight', 'delta_bias'):
                t = getattr(layer, p)
                m = [torch.zeros_like(t, dtype=torch.bool) for _ in range(2)]
                m[0][0], m[1][1] = True, True
                out[f'{name}.{p}'] = tuple(m)
    return out


@pytest.fixture(scope='module')
def lf_graphs():
    # the first four in pairs of one composition (Ga3InN4, Ga4N4), which the
    # energy term compares
    frames = read_frames(QUICKSTART_DATA / 'pbe.extxyz')
    return build_graphs([frames[i] for i in (0, 2, 4, 7, 1, 3)], 4.5, ANCHOR, 1.0)


def _batch_with_copies(graphs, n=4):
    ds = CrossFidelityDataset(graphs, [HF])
    return Batch.from_data_list(
        [ds[i] for i in range(n)] + [ds[i + len(graphs)] for i in range(n)]
    )


def _forward_train(model, batch):
    model.train()
    model.set_is_batch_data(True)
    return model(batch)


@pytest.mark.parametrize('mode', ['onehot', 'indexed'])
def test_penalties_vanish_when_heads_agree(mode, lf_graphs):
    torch.manual_seed(0)
    model = build_model(small_config(mode))
    _equal_heads(model)
    cfg = small_config(mode)
    loss = CouplingLoss(_settings(energy=1, force=1, parameter=1), cfg, _huber)
    out = _forward_train(model, _batch_with_copies(lf_graphs))
    assert loss.parameter_penalty(model).item() == 0.0
    terms = loss.function_penalty(out, model)
    assert set(terms) == {'energy', 'force'}
    # the two fidelities have different element references (-1 vs -2 eV):
    # the energy term sees only what lies beyond them
    assert terms['energy'].item() < 1e-10
    assert terms['force'].item() < 1e-10

    _perturb_hf_head(model)
    out = _forward_train(model, _batch_with_copies(lf_graphs))
    terms = loss.function_penalty(out, model)
    assert loss.parameter_penalty(model).item() > 1e-4
    # (the energy term compares two pairs of one composition: small but real)
    assert terms['energy'].item() > 1e-8 and terms['force'].item() > 1e-6


@pytest.mark.parametrize('mode', ['onehot', 'indexed'])
def test_fitted_scale_lets_a_uniformly_stiffer_head_go_free(mode, lf_graphs):
    cfg = small_config(mode)
    torch.manual_seed(3)
    model = build_model(cfg)
    _equal_heads(model)
    settings = _settings(energy=1, force=1, scale='fitted')
    cfg = per_fidelity_scale(model, cfg)
    scale = model.rescale_atomic_energy.scale
    assert cfg[KEY.USE_MODAL_WISE_SCALE] and tuple(scale.shape) == (2, 3)
    with torch.no_grad():
        scale[1] = 1.1 * scale[0]  # the HF head: the anchor's PES x 1.1
    fixed = CouplingLoss(_settings(energy=1, force=1), cfg, _huber)
    fitted = CouplingLoss(settings, cfg, _huber)
    out = _forward_train(model, _batch_with_copies(lf_graphs))
    t_fixed = fixed.function_penalty(out, model)
    t_fitted = fitted.function_penalty(out, model)
    # forces differ by 10 %: a gap for the anchor's scale, none in each own's
    assert t_fixed['force'].item() > 1e-6 and t_fixed['energy'].item() > 1e-9
    assert t_fitted['force'].item() < 1e-6 * t_fixed['force'].item()
    assert t_fitted['energy'].item() < 1e-6 * t_fixed['energy'].item()
    _perturb_hf_head(model)
    out = _forward_train(model, _batch_with_copies(lf_graphs))
    assert fitted.function_penalty(out, model)['force'].item() > 1e-6
    # the gradient still reaches the coupled head only, never a scale
    model.zero_grad()
    assert fitted.get_loss(out, model) is None
    assert scale.grad is None
    # a rebuilt model (sevenn's loaders do that from the config) has the shape
    build_model(cfg).load_state_dict(model.state_dict(), strict=True)


def test_fit_scale_recovers_a_known_stiffening_and_references():
    from types import SimpleNamespace

    from sevenn_mf.data.references import scale_reach
    from sevenn_mf.finetune import fit_scale, predict_energies

    cfg = small_config('onehot')
    torch.manual_seed(5)
    model = build_model(cfg)
    _equal_heads(model)  # the HF head starts as the anchor's copy
    frames = read_frames(QUICKSTART_DATA / 'pbe.extxyz')
    graphs = build_graphs(frames[:12], 4.5, HF, 1.0)
    # labels: the head's own energy beyond its references x 1.25, plus new
    # references (Ga -3, In -2, N -5 eV); several compositions
    f = cfg[KEY.MODAL_MAP][HF]
    shift = model.rescale_atomic_energy.shift[f].detach().double()
    pred = predict_energies(model, graphs)
    new_ref = {31: -3.0, 49: -2.0, 7: -5.0}
    for g, p in zip(graphs, pred):
        z = g[KEY.ATOMIC_NUMBERS].tolist()
        own = sum(float(shift[cfg[KEY.TYPE_MAP][x]]) for x in z)
        g[KEY.ENERGY] = torch.tensor(1.25 * (p - own) + sum(new_ref[x] for x in z))
    # the anchor's training structures, labelled by the anchor head: how far
    # they reach beyond the fitted ones is measured on the head's own zero
    pool = build_graphs(frames[12:], 4.5, ANCHOR, 1.0)
    for g, p in zip(pool, predict_energies(model, pool)):
        g[KEY.ENERGY] = torch.tensor(float(p))
    data = SimpleNamespace(
        databases=[
            SimpleNamespace(spec=SimpleNamespace(fidelity=HF), train=graphs),
            SimpleNamespace(spec=SimpleNamespace(fidelity=ANCHOR), train=pool),
        ]
    )
    lines = []
    start_pred = predict_energies(model, graphs)
    a_shift = model.rescale_atomic_energy.shift[1 - f].detach().double()
    own = {
        name: [
            sum(
                float(sh[cfg[KEY.TYPE_MAP][x]])
                for x in g[KEY.ATOMIC_NUMBERS].tolist()
            )
            for g in gs
        ]
        for name, sh, gs in (('fit', shift, graphs), ('pool', a_shift, pool))
    }
    want = scale_reach(
        [g[KEY.ATOMIC_NUMBERS].numpy() for g in graphs],
        start_pred - np.array(own['fit']),
        [g[KEY.ATOMIC_NUMBERS].numpy() for g in pool],
        np.array([float(g[KEY.ENERGY]) for g in pool]) - np.array(own['pool']),
    )
    cfg = fit_scale(model, cfg, data, [HF], log=lines.append, anchor=ANCHOR)
    assert (
        f'the {ANCHOR} training structures reach {1000 * want:.0f} meV/atom'
        in (lines[0])
    )
    scale = model.rescale_atomic_energy.scale.detach()
    assert float(scale[f, 0] / scale[1 - f, 0]) == pytest.approx(1.25, rel=1e-4)
    assert torch.allclose(scale[f], scale[f, :1].expand_as(scale[f]))
    after = predict_energies(model, graphs)
    labels = np.array([float(g[KEY.ENERGY]) for g in graphs])
    np.testing.assert_allclose(after, labels, atol=2e-4)
    assert 'energy scale fit (r2scan): x1.2500' in lines[0]
    # the logged MAE after the fit is the model's own
    n_atoms = np.array([g[KEY.NUM_ATOMS].item() for g in graphs])
    logged = float(lines[0].split('-> ')[1].split(' meV')[0])
    assert logged == pytest.approx(
        1000 * np.mean(np.abs(after - labels) / n_atoms), abs=0.01
    )
    # the config rebuilds the model, and says the same scale
    assert cfg[KEY.SCALE][HF][31] == pytest.approx(float(scale[f, 0]))
    build_model(cfg).load_state_dict(model.state_dict(), strict=True)


def test_fitted_scale_needs_a_trained_start():
    from sevenn_mf.train import check_options

    cfg = dict(small_config('onehot'), coupling={'scale': 'fitted'})
    with pytest.raises(CouplingError, match='needs a trained start'):
        check_options(cfg)
    check_options(dict(cfg, pretrained='some.pth'))


@pytest.mark.parametrize('mode', ['onehot', 'indexed'])
def test_gradients_reach_only_the_coupled_head(mode, lf_graphs):
    cfg = copy.deepcopy(small_config(mode))
    cfg[KEY.TRAIN_SHIFT_SCALE] = True  # references trainable: must get nothing
    torch.manual_seed(1)
    model = build_model(cfg)
    _perturb_hf_head(model, seed=2)
    masks = _hf_masks(model)
    loss = CouplingLoss(_settings(energy=1, force=1, parameter=1), cfg, _huber)

    model.zero_grad()
    loss.parameter_penalty(model).backward()
    for name, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        if name in masks:
            anchor, hf = masks[name]
            assert g[hf].abs().max() > 0, name
            assert g[~hf].abs().max() == 0, name  # shared and anchor entries
        else:
            assert g.abs().max() == 0, name

    # the function-space penalty as such: nothing on the anchor or the references
    model.zero_grad()
    out = _forward_train(model, _batch_with_copies(lf_graphs))
    terms = loss.function_penalty(out, model)
    (terms['energy'] + terms['force']).backward()
    grads = dict(model.named_parameters())
    shift = grads['rescale_atomic_energy.shift']
    assert shift.grad is None or shift.grad.abs().max() == 0  # references
    for name, (anchor, hf) in masks.items():
        g = grads[name].grad
        assert g[hf].abs().max() > 0, name
        assert g[anchor].abs().max() == 0, name  # the anchor is the target

    # and as a training term: get_loss puts its gradient on the coupled head's
    # own entries only, never on the shared representation
    only_function = CouplingLoss(_settings(energy=1, force=1), cfg, _huber)
    model.zero_grad()
    out = _forward_train(model, _batch_with_copies(lf_graphs))
    assert only_function.get_loss(out, model) is None  # nothing left for sevenn
    for name, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        if name in masks:
            anchor, hf = masks[name]
            assert g[hf].abs().max() > 0, name
            assert g[~hf].abs().max() == 0, name
        else:
            assert g.abs().max() == 0, name


def test_energy_term_compares_gaps_within_a_composition():
    """The default energy term leaves a gap that differs only between
    compositions alone (the references cannot follow a bowing, the HF labels
    of other compositions may teach it); ``energy_within: batch`` does not."""
    frames = read_frames(QUICKSTART_DATA / 'pbe.extxyz')[:12]
    graphs = build_graphs(frames, 4.5, ANCHOR, 1.0)
    batch = Batch.from_data_list(graphs)
    idx = list(range(len(graphs)))
    groups = composition_groups(batch, idx).tolist()
    formulas = [f.atoms.get_chemical_formula() for f in frames]
    assert len(set(formulas)) > 2
    for i in idx:
        for j in idx:
            assert (groups[i] == groups[j]) == (formulas[i] == formulas[j])
    # a doubled cell is the same composition
    big = frames[0].atoms.repeat((2, 1, 1))
    two = Batch.from_data_list(
        [
            graphs[0],
            build_graphs([type(frames[0]).from_atoms(big)], 4.5, ANCHOR, 1.0)[0],
        ]
    )
    assert composition_groups(two, [0, 1]).tolist() == [0, 0]

    cfg = small_config('onehot')
    by_comp = torch.tensor([0.01 * g for g in groups], dtype=torch.float64)
    noise = torch.linspace(-0.003, 0.003, len(idx), dtype=torch.float64)
    loss = CouplingLoss(_settings(energy=1), cfg, _huber)
    assert loss.settings.energy_within == 'composition'
    spread = loss._gap_spread(by_comp, batch, idx)
    assert spread.abs().max() < 1e-12  # only a composition-level gap: no penalty
    spread = loss._gap_spread(by_comp + noise, batch, idx)
    assert spread.abs().max() > 1e-4  # variation within a composition counts
    whole = CouplingLoss(_settings(energy=1, energy_within='batch'), cfg, _huber)
    assert whole._gap_spread(by_comp, batch, idx).abs().max() > 1e-3
    # a batch with no two structures of one composition: no energy term
    single = [formulas.index(f) for f in dict.fromkeys(formulas)]
    assert loss._gap_spread(by_comp[single], batch, single) is None


def test_copies_change_no_data_loss(lf_graphs):
    from sevenn.train.loss import get_loss_functions_from_config

    cfg = small_config('indexed')
    cfg.update({KEY.LOSS: 'huber', KEY.LOSS_PARAM: {'delta': 0.01}})
    cfg[KEY.USE_WEIGHT] = True
    torch.manual_seed(3)
    model = build_model(cfg)
    _perturb_hf_head(model)
    ds = CrossFidelityDataset(lf_graphs, [HF])
    plain = Batch.from_data_list([ds[i] for i in range(4)])
    with_copies = _batch_with_copies(lf_graphs)
    assert pairs_in_batch(with_copies) == [(4, 0), (5, 1), (6, 2), (7, 3)]
    assert pairs_in_batch(plain) == []
    for loss_def, _ in get_loss_functions_from_config(cfg):
        a = loss_def.get_loss(_forward_train(model, plain), model)
        b = loss_def.get_loss(_forward_train(model, with_copies), model)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_batch_sampler_copies_anchor_structures_on_a_fraction_of_batches():
    fids = [ANCHOR] * 30 + [HF] * 10
    sampler = DatabaseSampler([30, 10], seed=4)
    bs = CrossFidelityBatchSampler(sampler, 4, fids, {ANCHOR: [1]}, 0.5, seed=4)
    bs.set_epoch(2)
    batches = list(bs)
    plain = [list(b) for b in _chunks(list(sampler), 4)]
    assert [b[: len(p)] for b, p in zip(batches, plain)] == plain  # same order
    coupled = 0
    for b, p in zip(batches, plain):
        extra = b[len(p) :]
        if extra:
            coupled += 1
            assert extra == [i + 40 for i in p if i < 30]  # anchor ones only
    assert 0.2 < coupled / len(batches) < 0.8
    bs.set_epoch(2)
    assert list(bs) == batches  # deterministic from (seed, epoch)
    bs.set_epoch(3)
    assert list(bs) != batches


def _chunks(seq, n):
    return [seq[i : i + n] for i in range(0, len(seq), n)]


@pytest.mark.parametrize('mode', ['onehot', 'indexed'])
def test_parameter_positions_weigh_each_position(mode):
    """train.coupling.parameter_positions: multipliers of 1 are the plain
    penalty; otherwise each position's squared deviations are scaled in the
    mean over all entries, and a multiplier of 0 frees that position."""
    cfg = small_config(mode)
    torch.manual_seed(3)
    model = build_model(cfg)
    _perturb_hf_head(model, seed=4)
    masks = _hf_masks(model)
    plain = CouplingLoss(_settings(parameter=2.0), cfg, _huber)
    ones = CouplingLoss(
        _settings(
            parameter=2.0,
            parameter_positions={'output_block': 1, 'self_inter_intro': 1},
        ),
        cfg,
        _huber,
    )
    assert ones.parameter_penalty(model).item() == pytest.approx(
        plain.parameter_penalty(model).item(), rel=1e-12
    )

    # direct: 2 * sum_l m_l * |d_l|^2 / (number of HF entries)
    mult = {'output_block': 0.1, 'self_inter_outro': 0.0}
    weighted = CouplingLoss(
        _settings(parameter=2.0, parameter_positions=mult), cfg, _huber
    )
    params = dict(model.named_parameters())
    sq, n, seen = 0.0, 0, set()
    for name, (anchor, hf) in masks.items():
        layer = name.split('.')[0]
        m = (
            0.1
            if layer == 'reduce_input_to_hidden'
            else 0.0
            if layer.endswith('self_interaction_2')
            else 1.0
        )
        seen.add(m)
        p = params[name].detach()
        d = p[hf] - p[anchor]
        sq += m * float((d * d).sum())
        n += d.numel()
    assert seen == {0.1, 0.0, 1.0}  # the model has all three kinds
    assert inert_warning(weighted.settings, model) is None
    radial = _settings(parameter=1.0, parameter_positions={'radial': 0.1})
    assert "names ['radial']" in inert_warning(radial, model)
    assert weighted.parameter_penalty(model).item() == pytest.approx(
        2.0 * sq / n, rel=1e-6
    )

    model.zero_grad()
    weighted.parameter_penalty(model).backward()
    for name, (_, hf) in masks.items():
        g = params[name].grad
        g = torch.zeros_like(params[name]) if g is None else g
        if name.split('.')[0].endswith('self_interaction_2'):
            assert g.abs().max() == 0, name  # freed
        else:
            assert g[hf].abs().max() > 0, name


def test_settings_errors():
    with pytest.raises(CouplingError, match='scale must be one of'):
        settings_from({'scale': 'free'}, FIDS, {})
    with pytest.raises(CouplingError, match='unknown key'):
        settings_from({'enrgy': 1}, FIDS, {})
    with pytest.raises(CouplingError, match="'hse' is not a fidelity"):
        settings_from({'anchor': 'hse', 'energy': 1}, FIDS, {})
    with pytest.raises(CouplingError, match='fraction'):
        settings_from({'energy': 1, 'fraction': 0}, FIDS, {})
    with pytest.raises(CouplingError, match='>= 0'):
        settings_from({'force': -1}, FIDS, {})
    with pytest.raises(CouplingError, match='energy_within must be one of'):
        settings_from({'energy': 1, 'energy_within': 'cell'}, FIDS, {})
    with pytest.raises(CouplingError, match=r"unknown position\(s\) \['readout'\]"):
        settings_from(
            {'parameter': 1, 'parameter_positions': {'readout': 0}}, FIDS, {}
        )
    with pytest.raises(CouplingError, match='must be a mapping'):
        settings_from({'parameter': 1, 'parameter_positions': 0.1}, FIDS, {})
    with pytest.raises(CouplingError, match='>= 0'):
        settings_from(
            {'parameter': 1, 'parameter_positions': {'output_block': -1}}, FIDS, {}
        )
    assert settings_from({}, FIDS, {}) is None
    assert settings_from({'energy': 0, 'force': 0}, FIDS, {ANCHOR: 1}) is None
    recipe = settings_from(True, FIDS, {ANCHOR: 3, HF: 1})  # the measured defaults
    assert (recipe.energy, recipe.force, recipe.fraction) == (1.0, 1.0, 0.5)
    assert recipe.parameter == {HF: 0.0} and recipe.anchor == ANCHOR
    s = settings_from({'energy': 1}, FIDS, {ANCHOR: 3, HF: 9})
    assert s.anchor == HF and s.fidelities == [ANCHOR]  # default: most data


@pytest.mark.parametrize(
    'mode,positions,constant',
    [
        ('onehot', 'output', True),
        ('onehot', None, False),
        ('indexed', 'output', False),
    ],
)
def test_heads_that_can_only_differ_by_a_constant_are_detected(
    mode, positions, constant, lf_graphs
):
    """One-hot fidelity input at sevenn's linear output block alone: the head
    gap is one energy per atom whatever the structure, the function-space
    penalties are zero, and the run says so."""
    from sevenn_mf.gap import head_gaps

    cfg = small_config(mode, positions=positions)
    model = build_model(cfg)
    _perturb_hf_head(model)
    assert heads_differ_by_constant(model) is constant
    gaps = head_gaps(model, cfg, lf_graphs, reference=HF)
    spread = float(gaps.energy[ANCHOR].std())
    force = float(gaps.force[ANCHOR].mean())
    if constant:
        assert spread < 1e-6 and force < 1e-6, (spread, force)
        assert 'constant energy per atom' in inert_warning(
            _settings(energy=1.0), model
        )
    else:
        assert spread > 1e-5 and force > 1e-5, (spread, force)
        assert inert_warning(_settings(energy=1.0), model) is None
    assert inert_warning(_settings(parameter=1.0, energy=0, force=0), model) is None


# ---- a small run from the shared data ----------------------------------------
def _ingan_raw(tmp_path, shared, coupling):
    """PBE at x = 0 ... 1, r2SCAN at x = 0 and 1 only (real GPAW data)."""
    rng = np.random.default_rng(0)
    lf = read(shared / 'ingan' / 'lf_train_pbe.extxyz', ':')
    hf = read(shared / 'ingan' / 'hf_train_r2scan.extxyz', ':')
    lf = [lf[i] for i in rng.permutation(len(lf))[:80]]
    hf = [hf[i] for i in rng.permutation(len(hf))[:20]]
    write(tmp_path / 'lf.extxyz', lf)
    write(tmp_path / 'hf.extxyz', hf)
    return {
        'model': {
            'chemical_species': 'auto',
            'cutoff': 4.5,
            'channel': 8,
            'lmax': 1,
            'num_convolution_layer': 2,
            'is_parity': False,
            'weight_nn_hidden_neurons': [16, 16],
            'fidelity_layer_mode': 'indexed',
        },
        'train': {
            'random_seed': 1,
            'epoch': 12,
            'per_epoch': 100,
            'optimizer': 'adam',
            'optim_param': {'lr': 0.01},
            'scheduler': 'linearlr',
            'scheduler_param': {
                'start_factor': 1.0,
                'end_factor': 0.2,
                'total_iters': 12,
            },
            'loss': 'huber',
            'loss_param': {'delta': 0.01},
            'force_loss_weight': 1.0,
            'stress_loss_weight': 0.01,
            'best_fidelity': HF,
            'device': 'cpu',
            'coupling': coupling,
        },
        'data': {
            'batch_size': 8,
            'databases': [
                {
                    'name': 'lf',
                    'fidelity': ANCHOR,
                    'files': 'lf.extxyz',
                    'validation': {'ratio': 0.2, 'seed': 1},
                },
                {
                    'name': 'hf',
                    'fidelity': HF,
                    'files': 'hf.extxyz',
                    'weight': {'energy': 5.0, 'force': 5.0},
                    'validation': {'ratio': 0.2, 'seed': 1},
                },
            ],
        },
    }


@pytest.fixture(scope='module')
def ingan_runs(tmp_path_factory, shared_data):
    from sevenn_mf.train import train

    out = {}
    for name, coupling in (
        ('plain', {}),
        (
            'coupled',
            {'anchor': ANCHOR, 'energy': 2.0, 'force': 1.0, 'parameter': 0.1},
        ),
        ('scaled', {'anchor': ANCHOR, 'scale': 'fitted'}),
    ):
        d = tmp_path_factory.mktemp(name)
        raw = _ingan_raw(d, shared_data, coupling)
        if name == 'scaled':  # a fitted scale needs a trained start
            raw['train'].update(
                pretrained=str(out['plain'][1] / 'checkpoint_best.pth'), epoch=4
            )
            raw['train']['scheduler_param']['total_iters'] = 4
        config = config_from_dict(raw, str(d))
        train(config, str(d / 'run'), screen=False)
        out[name] = (config, d / 'run')
    return out


def _lf_only_cells(shared, n=12):
    """PBE cells at x = 0.25, 0.5, 0.75: compositions no r2SCAN label has."""
    frames = read_frames(shared / 'ingan' / 'lf_train_pbe.extxyz')
    mid = [f for f in frames if 0.1 < f.atoms.info['x_In'] < 0.9]
    return mid[1::5][:n]


def test_coupling_shrinks_the_gap_where_only_lf_data_is(ingan_runs, shared_data):
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.gap import head_gaps

    frames = _lf_only_cells(shared_data)
    result = {}
    for name, (_, wd) in ingan_runs.items():
        cp = Checkpoint(wd / 'checkpoint_last.pth')
        graphs = build_graphs(frames, cp.cutoff, ANCHOR, 1.0)
        gaps = head_gaps(cp.build_model(), cp.config, graphs, reference=HF)
        e = np.asarray(gaps.energy[ANCHOR], dtype=float)
        # the energy term compares structures of one composition: the spread
        # around each composition's mean gap is what it shrinks
        formula = [f.atoms.get_chemical_formula() for f in frames]
        for g in set(formula):
            idx = [i for i, h in enumerate(formula) if h == g]
            e[idx] -= e[idx].mean()
        result[name] = (np.sqrt(np.mean(e**2)), gaps.force[ANCHOR].mean())
    (e_plain, f_plain), (e_cpl, f_cpl) = result['plain'], result['coupled']
    assert e_cpl < 0.7 * e_plain, result
    assert f_cpl < 0.7 * f_plain, result


@pytest.mark.parametrize('run', ['coupled', 'scaled'])
def test_coupled_model_folds_exports_and_deploys_exactly(ingan_runs, tmp_path, run):
    import sevenn.util as sevenn_util

    from sevenn_mf.analysis.delta import evaluate_deployed
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.deploy import deploy, export
    from sevenn_mf.model import fold

    _, wd = ingan_runs[run]
    cp = Checkpoint(wd / 'checkpoint_best.pth')
    model = cp.build_model()
    # sevenn's own loader reads the fitted scales back
    sv_model = sevenn_util.load_checkpoint(wd / 'checkpoint_best.pth').build_model()
    scale = sv_model.rescale_atomic_energy.scale.detach()
    if run == 'scaled':
        assert scale.shape[0] == 2 and (scale[1] != scale[0]).all()
        assert torch.allclose(scale, scale[:, :1].expand_as(scale))
    atoms = read(QUICKSTART_DATA / 'r2scan_test_x0.5.extxyz', 0)
    for fid in FIDS:
        e, f, _ = calc_results(model, atoms, fid)
        plain, _ = fold(model, cp.config, fid)
        e2, f2, _ = calc_results(plain, atoms, None)
        assert e2 == pytest.approx(e, abs=1e-4)
        np.testing.assert_allclose(f2, f, atol=1e-4)

        out = export(cp, fid, tmp_path / f'plain_{fid}.pth')
        sv = sevenn_util.load_checkpoint(out).build_model()
        e3, f3, _ = calc_results(sv, atoms, None)
        assert e3 == pytest.approx(e, abs=1e-4)
        np.testing.assert_allclose(f3, f, atol=1e-4)

        pt = deploy(cp, fid, output=str(tmp_path / f'{fid}.pt'))[0]
        e4, f4 = evaluate_deployed(pt, atoms)
        assert e4 == pytest.approx(e, abs=1e-3)
        np.testing.assert_allclose(f4, f, atol=1e-3)


def test_gap_monitor_equals_a_direct_computation(ingan_runs):
    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.data.dataset import prepare_data
    from sevenn_mf.metrics import FidelityMetrics

    config, wd = ingan_runs['coupled']
    rows = FidelityMetrics.read_csv(wd / 'metrics.csv')
    last = max(int(r['epoch']) for r in rows)
    rows = {r['set']: r for r in rows if int(r['epoch']) == last}
    data = prepare_data(config, str(wd.parent / 'again'), log=lambda s: None)
    calc = SevenNetMFCalculator(wd / 'checkpoint_last.pth', HF)
    union_e, union_f = [], []
    for name in (f'{ANCHOR}_validset', f'{HF}_validset'):
        e, f = [], []
        for g in data.valid_sets()[name]:
            info = g[KEY.INFO]
            atoms = read(info['file'], info['frame'])
            atoms.calc = calc
            atoms.get_potential_energy()
            gap = calc.results['fidelity_gap'][ANCHOR]
            e.append(gap['energy'])
            f.append(gap['force'])
        union_e += e
        union_f += f
        row = rows[name]
        assert float(row[f'gap_{ANCHOR}_energy_mean']) == pytest.approx(
            1000 * np.mean(e), abs=2e-3
        )
        assert float(row[f'gap_{ANCHOR}_energy_sd']) == pytest.approx(
            1000 * np.std(e), abs=2e-3
        )
        assert float(row[f'gap_{ANCHOR}_force_mean']) == pytest.approx(
            1000 * np.mean(f), abs=2e-2
        )
    row = rows['validset']
    assert float(row[f'gap_{ANCHOR}_energy_sd']) == pytest.approx(
        1000 * np.std(union_e), abs=2e-3
    )
    assert rows['trainset'][f'gap_{ANCHOR}_energy_mean'] == ''  # not monitored


def test_calculator_flags_structures_outside_the_training_gap_range(ingan_runs):
    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.checkpoint import Checkpoint

    _, wd = ingan_runs['coupled']
    cp = Checkpoint(wd / 'checkpoint_best.pth')
    rng = cp.gap_range
    assert rng['reference'] == HF and ANCHOR in rng['ranges']
    r = rng['ranges'][ANCHOR]
    assert r['energy_min'] <= r['energy_mean'] <= r['energy_max']
    calc = SevenNetMFCalculator(cp, HF)
    atoms = read(QUICKSTART_DATA / 'r2scan.extxyz', 0)
    atoms.calc = calc
    atoms.get_potential_energy()
    gap = calc.results['fidelity_gap'][ANCHOR]
    inside = r['energy_min'] <= gap['energy'] <= r['energy_max'] and (
        gap['force'] <= r['force_max']
    )
    assert gap['outside'] is (not inside)
    # squeeze the stored range: the same structure is now outside, with a warning
    calc.gap_range.ranges[ANCHOR].update(energy_min=gap['energy'] + 1.0)
    calc.n_outside = 0
    atoms.rattle(0.001, seed=1)
    with pytest.warns(UserWarning, match='outside the fidelity-gap range'):
        atoms.get_potential_energy()
    assert calc.results['fidelity_gap_outside'] is True and calc.n_outside == 1
    # the same at the anchor head (the range is stored as HF - anchor)
    low = SevenNetMFCalculator(cp, ANCHOR)
    atoms.calc = low
    low.gap_range.ranges[ANCHOR].update(energy_min=gap['energy'] + 1.0)
    with pytest.warns(UserWarning, match=f'{HF} - {ANCHOR} gap .*on \\d+ {HF}'):
        atoms.get_potential_energy()
    assert low.results['fidelity_gap'][HF]['outside'] is True
    assert low.results['fidelity_gap'][HF]['energy'] == pytest.approx(
        -calc.results['fidelity_gap'][ANCHOR]['energy'], abs=1e-6
    )
    plain = SevenNetMFCalculator(cp, HF, gap=False)
    atoms.calc = plain
    atoms.get_potential_energy()
    assert 'fidelity_gap' not in plain.results
