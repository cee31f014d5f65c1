"""The weight average (``train.ema_decay``, sevenn_mf.ema): it equals a direct
computation, the checkpoints hold it (with the raw weights for resuming), a
resumed run equals one run, and bad values are refused before training."""

import pytest
import torch
from test_resume import _config, _raw, _rows

from sevenn_mf.ema import EMAError, WeightAverage
from sevenn_mf.train import train


def test_average_equals_a_direct_computation_and_swaps_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].bias.requires_grad_(False)  # frozen: not averaged
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=0.05
    )
    ema = WeightAverage(model, opt, 0.9)
    assert ema.names == ['0.weight', '1.weight', '1.bias']
    expect = [p.detach().clone() for p in ema.params]
    for n in range(12):
        x = torch.randn(8, 3)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        d = min(0.9, (1.0 + n) / (10.0 + n))
        expect = [d * e + (1 - d) * p.detach() for e, p in zip(expect, ema.params)]
    for e, s in zip(expect, ema.shadow):
        torch.testing.assert_close(s, e)
    raw = [p.detach().clone() for p in ema.params]
    assert any((r - s).abs().max() > 1e-4 for r, s in zip(raw, ema.shadow))

    ema.load_average()
    for p, s in zip(ema.params, ema.shadow):
        assert torch.equal(p, s)
    with pytest.raises(RuntimeError, match='averaged weights are loaded'):
        opt.step()
    state = ema.state_dict()
    ema.load_raw()
    for p, r in zip(ema.params, raw):
        assert torch.equal(p, r)
    assert all(torch.equal(state['raw'][n], r) for n, r in zip(ema.names, raw))


def test_checkpoints_hold_the_average_and_resume_exactly(tmp_path):
    raw4 = _raw(tmp_path, 4, ema_decay=0.9)
    train(_config(tmp_path, raw4), str(tmp_path / 'one'), screen=False)
    train(
        _config(tmp_path, _raw(tmp_path, 2, ema_decay=0.9)),
        str(tmp_path / 'two'),
        screen=False,
    )
    cp = torch.load(tmp_path / 'two' / 'checkpoint_last.pth', weights_only=False)
    ema = cp['sevenn_mf']['ema']
    assert ema['updates'] > 0 and ema['decay'] == 0.9
    model = cp['model_state_dict']
    for name, shadow in ema['shadow'].items():
        assert torch.equal(model[name], shadow), name  # what sevenn loads
    assert any(
        (ema['raw'][n] - s).abs().max() > 1e-6 for n, s in ema['shadow'].items()
    )
    assert (
        'weight average (ema_decay 0.9)'
        in (tmp_path / 'two' / 'log.sevenn_mf').read_text()
    )

    train(_config(tmp_path, raw4), str(tmp_path / 'two'), resume=True, screen=False)
    a, b = _rows(tmp_path / 'one'), _rows(tmp_path / 'two')
    assert [(r['epoch'], r['set']) for r in a] == [(r['epoch'], r['set']) for r in b]
    for x, y in zip(a, b):
        for k in ('energy_mae', 'force_mae'):
            assert float(y[k]) == pytest.approx(float(x[k]), rel=1e-5), (x, k)

    # without the average the same run validates other weights
    train(
        _config(tmp_path, _raw(tmp_path, 4)), str(tmp_path / 'plain'), screen=False
    )
    c = _rows(tmp_path / 'plain')
    assert any(
        abs(float(x['energy_mae']) - float(y['energy_mae'])) > 1e-4
        for x, y in zip(a, c)
    )


def test_bad_decay_is_refused_before_training(tmp_path):
    for bad in (1.0, -0.1, 'fast', True):
        raw = _raw(tmp_path, 2, ema_decay=bad)
        with pytest.raises((EMAError, ValueError), match='ema_decay'):
            train(_config(tmp_path, raw), str(tmp_path / 'x'), screen=False)
        assert not (tmp_path / 'x' / 'checkpoint_last.pth').exists()
