"""Delta-learning: pairing, difference data, and the summed model.

Structures labelled at two fidelities are matched by ``atoms.info['set']``
and ``atoms.info['index']`` (the shared datasets' convention: the same
structure at two fidelities shares both), and checked to be the same
structure (species, cell, positions). Model B learns HF - LF (energy, and
forces where both fidelities have them; stress differences are not used).

With ``train.delta.scale: fitted`` model B learns HF - a LF instead, ``a``
fitted by least squares to the paired training labels (HF energy per atom
against LF energy per atom, beyond what composition explains), and model A
is replaced by a copy whose energy is a times A's (:func:`scaled_checkpoint`):
a high fidelity that is uniformly stiffer than the low one is then not left
to model B, which only sees the HF structures.

The prediction at HF is A(LF) + B, available as

* :class:`DeltaCalculator` - an ASE ``SumCalculator`` of the two
  :class:`~sevenn_mf.calculator.SevenNetMFCalculator`;
* :func:`deploy_sum` - **one** TorchScript file for LAMMPS ``pair_style
  e3gnn``: each part is deployed by sevenn's own deploy (after folding its
  fidelity), and a small scripted module calls both on copies of LAMMPS's
  input and adds their ``inferred_total_energy`` and ``atomic_energy``.
  pair_e3gnn differentiates that energy with respect to ``edge_vec``, so the
  forces and virial are those of the sum. Both parts must share cutoff and
  species order (``sevenn_mf train --method delta`` guarantees it). Not for
  ``e3gnn/parallel``, whose per-layer segments cannot be summed this way.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from ase.calculators.mixing import SumCalculator

PAIR_KEYS = ('set', 'index')
# the fidelity name of model B (HF - LF differences)
DELTA_FIDELITY = 'delta'


class DeltaPairingError(ValueError):
    pass


# ---- pairing ---------------------------------------------------------------------
def _pair_key(frame) -> Tuple[str, int]:
    info = frame.atoms.info if frame.atoms is not None else {}
    missing = [k for k in PAIR_KEYS if k not in info]
    if missing:
        raise DeltaPairingError(
            f'{frame.where}: atoms.info has no {" / ".join(missing)}; Delta-learning '
            'pairs structures labelled at two fidelities by info["set"] and '
            'info["index"]'
        )
    return str(info['set']), int(info['index'])


def pair_frames(
    hf_frames: Sequence[Any], lf_frames: Sequence[Any], position_tol: float = 1e-4
) -> List[Tuple[Any, Any]]:
    """[(hf, lf)] for every HF frame, in HF order. Raises
    :class:`DeltaPairingError` for an HF structure without an LF partner, a
    key used twice, or partners that are not the same structure."""
    lf_by_key: Dict[Tuple[str, int], Any] = {}
    for fr in lf_frames:
        key = _pair_key(fr)
        if key in lf_by_key:
            raise DeltaPairingError(
                f'set={key[0]} index={key[1]} appears twice among the LF paired '
                f'structures ({lf_by_key[key].where} and {fr.where})'
            )
        lf_by_key[key] = fr
    pairs, unpaired, seen = [], [], {}
    for fr in hf_frames:
        key = _pair_key(fr)
        if key in seen:
            raise DeltaPairingError(
                f'set={key[0]} index={key[1]} appears twice '
                f'among the HF structures ({seen[key]} and '
                f'{fr.where})'
            )
        seen[key] = fr.where
        lf = lf_by_key.get(key)
        if lf is None:
            unpaired.append(f'{fr.where} (set={key[0]} index={key[1]})')
            continue
        _check_same_structure(fr, lf, position_tol)
        pairs.append((fr, lf))
    if unpaired:
        more = f' and {len(unpaired) - 5} more' if len(unpaired) > 5 else ''
        raise DeltaPairingError(
            f'{len(unpaired)} HF structure(s) have no LF label in the paired files: '
            + '; '.join(unpaired[:5])
            + more
        )
    return pairs


def _check_same_structure(hf, lf, tol: float) -> None:
    a, b = hf.atoms, lf.atoms
    what = None
    if len(a) != len(b) or not np.array_equal(a.numbers, b.numbers):
        what = 'different atoms'
    elif not np.allclose(a.cell.array, b.cell.array, atol=tol):
        what = 'different cells'
    elif not np.allclose(a.positions, b.positions, atol=tol):
        what = 'different positions'
    if what:
        raise DeltaPairingError(
            f'{hf.where} and {lf.where} share set and index but '
            f'are not the same structure ({what})'
        )


def _both(hf, lf, label: str) -> bool:
    return bool(hf.present.get(label) and lf.present.get(label))


def _paired_lf_frames(mi) -> List[Any]:
    from ..data.databases import read_frames

    return [fr for f in mi.paired_files() for fr in read_frames(f)]


def hf_pairs(mi) -> Tuple[List[Any], List[Tuple[Dict[str, Any], Any, List[Any]]]]:
    """The paired files' frames, and for each HF database its entry, spec and
    (hf, lf) pairs: read once for both the scale fit and model B's data."""
    from ..data.databases import parse_databases, read_frames

    lf_frames = _paired_lf_frames(mi)
    specs = parse_databases(mi.hf_databases, mi.base_dir)
    return lf_frames, [
        (db, spec, pair_frames(read_frames(spec), lf_frames))
        for db, spec in zip(mi.hf_databases, specs)
    ]


