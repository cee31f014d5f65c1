"""Fidelity-indexed equivariant linear layer.

Two formulations of "a linear layer that depends on the fidelity":

``onehot``  (Kim et al., JACS 2025; SevenNet's native multi-modal layer)
    The fidelity one-hot is appended to the input as ``F x 0e`` scalars, so
    only the scalar outputs get a learned fidelity-dependent term. The weights
    are laid out exactly like sevenn's ``IrrepsLinear`` with modalities, which
    makes native checkpoints load without conversion.

``indexed``
    Every path has per-fidelity weights ``W_f = W + dW_f`` and the scalar
    outputs a per-fidelity bias ``b_f = b + db_f``; ``dW_f``, ``db_f`` start
    at zero. A batch is evaluated with one weight per fidelity *present*, on
    the rows of that fidelity only, so the cost stays one linear per node.

Both fold into a plain e3nn ``Linear`` (with scalar biases) for one fidelity.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from e3nn.o3 import Irreps, Linear
from e3nn.util.jit import compile_mode
from sevenn.nn.linear import IrrepsLinear

from .._sevenn import KEY

AtomGraphDataType = Dict[str, torch.Tensor]


def instruction_map(
    linear: Linear,
) -> Dict[Tuple[int, int], Tuple[int, int, float]]:
    """(i_in, i_out) -> (offset, numel, path_weight) in the flat weight vector."""
    out = {}
    offset = 0
    for ins in linear.instructions:
        if ins.i_in == -1:
            continue
        numel = math.prod(ins.path_shape)
        out[(ins.i_in, ins.i_out)] = (offset, numel, ins.path_weight)
        offset += numel
    return out


def _bias_slices(linear: Linear) -> Dict[int, Tuple[int, int]]:
    """i_out -> (offset, numel) in the flat bias vector."""
    out = {}
    offset = 0
    for ins in linear.instructions:
        if ins.i_in != -1:
            continue
        numel = math.prod(ins.path_shape)
        out[ins.i_out] = (offset, numel)
        offset += numel
    return out


def transfer_weights(
    src: Linear, src_weight: torch.Tensor, dst: Linear
) -> torch.Tensor:
    """Map the flat weights of ``src`` onto the layout of ``dst``.

    Paths are matched by (input block, output block). e3nn normalises each path
    by its fan-in, so a path that exists in both gets its weight rescaled by
    the ratio of path weights: the computed function is unchanged. Paths of
    ``dst`` absent in ``src`` are zero.
    """
    dst_map = instruction_map(dst)
    src_map = instruction_map(src)
    out = torch.zeros(
        dst.weight_numel, dtype=src_weight.dtype, device=src_weight.device
    )
    for key, (d_off, d_n, d_pw) in dst_map.items():
        if key not in src_map:
            continue
        s_off, s_n, s_pw = src_map[key]
        assert s_n == d_n, f'path {key} has {s_n} weights in source, {d_n} in target'
        out[d_off : d_off + d_n] = src_weight[s_off : s_off + s_n] * (s_pw / d_pw)
    return out


def _scalar_mask_for_bias(irreps_out: Irreps) -> List[bool]:
    return [ir.l == 0 and ir.p == 1 for _, ir in irreps_out]


@compile_mode('script')
class FidelityLinear(nn.Module):
    """Equivariant linear layer whose weights depend on the graph's fidelity.

    Reads node features from ``data[data_key_in]``, the fidelity index of each
    graph from ``data['modal_type']`` (sevenn's key, filled from the
    ``data_modality`` names by AtomGraphSequential or fixed at deploy), and
    writes ``data[data_key_out]``.
    """

    def __init__(
        self,
        irreps_in: Irreps,
        irreps_out: Irreps,
        num_fidelities: int,
        mode: str = 'onehot',
        data_key_in: str = KEY.NODE_FEATURE,
        data_key_out: Optional[str] = None,
        biases: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ('onehot', 'indexed'):
            raise ValueError(f"mode must be 'onehot' or 'indexed', got {mode!r}")
        if num_fidelities < 1:
            raise ValueError('num_fidelities must be >= 1')
        self.irreps_in = Irreps(irreps_in)
        self.irreps_out = Irreps(irreps_out)
        self.num_fidelities = num_fidelities
        self.mode = mode
        self.is_onehot = mode == 'onehot'
        self.key_input = data_key_in
        self.key_output = data_key_in if data_key_out is None else data_key_out
        self.key_modal = KEY.MODAL_TYPE
        self.key_batch = KEY.BATCH
        self.shared_biases = bool(biases)
        self._is_batch_data = True
        self.layer_instantiated = True  # sevenn's lazy-instantiate protocol
        self.dim_out = self.irreps_out.dim

        if self.is_onehot:
            irreps_ext = self.irreps_in + Irreps(f'{num_fidelities}x0e')
            # attribute name and layout match sevenn's IrrepsLinear
            self.linear = Linear(irreps_ext, self.irreps_out, biases=biases)
            # placeholders so TorchScript can compile the indexed branch; not
            # persistent, so the state dict stays that of sevenn's layer
            for name in ('weight', 'delta_weight', 'bias', 'delta_bias'):
                self.register_buffer(name, torch.zeros(0), persistent=False)
        else:
            self.linear = Linear(
                self.irreps_in,
                self.irreps_out,
                internal_weights=False,
                shared_weights=True,
                biases=_scalar_mask_for_bias(self.irreps_out),
            )
            n_w, n_b = self.linear.weight_numel, self.linear.bias_numel
            self.weight = nn.Parameter(torch.randn(n_w))
            self.delta_weight = nn.Parameter(torch.zeros(num_fidelities, n_w))
            self.bias = nn.Parameter(torch.zeros(n_b))
            self.delta_bias = nn.Parameter(torch.zeros(num_fidelities, n_b))

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_irreps_linear(
        cls, module: IrrepsLinear, num_fidelities: int, mode: str
    ) -> FidelityLinear:
        """A fresh layer at the position of sevenn's (not yet built) IrrepsLinear."""
        return cls(
            module._irreps_in_wo_modal,
            module.irreps_out,
            num_fidelities,
            mode,
            data_key_in=module.key_input,
            data_key_out=module.key_output,
            biases=bool(module.linear_kwargs.get('biases', False)),
        )

    def extra_repr(self) -> str:
        return (
            f'{self.irreps_in} -> {self.irreps_out}, '
            f'fidelities={self.num_fidelities}, mode={self.mode}'
        )

    # -- forward ----------------------------------------------------------------
    def _node_fidelity(self, data: AtomGraphDataType, n: int) -> torch.Tensor:
        modal = data[self.key_modal]
        if self._is_batch_data:
            return modal[data[self.key_batch]]
        return modal.reshape(-1)[:1].expand(n)

    def _forward_onehot(
        self, data: AtomGraphDataType, x: torch.Tensor
    ) -> torch.Tensor:
        fid = self._node_fidelity(data, x.shape[0])
        onehot = torch.nn.functional.one_hot(fid, self.num_fidelities).to(x.dtype)
        return self.linear(torch.cat([x, onehot], dim=1))

    def _forward_indexed(
        self, data: AtomGraphDataType, x: torch.Tensor
    ) -> torch.Tensor:
        modal = data[self.key_modal].reshape(-1)
        if not self._is_batch_data or bool((modal == modal[0]).all()):
            f = modal[0]
            return self.linear(
                x, self.weight + self.delta_weight[f], self.bias + self.delta_bias[f]
            )
        node_f = modal[data[self.key_batch]]
        out = torch.empty((x.shape[0], self.dim_out), dtype=x.dtype, device=x.device)
        for f in range(self.num_fidelities):
            idx = torch.nonzero(node_f == f).reshape(-1)
            if idx.numel() == 0:
                continue
            y = self.linear(
                x.index_select(0, idx),
                self.weight + self.delta_weight[f],
                self.bias + self.delta_bias[f],
            )
            out = out.index_copy(0, idx, y)
        return out

    def forward(self, data: AtomGraphDataType) -> AtomGraphDataType:
        x = data[self.key_input]
        if self.is_onehot:
            data[self.key_output] = self._forward_onehot(data, x)
        else:
            data[self.key_output] = self._forward_indexed(data, x)
        return data

    # -- folding and conversion -------------------------------------------------
    def plain_linear(self) -> Linear:
        """An e3nn Linear with the layout of the folded layer (scalar biases)."""
        return Linear(self.irreps_in, self.irreps_out, biases=True)

    @torch.no_grad()
    def folded_parameters(self, fidelity: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the plain ``Linear(irreps_in, irreps_out, biases=True)``
        equal to this layer at ``fidelity``."""
        if not 0 <= fidelity < self.num_fidelities:
            raise IndexError(f'fidelity index {fidelity} out of range')
        plain = self.plain_linear()
        bias_slices = _bias_slices(plain)
        if not self.is_onehot:
            w = self.weight + self.delta_weight[fidelity]
            b = torch.zeros(plain.bias_numel, dtype=w.dtype)
            own = _bias_slices(self.linear)
            for i_out, (off, n) in own.items():
                d_off, _ = bias_slices[i_out]
                b[d_off : d_off + n] = (self.bias + self.delta_bias[fidelity])[
                    off : off + n
                ]
            return w.clone(), b

        src = self.linear
        w = transfer_weights(src, src.weight, plain)
        b = torch.zeros(plain.bias_numel, dtype=w.dtype)
        if self.shared_biases:
            for i_out, (off, n) in _bias_slices(src).items():
                d_off, _ = bias_slices[i_out]
                b[d_off : d_off + n] += src.bias[off : off + n]
        i_modal = len(self.irreps_in)  # the appended F x 0e block
        for (i_in, i_out), (off, n, pw) in instruction_map(src).items():
            if i_in != i_modal:
                continue
            rows = src.weight[off : off + n].reshape(self.num_fidelities, -1)
            d_off, d_n = bias_slices[i_out]
            b[d_off : d_off + d_n] += rows[fidelity] * pw
        return w, b

    @torch.no_grad()
    def to_mode(self, mode: str) -> FidelityLinear:
        """The same function in the other formulation (onehot -> indexed is exact;
        indexed -> onehot only when all dW_f are zero)."""
        if mode == self.mode:
            return self
        new = FidelityLinear(
            self.irreps_in,
            self.irreps_out,
            self.num_fidelities,
            mode,
            self.key_input,
            self.key_output,
            biases=self.shared_biases,
        )
        new._is_batch_data = self._is_batch_data
        ref = next(iter(self.parameters()))
        new = new.to(dtype=ref.dtype, device=ref.device)
        folded = [self.folded_parameters(f) for f in range(self.num_fidelities)]
        plain = self.plain_linear()
        if mode == 'indexed':
            w0 = folded[0][0]
            new.weight.copy_(w0)
            new.delta_weight.zero_()
            own = _bias_slices(new.linear)
            pb = _bias_slices(plain)
            new.bias.zero_()
            for f, (_, b) in enumerate(folded):
                for i_out, (off, n) in own.items():
                    d_off, _ = pb[i_out]
                    new.delta_bias[f, off : off + n] = b[d_off : d_off + n]
            return new
        # indexed -> onehot
        if any(not torch.allclose(folded[0][0], w) for w, _ in folded[1:]):
            raise ValueError(
                'indexed layer has fidelity-dependent path weights, which the '
                'onehot formulation cannot represent'
            )
        dst = new.linear
        dst.weight.copy_(transfer_weights(plain, folded[0][0], dst))
        i_modal = len(self.irreps_in)
        pb = _bias_slices(plain)
        for (i_in, i_out), (off, n, pw) in instruction_map(dst).items():
            if i_in != i_modal:
                continue
            d_off, d_n = pb[i_out]
            rows = torch.stack([b[d_off : d_off + d_n] for _, b in folded]) / pw
            dst.weight[off : off + n] = rows.reshape(-1)
        if self.shared_biases:
            dst.bias.zero_()
        # scalar outputs not reached by the one-hot would need a bias
        reached = {
            i_out for (i_in, i_out) in instruction_map(dst) if i_in == i_modal
        }
        for i_out, (d_off, d_n) in pb.items():
            if i_out not in reached and any(
                b[d_off : d_off + d_n].abs().max() > 0 for _, b in folded
            ):
                raise ValueError('bias on an output the one-hot does not reach')
        return new

    @torch.no_grad()
    def load_plain(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        plain_biases: bool = False,
    ) -> None:
        """Initialise every fidelity from a plain sevenn IrrepsLinear's e3nn weights
        (all fidelities then compute exactly the plain layer)."""
        src = Linear(self.irreps_in, self.irreps_out, biases=plain_biases)
        if self.is_onehot:
            self.linear.weight.copy_(transfer_weights(src, weight, self.linear))
            if self.shared_biases and bias is not None:
                self.linear.bias.copy_(bias)
            elif bias is not None and bias.numel() and bias.abs().max() > 0:
                raise ValueError('plain layer has biases; build with biases=True')
            return
        self.weight.copy_(weight)
        self.delta_weight.zero_()
        self.delta_bias.zero_()
        self.bias.zero_()
        if bias is not None and bias.numel():
            own = _bias_slices(self.linear)
            for i_out, (off, n) in _bias_slices(src).items():
                o_off, _ = own[i_out]
                self.bias[o_off : o_off + n] = bias[off : off + n]

    def fidelity_parameters(self) -> List[str]:
        """Names of parameters that depend on the fidelity (for freezing the rest)."""
        return (
            ['linear.weight'] if self.is_onehot else ['delta_weight', 'delta_bias']
        )
