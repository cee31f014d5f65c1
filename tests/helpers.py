"""Small models and configs for tests (built through sevenn's builder)."""

import copy

import numpy as np
import sevenn._keys as KEY
import sevenn.util as sevenn_util
import torch
from sevenn._const import NUM_UNIV_ELEMENT as NUM_UNIV

import sevenn_mf  # noqa: F401  (installs the hooks)
from sevenn_mf.config import config_from_dict
from sevenn_mf.model import build_model, set_fidelities

FIDS = ['pbe', 'r2scan']


def small_config(
    mode='onehot',
    fidelities=FIDS,
    species=('Ga', 'In', 'N'),
    channel=8,
    lmax=2,
    layers=2,
    all_positions=False,
    positions='mf0',
):
    """``positions='mf0'``: SevenNet-MF-0's fidelity-dependent layers (self
    interaction intro / outro and output block: the numerical checks then see
    several fidelity layers); ``'output'``: the output block only; ``None``:
    sevenn_mf's default."""
    raw = {
        'model': {
            'chemical_species': list(species),
            'cutoff': 4.5,
            'channel': channel,
            'lmax': lmax,
            'num_convolution_layer': layers,
            'is_parity': False,
            'weight_nn_hidden_neurons': [16, 16],
            'fidelity_layer_mode': mode,
        },
        'train': {'epoch': 1},
        'data': {
            'databases': [
                {'name': f, 'fidelity': f, 'files': 'x'} for f in fidelities
            ]
        },
    }
    if positions == 'mf0':
        raw['model'].update(
            use_modal_self_inter_intro=True,
            use_modal_self_inter_outro=True,
            use_modal_output_block=True,
        )
    elif positions == 'output':
        raw['model'].update(
            use_modal_self_inter_intro=False,
            use_modal_self_inter_outro=False,
            use_modal_output_block=True,
        )
    if all_positions:
        raw['model'].update(
            {
                k: True
                for k in (
                    'use_modal_node_embedding',
                    'use_modal_self_inter_intro',
                    'use_modal_self_inter_outro',
                    'use_modal_output_block',
                )
            }
        )
    cfg = config_from_dict(raw)
    cfg.update(sevenn_util.chemical_species_preprocess(list(species)))
    set_fidelities(cfg, fidelities, mode)
    n = len(fidelities)
    cfg[KEY.SHIFT] = {
        f: [float(-i - 1)] * NUM_UNIV for i, f in enumerate(fidelities)
    }
    cfg[KEY.SCALE] = 1.3
    cfg[KEY.CONV_DENOMINATOR] = 12.0
    cfg[KEY.USE_MODAL_WISE_SHIFT] = True
    assert n == len(cfg[KEY.MODAL_MAP])
    return cfg


def perturbed_model(cfg, seed=0, scale=0.3):
    """A model whose fidelity-dependent parameters are not at their zero init."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'delta' in name or ('linear.weight' in name):
                p.add_(scale * torch.randn_like(p))
    return model


def calc_results(model, atoms, fidelity):
    """(energy, forces, 3x3 stress in ASE's convention) in the model's dtype.

    sevenn's calculator casts inputs to float32; float64 checks need this path.
    """
    from ase.stress import voigt_6_to_full_3x3_stress
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    dtype = next(model.parameters()).dtype
    m = copy.deepcopy(model)
    m.set_is_batch_data(False)
    m.eval()
    if dtype != torch.float32:  # sevenn's one-hot embedding is always float32

        def _cast(mod, inputs):
            inputs[0][KEY.NODE_FEATURE] = inputs[0][KEY.NODE_FEATURE].to(dtype)

        m._modules['onehot_to_feature_x'].register_forward_pre_hook(_cast)
    raw = unlabeled_atoms_to_graph(atoms, m.cutoff)
    data = AtomGraphData.from_numpy_dict(dict(raw))  # it converts the dict in place
    for k, v in raw.items():  # from the float64 numpy source, not the float32 copy
        if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            data[k] = torch.from_numpy(v).to(dtype)
    if fidelity is not None:
        data[KEY.DATA_MODALITY] = fidelity
    out = m(data)
    e = float(out[KEY.PRED_TOTAL_ENERGY].detach())
    f = out[KEY.PRED_FORCE].detach().double().numpy()
    s = (
        (-out[KEY.PRED_STRESS])
        .detach()
        .double()
        .numpy()
        .reshape(-1)[[0, 1, 2, 4, 5, 3]]
    )
    return e, f, voigt_6_to_full_3x3_stress(s)