def difference_atoms(
    pairs: Sequence[Tuple[Any, Any]], scale: float = 1.0
) -> List[Any]:
    """HF - scale x LF labels as ASE Atoms (energy; forces where both have
    them). Structures with neither label are left out."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for hf, lf in pairs:
        results = {}
        if _both(hf, lf, 'energy'):
            results['energy'] = float(hf.energy - scale * lf.energy)
        if _both(hf, lf, 'force'):
            results['forces'] = hf.forces - scale * lf.forces
        if not results:
            continue
        src = hf.atoms
        atoms = Atoms(
            numbers=src.numbers, positions=src.positions, cell=src.cell, pbc=src.pbc
        )
        atoms.info.update({k: src.info[k] for k in PAIR_KEYS})
        atoms.info['fidelity'] = DELTA_FIDELITY
        atoms.calc = SinglePointCalculator(atoms, **results)
        out.append(atoms)
    return out


def delta_databases(
    mi, lf_fidelity: str, out_dir: str, scale: float = 1.0, paired=None
) -> List[Dict[str, Any]]:
    """Database entries of model B: one per HF database, its structures with
    HF - scale x LF labels (written under ``out_dir``), weights and validation
    as the HF database's. ``paired``: :func:`hf_pairs` of ``mi``, if read
    already."""
    from ..data.databases import parse_databases, read_frames, write_extxyz

    lf_frames, dbs = paired or hf_pairs(mi)
    out = []
    for db, spec, pairs in dbs:
        path = os.path.join(out_dir, f'{spec.name}.extxyz')
        diff = difference_atoms(pairs, scale)
        if not diff:
            raise DeltaPairingError(
                f"database '{spec.name}': no structure has a "
                'label at both fidelities'
            )
        write_extxyz(path, diff)
        entry = {
            'name': f'{spec.name}_delta',
            'fidelity': DELTA_FIDELITY,
            'files': [path],
        }
        if db.get('weight') is not None:
            entry['weight'] = db['weight']
        val = spec.validation or None
        if val and val.get('files'):
            vspec = parse_databases(
                [dict(db, files=val['files'], validation=None)], mi.base_dir
            )[0]
            vpairs = pair_frames(read_frames(vspec), lf_frames)
            vpath = os.path.join(out_dir, f'{spec.name}_validation.extxyz')
            write_extxyz(vpath, difference_atoms(vpairs, scale))
            entry['validation'] = {'files': [vpath]}
        elif val:
            entry['validation'] = dict(val)
        out.append(entry)
    return out


class DeltaScale(NamedTuple):
    a: float  # HF = a LF + element references
    se: float  # its standard error
    structures: int  # training pairs fitted
    reach: float  # eV/atom: how far the LF pool reaches beyond them (95 %)

    def describe(self, hf: str, lf: str) -> str:
        from ..data.references import reach_note

        return (
            f'{hf} = x{self.a:.4f} ± {self.se:.4f} {lf} (+ element references) '
            f'on {self.structures} training pairs; the {lf} pool reaches '
            + reach_note(self.se, self.reach)
        )


def fit_delta_scale(mi, lf_fidelity: str, paired=None) -> DeltaScale:
    """``train.delta.scale: fitted``: the least-squares fit HF = a LF +
    element references on the energy pairs of each HF database's training
    part (its validation structures, as the delta stage will split them, are
    left out), and how far the ``lf_fidelity`` databases' energies reach
    beyond those pairs (:func:`sevenn_mf.data.references.scale_reach`).
    ``paired``: :func:`hf_pairs` of ``mi``, if read already."""
    from ..data.databases import parse_databases, read_frames
    from ..data.graphs import split_validation
    from ..data.references import fit_energy_scale, scale_reach

    numbers, hf_e, lf_e = [], [], []
    for _, spec, pairs in (paired or hf_pairs(mi))[1]:
        # the structures model B's database holds, in its order, so that the
        # ratio split below is the delta stage's
        pairs = [p for p in pairs if _both(*p, 'energy') or _both(*p, 'force')]
        val = spec.validation or {}
        if val.get('ratio'):
            pairs, _ = split_validation(pairs, float(val['ratio']), int(val['seed']))
        for hf, lf in pairs:
            if not _both(hf, lf, 'energy'):
                continue
            numbers.append(hf.numbers)
            hf_e.append(hf.energy)
            lf_e.append(lf.energy)
    if len(numbers) < 3:
        raise DeltaPairingError(
            'train.delta.scale: fitted needs energies at both fidelities of at '
            f'least 3 training structures (found {len(numbers)})'
        )
    try:
        a, se = fit_energy_scale(numbers, hf_e, lf_e)
    except ValueError as exc:
        raise DeltaPairingError(
            f'train.delta.scale: fitted, HF against the paired LF energies: {exc}'
        ) from None
    pool = [
        fr
        for db in mi.lf_databases
        if db.get('fidelity') == lf_fidelity
        for fr in read_frames(parse_databases([db], mi.base_dir)[0])
        if fr.present.get('energy')
    ]
    reach = (
        scale_reach(
            numbers, lf_e, [fr.numbers for fr in pool], [fr.energy for fr in pool]
        )
        if pool
        else 0.0
    )
    return DeltaScale(a, se, len(numbers), reach)


def scaled_checkpoint(source: str, factor: float, output: str) -> str:
    """A copy of checkpoint ``source`` whose energy is ``factor`` times its
    own at every fidelity (forces and stress follow), written atomically to
    ``output``; sevenn's loaders read it like any checkpoint."""
    from ..checkpoint import Checkpoint, refuse_overwriting, save_checkpoint
    from ..model import scale_energy

    cp = Checkpoint(source)
    refuse_overwriting(cp.path, output)
    model = cp.build_model()
    config = scale_energy(model, cp.config, factor)
    save_checkpoint(
        output, model, config, sevenn_mf={'energy_factor': float(factor)}
    )
    return output


