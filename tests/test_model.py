"""Model side: equivariance, fold identity, fidelity dependence, TorchScript."""

import copy

import numpy as np
import pytest
import sevenn._keys as KEY
import torch
from helpers import FIDS, calc_results, perturbed_model, small_config
from scipy.spatial.transform import Rotation
from sevenn.atom_graph_data import AtomGraphData
from sevenn.train.dataload import atoms_to_graph
from torch_geometric.loader import DataLoader

from sevenn_mf.model import FidelityError, fidelity_layers, fold
from sevenn_mf.nn.fidelity_linear import FidelityLinear

MODES = ['onehot', 'indexed']
# the fidelity layers alone, and with fidelity radial networks as well
RADIAL = [False, True]


def _config(mode, radial):
    cfg = small_config(mode)
    cfg['fidelity_radial'] = radial
    return cfg


@pytest.mark.parametrize('mode', MODES)
def test_layers_replaced_at_configured_positions(mode):
    cfg = small_config(mode)
    model = perturbed_model(cfg)
    names = sorted(fidelity_layers(model))
    assert names == [
        '0_self_interaction_1',
        '0_self_interaction_2',
        '1_self_interaction_1',
        '1_self_interaction_2',
        'reduce_input_to_hidden',
    ]
    assert all(m.mode == mode for m in fidelity_layers(model).values())
    cfg_all = small_config(mode, all_positions=True)
    assert 'onehot_to_feature_x' in fidelity_layers(perturbed_model(cfg_all))
    # the default when a YAML names no position: SevenNet-MF-0's
    default = small_config(mode, positions=None)
    mf0 = fidelity_layers(perturbed_model(small_config(mode)))
    assert sorted(fidelity_layers(perturbed_model(default))) == sorted(mf0)
    assert {name.split('_', 1)[-1] for name in mf0} == {
        'input_to_hidden',
        'self_interaction_1',
        'self_interaction_2',
    }


