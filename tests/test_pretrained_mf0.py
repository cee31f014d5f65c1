"""SevenNet-MF-0 (shipped in the sevenn wheel) read as a sevenn_mf model gives
sevenn's own numbers, in onehot mode and converted to indexed mode."""

import numpy as np
import pytest
from sevenn.calculator import SevenNetCalculator

from sevenn_mf import Checkpoint, SevenNetMFCalculator
from sevenn_mf.model import convert_layer_mode, fidelity_layers


@pytest.fixture(scope='module')
def mf0():
    return Checkpoint('7net-mf-0')


@pytest.fixture(scope='module')
def mf0_indexed(mf0):
    model, config = convert_layer_mode(mf0.build_model(), mf0.config, 'indexed')
    assert all(m.mode == 'indexed' for m in fidelity_layers(model).values())
    return model


def _results(calc, atoms):
    a = atoms.copy()
    a.calc = calc
    return a.get_potential_energy() / len(a), a.get_forces(), a.get_stress()


def test_mf0_is_read_as_onehot(mf0):
    assert mf0.kind == 'native_multimodal'
    assert mf0.fidelities == ['R2SCAN', 'PBE']
    assert mf0.layer_mode == 'onehot'


@pytest.mark.parametrize('fidelity', ['R2SCAN', 'PBE'])
def test_mf0_equivalence(fidelity, mf0, mf0_indexed, ingan_frames):
    ref_calc = SevenNetCalculator('7net-mf-0', modal=fidelity, device='cpu')
    onehot = SevenNetMFCalculator(mf0, fidelity=fidelity)
    indexed = SevenNetCalculator(
        mf0_indexed, file_type='model_instance', modal=fidelity, device='cpu'
    )
    for atoms in ingan_frames[:3]:
        e0, f0, s0 = _results(ref_calc, atoms)
        assert np.abs(f0).max() > 0.01
        for calc in (onehot, indexed):
            e, f, s = _results(calc, atoms)
            assert abs(e - e0) < 1e-5
            assert np.abs(f - f0).max() < 1e-4
            assert np.abs(s - s0).max() < 1e-5  # eV/Å^3 (~2e-3 GPa)


def test_mf0_fidelities_differ(mf0, ingan_frames):
    a = ingan_frames[0]
    e_r2 = _results(SevenNetMFCalculator(mf0, fidelity='R2SCAN'), a)[0]
    e_pbe = _results(SevenNetMFCalculator(mf0, fidelity='PBE'), a)[0]
    assert abs(e_r2 - e_pbe) > 0.1  # different functionals, different zero


def test_single_fidelity_pretrained_needs_no_fidelity(ingan_frames):
    a = ingan_frames[0]
    e = _results(SevenNetMFCalculator('7net-0'), a)[0]
    e_ref = _results(SevenNetCalculator('7net-0', device='cpu'), a)[0]
    assert e == pytest.approx(e_ref, abs=1e-6)