def paired_lf_databases(mi, lf_fidelity: str, out_dir: str) -> List[Dict[str, Any]]:
    """LF databases of the HF structures (``train.mf.paired``): for each HF
    database, its structures' LF partners from the paired files, with every
    label the paired file has, written under ``out_dir`` in the HF order, and
    the HF database's validation split, so that the same structures are held
    out at both fidelities. The LF partners of structures a learning curve
    left out of the HF subset are left out too."""
    import ase.io

    from ..data.databases import parse_databases, read_frames, write_extxyz

    lf_frames = _paired_lf_frames(mi)
    sources: Dict[str, List[Any]] = {}
    out = []
    for db in mi.hf_databases:
        spec = parse_databases([db], mi.base_dir)[0]
        if (spec.validation or {}).get('files'):
            raise DeltaPairingError(
                f"train.mf.paired: database '{spec.name}' has validation files; "
                'give it a validation ratio so that its LF partners are split '
                'the same way'
            )
        atoms = []
        for _, lf in pair_frames(read_frames(spec), lf_frames):
            if lf.file not in sources:  # the source file's own labels, as read
                sources[lf.file] = ase.io.read(lf.file, index=':')
            atoms.append(sources[lf.file][lf.index])
        path = os.path.join(out_dir, f'{spec.name}_{lf_fidelity}.extxyz')
        write_extxyz(path, atoms)
        entry = {
            'name': f'{spec.name}_{lf_fidelity}',
            'fidelity': lf_fidelity,
            'files': [path],
        }
        if spec.validation:
            entry['validation'] = dict(spec.validation)
        out.append(entry)
    return out


# ---- ASE -------------------------------------------------------------------------
class DeltaCalculator(SumCalculator):
    """HF = LF model at its fidelity + Delta model (an ASE SumCalculator; with
    ``train.delta.scale: fitted`` the run's LF part is the scaled copy).

    ``DeltaCalculator(base_ckpt, base_fidelity, delta_ckpt,
    delta_fidelity='delta')``, or ``DeltaCalculator.from_run(run_dir)`` for the
    folder (or ``model.json``) of ``sevenn_mf train --method delta``.
    """

    def __init__(
        self,
        base,
        base_fidelity: Optional[str],
        delta,
        delta_fidelity: Optional[str] = 'delta',
        device: str = 'cpu',
    ):
        from ..calculator import SevenNetMFCalculator

        self.parts = [(base, base_fidelity), (delta, delta_fidelity)]
        super().__init__(
            [
                SevenNetMFCalculator(base, base_fidelity, device=device),
                SevenNetMFCalculator(delta, delta_fidelity, device=device),
            ]
        )

    @classmethod
    def from_run(cls, path: str, device: str = 'cpu') -> DeltaCalculator:
        from .predict import read_parts

        parts, _ = read_parts(path)
        if len(parts) != 2:
            raise ValueError(f'{path}: not a delta run ({len(parts)} part(s))')
        (a, fa), (b, fb) = parts
        return cls(a, fa, b, fb, device=device)


