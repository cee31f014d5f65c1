"""The command line, each subcommand against the library it wraps."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from ase.io import read
from conftest import QUICKSTART_DATA
from helpers import FIDS, perturbed_model, small_config

from sevenn_mf import SevenNetMFCalculator
from sevenn_mf.checkpoint import save_checkpoint
from sevenn_mf.cli import main


@pytest.fixture(scope='module')
def onehot_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp('cli') / 'mf.pth'
    save_checkpoint(
        path, perturbed_model(small_config('onehot'), seed=2), small_config('onehot')
    )
    return path


def test_info_and_fidelities(capsys, onehot_ckpt):
    assert main(['info', '7net-mf-0']) == 0
    out = capsys.readouterr().out
    assert 'R2SCAN, PBE' in out and 'onehot' in out and '846,168' in out
    assert main(['fidelities', str(onehot_ckpt)]) == 0
    assert capsys.readouterr().out.split() == FIDS
    assert main(['fidelities', '7net-0']) == 0
    assert 'single-fidelity' in capsys.readouterr().out


def test_errors_are_reported_not_raised(capsys, onehot_ckpt, tmp_path):
    assert (
        main(
            [
                'deploy',
                str(onehot_ckpt),
                '--fidelity',
                'HSE',
                '-o',
                str(tmp_path / 'x.pt'),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown fidelity 'HSE'" in err and 'pbe, r2scan' in err
    assert main(['info', 'no-such-model']) == 2
    assert 'pretrained' in capsys.readouterr().err


def test_evaluate_writes_csv_and_parity_plot(onehot_ckpt, tmp_path, capsys):
    test_file = QUICKSTART_DATA / 'r2scan_test_x0.5.extxyz'
    out = tmp_path / 'eval'
    assert (
        main(
            [
                'evaluate',
                str(onehot_ckpt),
                str(test_file),
                '--fidelity',
                'r2scan',
                '-o',
                str(out),
            ]
        )
        == 0
    )
    assert (out / 'parity.png').stat().st_size > 10_000
    with open(out / 'per_structure.csv') as f:
        rows = list(csv.DictReader(f))
    frames = read(test_file, ':')
    assert len(rows) == len(frames)
    # per-structure numbers are the calculator's
    calc = SevenNetMFCalculator(onehot_ckpt, fidelity='r2scan')
    a = frames[2].copy()
    a.calc = calc
    e = a.get_potential_energy() / len(a)
    assert float(rows[2]['energy_pred_eV_atom']) == pytest.approx(e, abs=1e-5)
    with open(out / 'summary.csv') as f:
        summary = {r['metric']: float(r['value']) for r in csv.DictReader(f)}
    mae = np.mean([abs(float(r['energy_err_meV_atom'])) for r in rows])
    assert summary['energy MAE (meV/atom)'] == pytest.approx(mae, rel=1e-3)
    assert np.isnan(summary['stress MAE (GPa)'])  # r2SCAN data has no stress


def test_export_native_loads_in_plain_sevenn(onehot_ckpt, tmp_path, ingan_frames):
    """--native writes sevenn's own multi-modal format: sevenn alone (sevenn_mf
    never imported) gives our numbers for every fidelity."""
    out = tmp_path / 'native.pth'
    assert main(['export', str(onehot_ckpt), '--native', '-o', str(out)]) == 0
    struct = tmp_path / 's.extxyz'
    ingan_frames[4].write(struct)
    code = f"""
import json, sys, warnings
warnings.filterwarnings('ignore')
from ase.io import read
from sevenn.calculator import SevenNetCalculator
a = read('{struct}')
res = {{}}
for fid in {FIDS!r}:
    a.calc = SevenNetCalculator('{out}', modal=fid, device='cpu')
    res[fid] = [a.get_potential_energy(), a.get_forces().tolist()]
assert 'sevenn_mf' not in sys.modules
print(json.dumps(res))
"""
    res = json.loads(
        subprocess.run(
            [sys.executable, '-c', code], check=True, capture_output=True, text=True
        ).stdout
    )
    for fid in FIDS:
        a = ingan_frames[4].copy()
        a.calc = SevenNetMFCalculator(onehot_ckpt, fidelity=fid)
        assert res[fid][0] == pytest.approx(a.get_potential_energy(), abs=1e-5)
        assert np.abs(np.array(res[fid][1]) - a.get_forces()).max() < 1e-5


def test_sevenn_inference_on_exported_plain(onehot_ckpt, tmp_path, ingan_frames):
    """sevenn's own `sevenn inference` on the exported plain checkpoint."""
    plain = tmp_path / 'plain.pth'
    assert (
        main(['export', str(onehot_ckpt), '--fidelity', 'pbe', '-o', str(plain)])
        == 0
    )
    struct = tmp_path / 's.extxyz'
    from ase.io import write

    write(struct, ingan_frames[:2])
    subprocess.run(
        [
            'sevenn',
            'inference',
            str(plain),
            str(struct),
            '-o',
            str(tmp_path / 'inf'),
            '--device',
            'cpu',
        ],
        check=True,
        capture_output=True,
    )
    with open(tmp_path / 'inf' / 'per_graph.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for a, row in zip(ingan_frames[:2], rows):
        a = a.copy()
        a.calc = SevenNetMFCalculator(onehot_ckpt, fidelity='pbe')
        assert float(row['inferred_total_energy']) == pytest.approx(
            a.get_potential_energy(), abs=1e-4
        )
