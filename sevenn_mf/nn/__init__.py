from .fidelity_linear import FidelityLinear, transfer_weights

__all__ = ['FidelityLinear', 'transfer_weights']
