"""On a CUDA GPU: the coupling penalties, coupled training with the per-epoch
gap monitor, and evaluation run where the model is, and give what the CPU
gives. (Our own code builds index tensors and batches; sevenn's Trainer moves
only the batch, so every tensor we make must follow it.)"""

import copy

import numpy as np
import pytest
import torch
from helpers import small_config
from test_coupling import (
    ANCHOR,
    HF,
    _batch_with_copies,
    _forward_train,
    _huber,
    _ingan_raw,
    _perturb_hf_head,
    _settings,
    lf_graphs,  # noqa: F401 (fixture)
)

from sevenn_mf.coupling import CouplingLoss
from sevenn_mf.model import build_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason='needs a CUDA GPU (torch.cuda.is_available() is False): run '
    '`python -m pytest tests/test_gpu.py` on a machine with one',
)


@pytest.mark.parametrize('mode', ['onehot', 'indexed'])
def test_coupling_penalty_on_gpu_equals_cpu(mode, lf_graphs):  # noqa: F811
    torch.manual_seed(0)
    cfg = small_config(mode)
    model = build_model(cfg)
    _perturb_hf_head(model)
    loss = CouplingLoss(_settings(energy=1, force=1, parameter=1), cfg, _huber)
    batch = _batch_with_copies(lf_graphs)
    cpu_out = _forward_train(model, batch.clone())
    cpu = {k: v.item() for k, v in loss.function_penalty(cpu_out, model).items()}
    gmodel = copy.deepcopy(model).cuda()
    gpu_out = _forward_train(gmodel, batch.clone().to('cuda'))
    gpu = {k: v.item() for k, v in loss.function_penalty(gpu_out, gmodel).items()}
    assert set(cpu) == set(gpu) == {'energy', 'force'}
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-3, abs=1e-9), k
    assert loss.parameter_penalty(gmodel).item() == pytest.approx(
        loss.parameter_penalty(model).item(), rel=1e-5
    )
    gmodel.zero_grad()
    loss.get_loss(gpu_out, gmodel)
    grads = [p.grad for p in gmodel.parameters() if p.grad is not None]
    assert grads and all(g.is_cuda for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_coupled_training_on_gpu_monitors_the_gap_as_the_cpu_computes_it(
    tmp_path, shared_data
):
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.config import config_from_dict
    from sevenn_mf.data.dataset import prepare_data
    from sevenn_mf.evaluate import predict
    from sevenn_mf.gap import head_gaps
    from sevenn_mf.metrics import FidelityMetrics
    from sevenn_mf.train import train

    coupling = {'anchor': ANCHOR, 'energy': 1.0, 'force': 1.0, 'parameter': 0.1}
    raw = _ingan_raw(tmp_path, shared_data, coupling)
    raw['train'].update(epoch=2, device='cuda')
    raw['train']['scheduler_param']['total_iters'] = 2
    config = config_from_dict(raw, str(tmp_path))
    wd = tmp_path / 'run'
    train(config, str(wd), screen=False)

    rows = FidelityMetrics.read_csv(wd / 'metrics.csv')
    last = max(int(r['epoch']) for r in rows)
    row = next(
        r
        for r in rows
        if int(r['epoch']) == last and r['set'] == f'{ANCHOR}_validset'
    )
    cp = Checkpoint(wd / 'checkpoint_last.pth')
    data = prepare_data(config, str(tmp_path / 'again'), log=lambda s: None)
    graphs = list(data.valid_sets()[f'{ANCHOR}_validset'])
    cpu_model = cp.build_model()
    gaps = head_gaps(cpu_model, cp.config, graphs, reference=HF)
    e = 1000 * np.asarray(gaps.energy[ANCHOR])
    assert float(row[f'gap_{ANCHOR}_energy_mean']) == pytest.approx(
        e.mean(), abs=2e-3
    )
    assert float(row[f'gap_{ANCHOR}_energy_sd']) == pytest.approx(e.std(), abs=2e-3)
    assert float(row[f'gap_{ANCHOR}_force_mean']) == pytest.approx(
        1000 * gaps.force[ANCHOR].mean(), abs=2e-2
    )

    # evaluation of the same model on the GPU and on the CPU
    on_cpu = predict(cp, graphs, HF, model=cpu_model)
    on_gpu = predict(cp, graphs, HF, model=cp.build_model().cuda())
    assert np.allclose(on_gpu.e_pred, on_cpu.e_pred, atol=1e-5)
