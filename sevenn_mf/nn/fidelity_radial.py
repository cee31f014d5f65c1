"""Fidelity-dependent radial networks.

The fidelity linear layers (:mod:`sevenn_mf.nn.fidelity_linear`) mix the
channels of shared features; every bond-length dependence of the model lies in
the convolutions' radial networks, which they leave shared. When the HF - LF
difference depends on bond lengths (InGaN: the r2SCAN - PBE gap rises with
the volume per atom, and bows with composition because the alloy stretches
Ga-N and compresses In-N bonds), a per-fidelity map of shared features has to
rebuild that dependence from features fitted to the LF labels.

With ``fidelity_radial: true`` the last layer of every convolution's radial
network (e3nn ``FullyConnectedNet``, no activation after it) gets per-fidelity
weights ``W_f = W + dW_f``, ``dW_f`` starting at zero, so each fidelity has
its own radial functions (linear combinations of the shared hidden radial
features) in every tensor-product path. It folds into the plain network's last
weight, exactly.

The radial network sees only the edge embedding; :class:`EdgeFidelity` (one
module, after sevenn's edge embedding) appends each edge's fidelity one-hot to
it under its own key, which the fidelity radial networks read instead.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from e3nn.nn import FullyConnectedNet

from .._sevenn import KEY

AtomGraphDataType = Dict[str, torch.Tensor]

# data key of the edge embedding with the edge's fidelity one-hot appended
EDGE_EMBEDDING_FIDELITY = 'edge_embedding_fidelity'


class EdgeFidelity(nn.Module):
    """``data[EDGE_EMBEDDING_FIDELITY] = [edge embedding | fidelity one-hot]``."""

    def __init__(self, num_fidelities: int) -> None:
        super().__init__()
        self.num_fidelities = int(num_fidelities)
        self._is_batch_data = True
        self.key_embedding = KEY.EDGE_EMBEDDING
        self.key_modal = KEY.MODAL_TYPE
        self.key_batch = KEY.BATCH
        self.key_edge_idx = KEY.EDGE_IDX
        self.key_output = EDGE_EMBEDDING_FIDELITY

    def forward(self, data: AtomGraphDataType) -> AtomGraphDataType:
        emb = data[self.key_embedding]
        modal = data[self.key_modal].reshape(-1)
        if self._is_batch_data:
            # both ends of an edge are in one graph: its source's graph decides
            fid = modal[data[self.key_batch][data[self.key_edge_idx][0]]]
        else:
            fid = modal[:1].expand(emb.shape[0])
        onehot = torch.nn.functional.one_hot(fid, self.num_fidelities)
        data[self.key_output] = torch.cat([emb, onehot.to(emb.dtype)], 1)
        return data


class FidelityRadialNet(FullyConnectedNet):
    """sevenn's radial network (same layers, same state-dict keys) plus
    ``delta_weight[f]`` on its last layer's weight. Input: the edge embedding
    followed by the edge's fidelity one-hot (:class:`EdgeFidelity`)."""

    def __init__(self, hs, act=None, num_fidelities: int = 1) -> None:
        super().__init__(hs, act)
        self.num_fidelities = int(num_fidelities)
        self.delta_weight = nn.Parameter(
            torch.zeros(self.num_fidelities, self.hs[-2], self.hs[-1])
        )
        last = self._last()
        if last.act is not None:  # e3nn's default: no activation on the output
            raise ValueError('fidelity radial networks need a linear last layer')
        # the last layer's own weight normalisation, applied to the deltas too
        self.delta_norm = float((last.h_in * last.var_in / last.var_out) ** 0.5)

    def _last(self):
        return getattr(self, f'layer{len(self.hs) - 2}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in = self.hs[0]
        n_layers = len(self.hs) - 1
        h = x[:, :n_in]
        onehot = x[:, n_in:]
        hidden = h
        i = 0
        for layer in self:  # (unrolled by TorchScript)
            if i == n_layers - 1:
                hidden = h  # the last layer's input
            h = layer(h)
            i += 1
        # sum_f onehot_ef * hidden_e @ dW_f, as one product over (fidelity, hidden)
        hf = (onehot.unsqueeze(2) * hidden.unsqueeze(1)).reshape(hidden.shape[0], -1)
        dw = self.delta_weight.reshape(-1, self.hs[-1]) / self.delta_norm
        return h + hf @ dw

    def last_weight_name(self) -> str:
        return f'layer{len(self.hs) - 2}.weight'

    @torch.no_grad()
    def folded_last_weight(self, fidelity: int) -> torch.Tensor:
        """The last layer's weight of the plain network equal to this one at
        ``fidelity``."""
        if not 0 <= fidelity < self.num_fidelities:
            raise IndexError(f'fidelity index {fidelity} out of range')
        return self._last().weight + self.delta_weight[fidelity]

    def fidelity_parameters(self):
        return ['delta_weight']
