"""SevenNet-0-sized models for the benchmarks: the plain sevenn architecture and
the same architecture with fidelity layers (random weights; cost only)."""

import copy

import sevenn._keys as KEY

FIDELITIES = ['pbe', 'r2scan']
POSITIONS = (
    KEY.USE_MODAL_SELF_INTER_INTRO,
    KEY.USE_MODAL_SELF_INTER_OUTRO,
    KEY.USE_MODAL_OUTPUT_BLOCK,
)


def sevennet0_config():
    from sevenn_mf.checkpoint import Checkpoint

    return Checkpoint('7net-0').config


def multi_fidelity_config(base, mode, fidelities=FIDELITIES):
    """``base`` (a plain sevenn config) with fidelity layers at MF-0's positions."""
    from sevenn_mf.model import set_fidelities

    cfg = copy.deepcopy(base)
    set_fidelities(cfg, fidelities, mode)
    for k in POSITIONS:
        cfg[k] = True
    cfg[KEY.USE_MODAL_WISE_SHIFT] = True
    cfg[KEY.SHIFT] = {f: base[KEY.SHIFT] for f in fidelities}
    return cfg