@pytest.mark.parametrize('radial', RADIAL)
@pytest.mark.parametrize('mode', MODES)
def test_equivariance_periodic(mode, radial, ingan_frames, float64):
    cfg = _config(mode, radial)
    model = perturbed_model(cfg).double()
    atoms = ingan_frames[3]
    rot = Rotation.random(random_state=7).as_matrix()
    moved = atoms.copy()
    moved.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    moved.set_positions(atoms.positions @ rot.T + np.array([0.3, -1.1, 2.4]))
    for fid in FIDS:
        e0, f0, s0 = calc_results(model, atoms, fid)
        e1, f1, s1 = calc_results(model, moved, fid)
        assert abs(e1 - e0) <= 1e-6 * abs(e0)
        np.testing.assert_allclose(f1, f0 @ rot.T, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(s1, rot @ s0 @ rot.T, rtol=1e-6, atol=1e-10)
        assert np.abs(f0).max() > 1e-3  # not trivially zero


@pytest.mark.parametrize('radial', RADIAL)
@pytest.mark.parametrize('mode', MODES)
def test_fold_identity(mode, radial, ingan_frames, float64):
    cfg = _config(mode, radial)
    model = perturbed_model(cfg).double()
    for fid in FIDS:
        plain, pcfg = fold(model, cfg, fid)
        assert not fidelity_layers(plain)
        assert not pcfg[KEY.USE_MODALITY]
        for atoms in ingan_frames[:3]:
            e0, f0, s0 = calc_results(model, atoms, fid)
            e1, f1, s1 = calc_results(plain, atoms, None)
            assert abs(e1 - e0) < 1e-9 * len(atoms)
            np.testing.assert_allclose(f1, f0, atol=1e-9)
            np.testing.assert_allclose(s1, s0, atol=1e-10)


@pytest.mark.parametrize('radial', RADIAL)
@pytest.mark.parametrize('mode', MODES)
def test_fidelities_differ_and_batch_independent(mode, radial, ingan_frames):
    cfg = _config(mode, radial)
    model = perturbed_model(cfg)
    atoms = ingan_frames[0]
    e_pbe = calc_results(model, atoms, 'pbe')
    e_r2 = calc_results(model, atoms, 'r2scan')
    assert abs(e_pbe[0] - e_r2[0]) > 1e-3
    assert np.abs(e_pbe[1] - e_r2[1]).max() > 1e-4  # forces depend on fidelity

    # alone vs inside a mixed-fidelity batch
    graphs = []
    for i, a in enumerate(ingan_frames[:5]):
        a = a.copy()
        a.info['y_energy'] = 0.0
        a.arrays['y_force'] = np.zeros((len(a), 3))
        g = AtomGraphData.from_numpy_dict(atoms_to_graph(a, cfg[KEY.CUTOFF]))
        g[KEY.DATA_MODALITY] = FIDS[i % 2]
        graphs.append(g)
    m = copy.deepcopy(model)
    m.set_is_batch_data(True)
    m.eval()
    batch = next(iter(DataLoader(graphs, batch_size=5)))
    e_batch = m(batch)[KEY.PRED_TOTAL_ENERGY].detach()
    for i, a in enumerate(ingan_frames[:5]):
        e_alone = calc_results(model, a, FIDS[i % 2])[0]
        assert e_batch[i].item() == pytest.approx(e_alone, abs=2e-5 * len(a))


@pytest.mark.parametrize('radial', RADIAL)
@pytest.mark.parametrize('mode', MODES)
def test_torchscript(mode, radial, ingan_frames):
    from e3nn.util.jit import script
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    cfg = _config(mode, radial)
    model = perturbed_model(cfg)
    model.delete_module_by_key('force_output')
    model.prepare_modal_deploy('r2scan')
    model.eval_type_map = False
    model.eval()
    scripted = script(copy.deepcopy(model))

    atoms = ingan_frames[1]
    raw = unlabeled_atoms_to_graph(atoms, cfg[KEY.CUTOFF])
    type_map = cfg[KEY.TYPE_MAP]

    def inputs():
        return {
            KEY.NODE_FEATURE: torch.tensor(
                [type_map[z] for z in raw[KEY.ATOMIC_NUMBERS]]
            ),
            KEY.EDGE_IDX: torch.tensor(raw[KEY.EDGE_IDX]),
            KEY.EDGE_VEC: torch.tensor(
                raw[KEY.EDGE_VEC], dtype=torch.float32, requires_grad=True
            ),
            KEY.NUM_ATOMS: torch.tensor([len(atoms)]),
        }

    outs = []
    for m in (model, scripted):
        d = inputs()
        out = m(d)
        e = out[KEY.PRED_TOTAL_ENERGY]
        (g,) = torch.autograd.grad(e, d[KEY.EDGE_VEC])
        outs.append((e.detach(), g))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
    assert outs[0][1].abs().max() > 0


def test_unknown_and_missing_fidelity(ingan_frames):
    cfg = small_config('indexed')
    model = perturbed_model(cfg)
    with pytest.raises(FidelityError, match='valid: pbe, r2scan'):
        fold(model, cfg, 'hse')
    with pytest.raises(FidelityError, match='choose one'):
        fold(model, cfg, None)


def test_calculator_errors(tmp_path, ingan_frames):
    from ase import Atoms

    from sevenn_mf import SevenNetMFCalculator, list_fidelities
    from sevenn_mf.checkpoint import save_checkpoint

    cfg = small_config('onehot')
    path = tmp_path / 'mf.pth'
    save_checkpoint(path, perturbed_model(cfg), cfg)
    assert list_fidelities(path) == FIDS
    with pytest.raises(FidelityError, match='valid: pbe, r2scan'):
        SevenNetMFCalculator(path)
    with pytest.raises(FidelityError, match="unknown fidelity 'PBE'"):
        SevenNetMFCalculator(path, fidelity='PBE')
    calc = SevenNetMFCalculator(path, fidelity='pbe')
    bad = Atoms('GaXe', positions=[[0, 0, 0], [2.0, 0, 0]], cell=[5, 5, 5], pbc=True)
    with pytest.raises(
        ValueError, match=r'Xe not in the model \(species: Ga, In, N\)'
    ):
        bad.calc = calc
        bad.get_potential_energy()
    a = ingan_frames[0].copy()
    a.calc = calc
    assert np.isfinite(a.get_potential_energy())


def test_fidelity_linear_rejects_bad_mode():
    from e3nn.o3 import Irreps

    with pytest.raises(ValueError, match='onehot'):
        FidelityLinear(Irreps('4x0e'), Irreps('4x0e'), 2, mode='film')
