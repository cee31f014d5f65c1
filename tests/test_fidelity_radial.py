"""Fidelity-dependent radial networks (``fidelity_radial: true``): they start
as the shared network, fold away (sevenn's own loader and LAMMPS:
tests/test_lammps.py), survive conversion and fine-tuning set-up, and take
part in the parameter coupling and ``freeze_shared`` like the fidelity
layers. Fold identity, equivariance, batch independence and TorchScript with
them: tests/test_model.py."""

import numpy as np
import pytest
import torch
from helpers import FIDS, calc_results, perturbed_model, small_config

from sevenn_mf._sevenn import FIDELITY_RADIAL
from sevenn_mf.checkpoint import Checkpoint, save_checkpoint
from sevenn_mf.convert import ConvertError, convert
from sevenn_mf.coupling import CouplingLoss, settings_from
from sevenn_mf.model import (
    build_model,
    fidelity_parameter_names,
    fidelity_radial_nets,
    fold,
)
from sevenn_mf.nn.fidelity_radial import FidelityRadialNet
from sevenn_mf.train import freeze_shared

MODES = ['onehot', 'indexed']


def radial_config(mode='indexed', **kw):
    cfg = small_config(mode, **kw)
    cfg[FIDELITY_RADIAL] = True
    return cfg


def _radial_only_differs(cfg, seed=0):
    """A model whose fidelities differ only through the radial networks."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for net in fidelity_radial_nets(model).values():
            net.delta_weight[1] += 0.3 * torch.randn_like(net.delta_weight[1])
    return model


def test_every_convolution_gets_a_fidelity_radial_network():
    model = build_model(radial_config())
    nets = fidelity_radial_nets(model)
    assert sorted(nets) == ['0_convolution.weight_nn', '1_convolution.weight_nn']
    assert all(isinstance(n, FidelityRadialNet) for n in nets.values())
    assert all(not n.delta_weight.detach().any() for n in nets.values())
    names = list(model._modules)
    assert names.index('edge_fidelity') == names.index('edge_embedding') + 1
    # without the key: sevenn's own radial networks, no extra module
    plain_cfg = small_config('indexed')
    assert not fidelity_radial_nets(build_model(plain_cfg))
    assert 'edge_fidelity' not in build_model(plain_cfg)._modules


@pytest.mark.parametrize('mode', MODES)
def test_zero_deltas_compute_the_model_without_them(mode, ingan_frames, float64):
    cfg = radial_config(mode)
    model = perturbed_model(cfg).double()
    with torch.no_grad():
        for net in fidelity_radial_nets(model).values():
            net.delta_weight.zero_()
    base = build_model(small_config(mode)).double()
    state = {
        k: v for k, v in model.state_dict().items() if 'weight_nn.delta' not in k
    }
    base.load_state_dict(state, strict=True)
    for fid in FIDS:
        e0, f0, _ = calc_results(model, ingan_frames[1], fid)
        e1, f1, _ = calc_results(base, ingan_frames[1], fid)
        assert abs(e0 - e1) < 1e-10
        np.testing.assert_allclose(f0, f1, atol=1e-10)


@pytest.mark.parametrize('mode', MODES)
def test_radial_deltas_alone_make_the_heads_differ_and_fold_away(mode, ingan_frames):
    """(Fold identity, equivariance, batch independence and TorchScript with
    radial networks: tests/test_model.py, parametrized over them.)"""
    cfg = radial_config(mode)
    only = _radial_only_differs(cfg)
    e_pbe, f_pbe, _ = calc_results(only, ingan_frames[0], 'pbe')
    e_hf, f_hf, _ = calc_results(only, ingan_frames[0], 'r2scan')
    assert np.abs(f_pbe - f_hf).max() > 1e-4
    for fid, e in (('pbe', e_pbe), ('r2scan', e_hf)):
        plain, pcfg = fold(only, cfg, fid)
        assert FIDELITY_RADIAL not in pcfg
        assert not fidelity_radial_nets(plain)
        assert 'edge_fidelity' not in plain._modules
        assert calc_results(plain, ingan_frames[0], None)[0] == pytest.approx(
            e, abs=1e-5
        )


def test_parameter_coupling_and_freezing_include_the_radial_deltas():
    cfg = radial_config('indexed')
    model = _radial_only_differs(cfg, seed=4)
    names = set(fidelity_parameter_names(model))
    radial = {f'{k}.delta_weight' for k in fidelity_radial_nets(model)}
    assert radial <= names

    settings = settings_from({'anchor': 'pbe', 'parameter': 1.0}, FIDS, {'pbe': 5})
    crit = lambda x, y: (x - y) ** 2  # noqa: E731
    loss = CouplingLoss(settings, cfg, crit)
    penalty = loss.parameter_penalty(model)
    assert penalty.item() > 0  # only the radial rows differ here
    model.zero_grad()
    penalty.backward()
    for n, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        if n in radial:
            assert g[1].abs().max() > 0, n  # the coupled head's rows
            assert g[0].abs().max() == 0, n  # the anchor is the target
        else:
            assert g.abs().max() == 0, n
    with torch.no_grad():
        for net in fidelity_radial_nets(model).values():
            net.delta_weight[1] = net.delta_weight[0]
    assert loss.parameter_penalty(model).item() == 0.0

    frozen = set(freeze_shared(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert radial <= trainable
    assert any('weight_nn.layer' in n for n in frozen)  # the shared radial layers


def test_conversion_adds_and_remaps_radial_networks(tmp_path, ingan_frames):
    # a multi-fidelity source without them: added, nothing computed changes
    cfg = small_config('indexed')
    src = perturbed_model(cfg, seed=2)
    save_checkpoint(tmp_path / 'src.pth', src, cfg)
    model, mcfg = convert(Checkpoint(tmp_path / 'src.pth'), radial=True)
    assert mcfg[FIDELITY_RADIAL] and len(fidelity_radial_nets(model)) == 2
    for fid in FIDS:
        assert calc_results(model, ingan_frames[0], fid)[0] == pytest.approx(
            calc_results(src, ingan_frames[0], fid)[0], abs=1e-5
        )
    with pytest.raises(ConvertError, match='cannot be removed'):
        save_checkpoint(tmp_path / 'r.pth', model, mcfg)
        convert(Checkpoint(tmp_path / 'r.pth'), radial=False)

    # a radial model: a new fidelity copies r2scan's radial rows too
    rcfg = radial_config('indexed')
    rmodel = perturbed_model(rcfg, seed=3)
    save_checkpoint(tmp_path / 'rad.pth', rmodel, rcfg)
    added, acfg = convert(Checkpoint(tmp_path / 'rad.pth'), add={'hse': 'r2scan'})
    assert acfg[FIDELITY_RADIAL]
    atoms = ingan_frames[2]
    e_r2 = calc_results(rmodel, atoms, 'r2scan')
    e_hse = calc_results(added, atoms, 'hse')
    assert e_hse[0] == pytest.approx(e_r2[0], abs=1e-5)
    np.testing.assert_allclose(e_hse[1], e_r2[1], atol=1e-5)


def test_single_fidelity_source_converted_with_radial_networks(
    tmp_path, ingan_frames
):
    cfg = small_config('indexed')
    mf = perturbed_model(cfg, seed=5)
    plain, pcfg = fold(mf, cfg, 'pbe')
    save_checkpoint(tmp_path / 'plain.pth', plain, pcfg)
    positions = {
        'use_modal_self_inter_intro': True,
        'use_modal_self_inter_outro': False,
        'use_modal_output_block': True,
        FIDELITY_RADIAL: True,
    }
    model, mcfg = convert(
        Checkpoint(tmp_path / 'plain.pth'),
        source_fidelity='pbe',
        add={'r2scan': 'pbe'},
        mode='indexed',
        positions=positions,
    )
    assert len(fidelity_radial_nets(model)) == 2
    e_ref = calc_results(plain, ingan_frames[0], None)[0]
    for fid in FIDS:
        assert calc_results(model, ingan_frames[0], fid)[0] == pytest.approx(
            e_ref, abs=1e-5
        )


def test_native_multimodal_config_refuses_radial_networks():
    cfg = small_config('indexed')
    cfg[FIDELITY_RADIAL] = True
    cfg['fidelity_layer_mode'] = None
    with pytest.raises(ValueError, match='fidelity_radial: true needs'):
        build_model(cfg)
