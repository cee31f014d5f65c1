import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings('ignore', message='.*TP accelerator.*')
warnings.filterwarnings('ignore', message='.*Weights only load failed.*')

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / 'input_templates' / 'quickstart_data'


def shared_dir() -> Path:
    return Path(os.environ.get('SEVENN_MF_SHARED', REPO.parent / 'shared'))


@pytest.fixture(scope='session')
def shared_data():
    d = shared_dir() / 'data'
    if not d.is_dir():
        pytest.skip(
            f'shared datasets not found at {d}: set SEVENN_MF_SHARED to the '
            'folder holding data/ingan and data/ethanol'
        )
    return d


@pytest.fixture(scope='session')
def ingan_frames():
    """Real periodic InGaN cells (GPAW) bundled with the repo."""
    from ase.io import read

    return read(QUICKSTART_DATA / 'pbe.extxyz', index=':')


@pytest.fixture
def float64():
    """float64 as torch's default dtype for one test (numerical identities)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