# ---- one TorchScript file ---------------------------------------------------------
class _SumOfModels(torch.nn.Module):
    """Calls each deployed model on a copy of the input; adds the energies."""

    def __init__(self, parts: List[torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        energy = torch.zeros(1)
        atomic = torch.zeros(1)
        first = True
        for m in self.parts:
            o = m(data.copy())
            if first:
                out = o
                energy = o['inferred_total_energy']
                atomic = o['atomic_energy']
                first = False
            else:
                energy = energy + o['inferred_total_energy']
                atomic = atomic + o['atomic_energy']
        out['inferred_total_energy'] = energy
        out['atomic_energy'] = atomic
        return out


_META = (
    'chemical_symbols_to_index',
    'cutoff',
    'num_species',
    'flashTP',
    'oeq',
    'model_type',
    'version',
    'dtype',
    'time',
)


def _load_deployed(path: str) -> Tuple[torch.jit.ScriptModule, Dict[str, str]]:
    files = {k: '' for k in _META}
    module = torch.jit.load(path, _extra_files=files, map_location='cpu')
    return module, {
        k: (v.decode() if isinstance(v, bytes) else v) for k, v in files.items()
    }


def deploy_sum(parts: Sequence[Tuple[str, Optional[str]]], output: str) -> str:
    """One ``pair_style e3gnn`` file computing the sum of ``parts``
    ((checkpoint, fidelity) pairs)."""
    from ..checkpoint import Checkpoint, refuse_overwriting
    from ..deploy import deploy

    if len(parts) < 1:
        raise ValueError('nothing to deploy')
    output = str(output)
    if not output.endswith('.pt'):
        output += '.pt'
    # every part read (and checked) before anything is deployed or written
    sources = [Checkpoint(ckpt) for ckpt, _ in parts]
    for cp in sources:
        refuse_overwriting(cp.path, output)
    modules, metas = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (cp, (_, fid)) in enumerate(zip(sources, parts)):
            path = deploy(cp, fidelity=fid, output=os.path.join(tmp, f'part{i}.pt'))[
                0
            ]
            m, meta = _load_deployed(path)
            modules.append(m)
            metas.append(meta)
    for k in ('chemical_symbols_to_index', 'cutoff', 'num_species', 'dtype'):
        values = {m[k].strip() for m in metas}
        if len(values) > 1:
            raise ValueError(
                f'the parts differ in {k} ({sorted(values)}): a sum of '
                'models needs the same cutoff and species order'
            )
    wrapper = torch.jit.script(_SumOfModels(modules))
    meta = dict(metas[0])
    meta['sevenn_mf_sum_of'] = ' + '.join(
        f'{os.path.basename(str(c))}@{f}' for c, f in parts
    )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.jit.save(wrapper, output, _extra_files=meta)
    return os.path.abspath(output)


def evaluate_deployed(path: str, atoms) -> Tuple[float, np.ndarray]:
    """Energy and forces of a deployed serial model on ``atoms``, computed the
    way pair_e3gnn does (edge vectors in, dE/d(edge_vec) scattered to atoms)."""
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    from .._sevenn import KEY

    module, meta = _load_deployed(path)
    symbols = meta['chemical_symbols_to_index'].split()
    cutoff = float(meta['cutoff'])
    g = unlabeled_atoms_to_graph(atoms, cutoff)
    edge_index = torch.as_tensor(g[KEY.EDGE_IDX], dtype=torch.int64)
    edge_vec = torch.as_tensor(g[KEY.EDGE_VEC], dtype=torch.float32).requires_grad_(
        True
    )
    x = torch.tensor(
        [symbols.index(s) for s in atoms.get_chemical_symbols()], dtype=torch.int64
    )
    n = torch.tensor(len(atoms), dtype=torch.int64)
    out = module(
        {
            'x': x,
            'edge_index': edge_index,
            'edge_vec': edge_vec,
            'num_atoms': n,
            'nlocal': n,
        }
    )
    energy = out['inferred_total_energy'].squeeze()
    (de_dr,) = torch.autograd.grad([energy], [edge_vec])
    forces = torch.zeros(len(atoms), 3)
    forces.index_add_(0, edge_index[0], de_dr)
    forces.index_add_(0, edge_index[1], -de_dr)
    return float(energy.detach()), forces.numpy().astype(float)
