"""sevenn_mf: multi-fidelity training for SevenNet.

Importing the package installs its hooks into sevenn's model builder (after a
version check); plain sevenn models are unaffected.
"""

from . import _sevenn
from .nn.fidelity_linear import FidelityLinear
from .nn.fidelity_radial import (
    EDGE_EMBEDDING_FIDELITY,
    EdgeFidelity,
    FidelityRadialNet,
)

_sevenn.install_hooks(
    FidelityLinear.from_irreps_linear,
    (FidelityRadialNet, EdgeFidelity, EDGE_EMBEDDING_FIDELITY),
)

from .calculator import SevenNetMFCalculator  # noqa: E402
from .checkpoint import Checkpoint, list_fidelities, load_checkpoint  # noqa: E402
from .model import build_model, fold  # noqa: E402

__version__ = '0.1.0'
__all__ = [
    'SevenNetMFCalculator',
    'Checkpoint',
    'load_checkpoint',
    'list_fidelities',
    'build_model',
    'fold',
    'FidelityLinear',
]
