"""Deploy one fidelity to LAMMPS, or export it as a plain sevenn checkpoint.

A fidelity is folded into plain sevenn layers first (see :func:`model.fold`),
so what LAMMPS loads is exactly what sevenn's own ``sevenn_get_model`` writes
for a plain model of the same architecture: sevenn's ``deploy`` /
``deploy_parallel`` do the TorchScript work, and the pair styles need to know
nothing about sevenn_mf. The fidelity name and the model's fidelity list are
added to the file's metadata, which sevenn ignores.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Dict, List, Optional

import torch
from sevenn.scripts.deploy import deploy as sevenn_deploy
from sevenn.scripts.deploy import deploy_parallel as sevenn_deploy_parallel

from . import _sevenn as S
from ._sevenn import KEY
from .checkpoint import Checkpoint, PathLike, refuse_overwriting, save_checkpoint
from .model import convert_layer_mode, fold, resolve_fidelity

# metadata sevenn's deploy writes (read back so that re-saving keeps it)
_SEVENN_META = (
    'chemical_symbols_to_index',
    'cutoff',
    'num_species',
    'flashTP',
    'oeq',
    'model_type',
    'version',
    'dtype',
    'time',
    'comm_size',
)


def _as_checkpoint(source) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else Checkpoint(source)


def export(
    source: PathLike, fidelity: Optional[str], output: PathLike, native: bool = False
) -> str:
    """Write a checkpoint that plain sevenn (without sevenn_mf) loads.

    ``native=False``: a single-fidelity SevenNet checkpoint equal to the model
    at ``fidelity``. ``native=True``: sevenn's own multi-modal format with all
    fidelities (needs one-hot-representable layers).
    """
    cp = _as_checkpoint(source)
    output = str(output)
    refuse_overwriting(cp.path, output)
    model = cp.build_model()
    if native:
        if not cp.fidelities:
            raise ValueError(
                f'{cp.source} is a single-fidelity model: nothing to '
                'export in multi-modal format; export it plainly'
            )
        config = copy.deepcopy(cp.config)
        if cp.layer_mode == 'indexed':
            model, config = convert_layer_mode(model, config, 'onehot')
        for k in (S.FIDELITY_LAYER_MODE, S.FIDELITIES):
            config.pop(k, None)
        save_checkpoint(output, model, config, epoch=cp.epoch or 0)
        return output
    fidelity = resolve_fidelity(cp.config, fidelity)
    plain, config = fold(model, cp.config, fidelity)
    config['sevenn_mf_fidelity'] = fidelity
    config['sevenn_mf_fidelities'] = cp.fidelities
    save_checkpoint(output, plain, config, epoch=cp.epoch or 0)
    return output


def _add_metadata(path: str, extra: Dict[str, str]) -> None:
    files = {k: '' for k in _SEVENN_META}
    module = torch.jit.load(path, _extra_files=files, map_location='cpu')
    meta = {k: v for k, v in files.items() if v != ''}
    meta.update(extra)
    torch.jit.save(module, path, _extra_files=meta)


def _default_output(cp: Checkpoint, fidelity: Optional[str], parallel: bool) -> str:
    stem = 'deployed_parallel' if parallel else 'deployed_serial'
    if fidelity:
        stem += f'_{fidelity}'
    return stem if parallel else stem + '.pt'


def deploy(
    source: PathLike,
    fidelity: Optional[str] = None,
    output: Optional[str] = None,
    parallel: bool = False,
    all_fidelities: bool = False,
) -> List[str]:
    """TorchScript for ``pair_style e3gnn`` (a .pt file) or ``e3gnn/parallel``
    (a folder of per-segment files). Returns the written paths."""
    cp = _as_checkpoint(source)
    if all_fidelities:
        if fidelity is not None:
            raise ValueError('give a fidelity or all_fidelities, not both')
        if not cp.fidelities:
            raise ValueError(
                f'{cp.source} has a single fidelity; drop --all-fidelities'
            )
        targets = list(cp.fidelities)
    else:
        targets = [resolve_fidelity(cp.config, fidelity)]
    outputs = {}
    for fid in targets:
        out = output if (output and not all_fidelities) else None
        if out is None:
            out = _default_output(cp, fid, parallel)
            if output and all_fidelities:
                out = os.path.join(output, out)
        if not parallel and not out.endswith('.pt'):  # written exactly as named
            raise ValueError(f'{out}: a TorchScript file for e3gnn must end in .pt')
        refuse_overwriting(cp.path, out)
        if parallel:
            for i in range(int(cp.config[KEY.NUM_CONVOLUTION])):
                seg = os.path.join(out, f'deployed_parallel_{i}.pt')
                refuse_overwriting(cp.path, seg)
        outputs[fid] = out
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for fid in targets:
            plain_cp = os.path.join(tmp, f'plain_{fid}.pth')
            export(cp, fid, plain_cp)
            out = outputs[fid]
            parent = os.path.dirname(os.path.abspath(out))
            os.makedirs(parent, exist_ok=True)
            meta = {
                'sevenn_mf_fidelity': fid or '',
                'sevenn_mf_fidelities': ' '.join(cp.fidelities),
            }
            if parallel:
                sevenn_deploy_parallel(plain_cp, fname=out)
                n = int(cp.config[KEY.NUM_CONVOLUTION])
                for i in range(n):
                    _add_metadata(
                        os.path.join(out, f'deployed_parallel_{i}.pt'), meta
                    )
            else:
                sevenn_deploy(plain_cp, fname=out)
                _add_metadata(out, meta)
            written.append(os.path.abspath(out))
    return written
